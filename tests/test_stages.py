"""Stages log what they did: checked in the MLflow store, not just by return values."""

import json
from pathlib import Path

import pytest
from conftest import TINY_MODEL

from tlkit.config import BackboneConfig, BaselineConfig, ComputeConfig, PretrainConfig, SplitConfig, TrainConfig
from tlkit.core import tracking
from tlkit.errors import TlkitError
from tlkit.runs.stages import RunOptions, run_baseline, run_extract, run_ingest, run_predict, run_train

TINY = BackboneConfig(model=TINY_MODEL, pretrained=False, img_size=32)
CPU = ComputeConfig(num_workers=0, batch_size=32)
QUIET = RunOptions(progress=False)


def artifacts(client, run_id, path=""):
    found = []
    for item in client.list_artifacts(run_id, path):
        found += artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return set(found)


def test_ingest_run_logs_report_and_manifest(tracked, digits_source):
    manifest, path, result = run_ingest(digits_source, SplitConfig(seed=1), out=Path("m.json"))
    run = tracked.get_run(result.run_id)
    assert run.data.tags["tlkit.data_fingerprint"] == manifest.fingerprint
    assert run.data.tags["tlkit.stage"] == "ingest"
    assert run.data.params["seed"] == "1"
    assert run.data.metrics["images"] == 90
    assert {"data/report.txt", "data/m.json"} <= artifacts(tracked, result.run_id)


def test_extract_run_records_throughput_and_cache_hits(tracked, digits_source):
    first, r1 = run_extract(digits_source, TINY, compute=CPU)
    second, r2 = run_extract(digits_source, TINY, compute=CPU)
    assert tracked.get_run(r1.run_id).data.tags["tlkit.cache_hit"] == "False"
    assert tracked.get_run(r2.run_id).data.tags["tlkit.cache_hit"] == "True"
    assert tracked.get_run(r1.run_id).data.metrics["images_per_s"] > 0
    assert tracked.get_run(r1.run_id).data.params["weights"] == "random(seed=0)"


def test_extract_of_every_layer_is_what_a_multilayer_baseline_reads_from_the_cache(tracked, digits_source):
    from tlkit.models.backbone import create_model
    from tlkit.models.multilayer import stage_widths

    last, _ = run_extract(digits_source, TINY, compute=CPU)
    every, r1 = run_extract(digits_source, TINY, compute=CPU, layers="all")
    assert not every.cached and every.key != last.key  # its own cache entry, not the last layer's
    model = create_model(TINY_MODEL)
    assert every.X.shape == (len(last.X), sum(stage_widths(model)) + last.X.shape[1])
    assert tracked.get_run(r1.run_id).data.params["layers"] == "all"
    probe = run_baseline(digits_source, TINY, BaselineConfig(layers="all"), compute=CPU)
    assert tracked.get_run(probe.run_id).data.tags["tlkit.cache_hit"] == "True"
    assert tracked.get_run(probe.run_id).data.params["feature_key"] == every.key


def test_a_fine_tunes_probe_reads_what_extract_of_every_layer_cached(tracked, digits_source, digits_pair, tmp_path):
    compute = CPU.model_copy(update={"cache_dir": str(tmp_path / "cache")})
    pre = run_train(digits_source, TINY, PretrainConfig(epochs=1, augment="none"), compute=compute, run=QUIET)
    weights = BackboneConfig(weights=pre.model_uri)
    run_extract(digits_pair, weights, compute=compute, layers="all")
    cached = sorted((tmp_path / "cache" / "features").glob("*.npz"))
    train = TrainConfig(epochs=1, augment="none", keep="probe")
    result = run_train(digits_pair, weights, train, compute=compute, run=QUIET)
    assert result.details["probe_layers"] == "all"
    assert sorted((tmp_path / "cache" / "features").glob("*.npz")) == cached  # nothing extracted again


def test_extract_of_every_layer_refuses_a_vision_transformer_before_its_run(tracked, digits_source):
    vit = BackboneConfig(model="test_vit", pretrained=False, img_size=32)
    with pytest.raises(TlkitError, match="test_vit has no stages.*use --layers last"):
        run_extract(digits_source, vit, compute=CPU, layers="all")
    assert tracked.search_runs([e.experiment_id for e in tracked.search_experiments()]) == []


@pytest.mark.parametrize("classifier", ["svm", "logreg", "pixels"])
def test_baseline_run_contents_and_prediction(tracked, digits_source, classifier):
    result = run_baseline(digits_source, TINY, BaselineConfig(classifier=classifier, pixel_size=16), compute=CPU)
    run = tracked.get_run(result.run_id)
    params, metrics = run.data.params, run.data.metrics
    assert params["features"] == ("pixels" if classifier == "pixels" else "backbone")
    assert params["classifier"] == ("svm" if classifier == "pixels" else classifier)
    assert float(params["C"]) > 0
    assert params["data.fingerprint"] == run.data.tags["tlkit.data_fingerprint"]
    assert metrics["heldout_accuracy"] == result.metrics["heldout_accuracy"] > 0.5
    files = artifacts(tracked, result.run_id)
    assert {
        "plots/confusion_matrix.png",
        "model/MLmodel",
        "model/artifacts/bundle/tlkit-model.json",
        "model/artifacts/bundle/head.safetensors",
        "data/report.txt",
    } <= files
    assert ("model/artifacts/bundle/backbone.safetensors" in files) == (classifier != "pixels")
    # tensors, JSON and code: no pickle anywhere in the run
    assert not [f for f in files if f.endswith((".pkl", ".joblib", ".pickle"))]

    images = sorted(str(p) for p in Path(digits_source, "2").glob("*.png"))[:5]
    rows, skipped, predicted = run_predict(f"runs:/{result.run_id}", images, top_k=2)
    assert len(rows) == 10
    assert not skipped
    assert [r["rank"] for r in rows[:2]] == [1, 2]
    assert "probability" in rows[0]
    assert rows[0]["probability"] >= rows[1]["probability"]
    assert sum(r["class"] == "2" for r in rows if r["rank"] == 1) >= 3


def test_pretrain_then_finetune_from_the_run(tracked, digits_source, digits_target):
    train = TrainConfig(epochs=2, batch_size=16, augment="none", strategy="freeze-unfreeze", bn="frozen")
    pre = run_train(digits_source, TINY, PretrainConfig(**train.model_dump()), compute=CPU, run=QUIET)
    run = tracked.get_run(pre.run_id)
    history = tracked.get_metric_history(pre.run_id, "val_accuracy")
    assert [m.step for m in history] == [0, 1]
    assert {"train_loss", "train_accuracy", "val_loss", "heldout_accuracy", "best_epoch"} <= set(run.data.metrics)
    assert run.data.params["train.epochs"] == "2"
    assert run.data.params["train.strategy"] == "freeze-unfreeze"
    assert run.data.params["phases"] == json.dumps(["head@0", "all@1"])
    assert len(json.loads(run.data.params["group_lrs"])) == 5
    assert {
        "model/artifacts/bundle/backbone.safetensors",
        "model/artifacts/bundle/head.safetensors",
        "plots/confusion_matrix.png",
        "plots/train_batch.png",
        "plots/training_curves.png",
    } <= artifacts(tracked, pre.run_id)
    assert run.data.params["heldout_split"] == "test"
    assert run.data.params["selection.epoch"] == "best val_score on the val split"
    (dataset,) = run.inputs.dataset_inputs  # the UI's Dataset column: name, tlkit's fingerprint, the splits
    assert dataset.dataset.name == "source"
    assert dataset.dataset.digest == run.data.tags["tlkit.data_fingerprint"]
    assert json.loads(dataset.dataset.profile) == {"classes": 3, "n_train": 66, "n_val": 12, "n_test": 12}

    fine = run_train(digits_target, BackboneConfig(weights=pre.model_uri), train, compute=CPU, run=QUIET)
    fine_run = tracked.get_run(fine.run_id)
    assert fine_run.data.params["weights"] == pre.model_uri
    assert fine_run.data.params["model"] == TINY_MODEL
    assert fine_run.data.params["img_size"] == "32"  # preprocessing travels with the weights
    # the frozen probe of the same backbone, scored on the same held-out split, beside the fine-tune's figure
    assert 0 <= fine_run.data.metrics["probe_heldout_accuracy"] <= 1
    assert "probe_heldout_accuracy" in fine.details

    image = str(sorted(Path(digits_target, "6").glob("*.png"))[0])
    rows, _, _ = run_predict(fine.model_uri, [image], top_k=3)
    assert [r["class"] for r in rows] != []
    assert abs(sum(r["probability"] for r in rows) - 1) < 0.0001


def test_unknown_run_and_wrong_model_are_errors(tracked, digits_source):
    with pytest.raises(TlkitError, match="no run 'deadbeef'"):
        run_predict("runs:/deadbeef", [str(digits_source)])
    result = run_baseline(digits_source, TINY, BaselineConfig(), compute=CPU)
    with pytest.raises(TlkitError, match="holds a 'test_resnet' backbone, not 'resnet18'"):
        run_extract(digits_source, BackboneConfig(model="resnet18", weights=result.model_uri), compute=CPU)


def test_predict_skips_bad_files_and_reports_them(tracked, digits_source, awkward_images):
    result = run_baseline(digits_source, TINY, BaselineConfig(classifier="pixels"), compute=CPU)
    rows, skipped, _ = run_predict(result.model_uri, [str(awkward_images), "missing.png"])
    reasons = dict(skipped)
    assert reasons["missing.png"] == "does not exist"
    assert any("truncated" == r for r in reasons.values())
    assert len(rows) == 9  # every readable image of the awkward tree, stray.png included


def test_tracking_default_store_is_sqlite_with_local_artifacts(workdir):
    tracking.configure(None, "fresh")
    assert not (workdir / "mlflow.db").exists()  # nothing is created until a run starts
    with tracking.start_run("extract") as run_id:
        pass
    assert (workdir / "mlflow.db").exists()
    from mlflow import MlflowClient

    client = MlflowClient(tracking.resolve_tracking_uri())
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.artifact_location == (workdir / "mlruns" / "fresh").as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_sqlite_store_elsewhere_keeps_its_artifacts_beside_its_database(workdir, tmp_path):
    """A store in another folder (a bench's temporary one) leaves no mlruns/ in the working directory."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tracking.configure(f"sqlite:///{elsewhere / 'mlflow.db'}", "away")
    with tracking.start_run("extract") as run_id:
        tracking.log_dict({"a": 1}, "note.json")
    from mlflow import MlflowClient

    client = MlflowClient(tracking.resolve_tracking_uri())
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.artifact_location == (elsewhere / "mlruns" / "away").as_uri()
    assert list((elsewhere / "mlruns").rglob("note.json")) and not (workdir / "mlruns").exists()


def test_resume_continues_the_same_mlflow_run(tracked, digits_source, monkeypatch):
    from tlkit.train import finetune

    class Interrupted(finetune.PhaseCallback):
        def on_train_epoch_end(self, trainer, module):
            if trainer.current_epoch == 1:
                raise KeyboardInterrupt  # Ctrl-C after the second epoch

    original = finetune.PhaseCallback
    monkeypatch.setattr(finetune, "PhaseCallback", Interrupted)
    # select: val judges every epoch (with random weights and a test split, refit would train on val)
    train = TrainConfig(epochs=3, batch_size=16, augment="none", strategy="freeze-unfreeze", use_val="select")
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run_train(digits_source, TINY, train, compute=CPU, run=QUIET)
    interrupted = tracked.search_runs([tracked.get_experiment_by_name("tests").experiment_id])[0]
    assert interrupted.info.status == "KILLED"
    monkeypatch.setattr(finetune, "PhaseCallback", original)
    result = run_train(digits_source, TINY, train, compute=CPU, run=QUIET, resume=interrupted.info.run_id)
    assert result.run_id == interrupted.info.run_id
    run = tracked.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["epochs_run"] == 3
    assert [m.step for m in tracked.get_metric_history(result.run_id, "val_accuracy")] == [0, 1, 2]
    assert len(tracked.search_runs([run.info.experiment_id])) == 1
    with pytest.raises(TlkitError, match="other settings"):
        run_train(
            digits_source,
            TINY,
            train.model_copy(update={"epochs": 5}),
            compute=CPU,
            run=QUIET,
            resume=result.run_id,
        )


@pytest.mark.slow  # a minute of processes, servers or browsers: with the slow tests
def test_ddp_on_cpu_with_two_processes_logs_one_run(tracked, digits_source):
    train = TrainConfig(epochs=2, batch_size=8, augment="none", strategy="freeze-unfreeze")
    compute = ComputeConfig(devices=2, num_workers=0, precision="32-true")
    result = run_train(digits_source, TINY, train, compute=compute, run=QUIET)
    runs = tracked.search_runs([tracked.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1
    assert runs[0].info.run_id == result.run_id
    assert runs[0].info.status == "FINISHED"
    assert [m.step for m in tracked.get_metric_history(result.run_id, "train_loss")] == [0, 1]
    assert tracked.get_metric_history(result.run_id, "lr.head")  # logged from the spawned rank 0
    assert 0 <= result.metrics["heldout_accuracy"] <= 1


def test_lr_find_stage_logs_plot_and_suggestion(tracked, digits_source):
    from tlkit.runs.stages import run_lr_find

    result = run_lr_find(digits_source, TINY, TrainConfig(batch_size=16, augment="none"), compute=CPU)
    assert result.metrics["suggested_lr"] > 0
    assert "plots/lr_find.png" in artifacts(tracked, result.run_id)
