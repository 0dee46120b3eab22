"""The commands as a user types them: output, exit codes, and one-line errors without tracebacks."""

import csv
import json
from pathlib import Path

import torch
from conftest import TINY_MODEL

from tlkit.cli.app import app
from tlkit.errors import TlkitError


def invoke(runner, *args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *fragments, usage: bool = False):
    """One `error:` line on stderr, no traceback; exit code 1, or 2 for a value the options refuse (`usage`)."""
    assert result.exit_code == (2 if usage else 1), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in " ".join(result.stderr.split()), result.stderr


def test_data_digits_and_ingest(runner, workdir):
    result = invoke(runner, "data", "digits", "d", "--classes", "0-2", "--per-class", "12", "--size", "16")
    assert result.exit_code == 0
    assert "wrote 36 images" in result.output
    result = invoke(runner, "ingest", "d", "--val", "0.25", "--test", "0.25", "--out", "m.json")
    assert result.exit_code == 0, result.output
    assert "fingerprint" in result.output
    assert "all" in result.output
    assert "MLflow run" in result.output
    assert json.loads(Path("m.json").read_text())["format"] == "tlkit-manifest/1"


def test_backbone_list_and_info(runner):
    result = invoke(runner, "backbone", "list", "resnet1")
    assert result.exit_code == 0
    assert "resnet18" in result.stdout.split()
    result = invoke(runner, "backbone", "info", "resnet18")
    assert result.exit_code == 0
    assert "features 512" in result.stdout
    assert "layer4" in result.stdout
    assert "resnet18.a1_in1k" in result.stdout


def test_extract_twice_reads_the_cache(runner, workdir, digits_source):
    args = ("extract", digits_source, "--model", TINY_MODEL, "--no-pretrained", "--img-size", 32, "--workers", 0)
    first = invoke(runner, *args)
    assert first.exit_code == 0, first.output
    assert "computed" in first.stdout, first.output
    second = invoke(runner, *args)
    assert second.exit_code == 0
    assert "read from cache" in second.stdout
    every = invoke(runner, *args, "--layers", "all")
    assert every.exit_code == 0, every.output
    assert "features (every layer's) computed" in every.stdout


def test_baseline_pretrain_finetune_predict(runner, workdir, digits_source, digits_target):
    result = invoke(runner, "baseline", digits_target, "--classifier", "pixels")
    assert result.exit_code == 0
    assert "heldout_accuracy" in result.stdout

    result = invoke(
        runner, "pretrain", digits_source, "--model", TINY_MODEL, "--img-size", 32, "--epochs", 2, "--workers", 0
    )
    assert result.exit_code == 0, result.output
    run_id = result.stdout.split("MLflow run ")[1].split()[0]

    result = invoke(runner, "baseline", digits_target, "--weights", f"runs:/{run_id}", "--workers", 0)
    assert result.exit_code == 0, result.output
    assert f"{TINY_MODEL} + svm" in result.stdout, result.output

    result = invoke(
        runner, "finetune", digits_target, "--weights", f"runs:/{run_id}", "--epochs", 2, "--workers", 0, "--no-hflip"
    )
    assert result.exit_code == 0, result.output
    finetuned = result.stdout.split("MLflow run ")[1].split()[0]

    image = sorted(Path(digits_target, "7").glob("*.png"))[0]
    result = invoke(runner, "predict", f"runs:/{finetuned}", image, "--top-k", 3, "--out", "preds.csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open("preds.csv")))
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    assert {r["class"] for r in rows} <= {"5", "6", "7"}

    result = invoke(runner, "evaluate", f"runs:/{finetuned}", digits_target, "--split", "val")
    assert result.exit_code == 0, result.output
    assert "val_accuracy" in result.stdout, result.output
    assert_one_line_error(
        invoke(runner, "evaluate", f"runs:/{finetuned}", digits_source), "does not know class(es) 0, 1, 2"
    )
    result = invoke(
        runner,
        "baseline",
        digits_target,
        "--classifier",
        "logreg",
        "--weights",
        f"runs:/{run_id}",
        "--workers",
        0,
        "--run-name",
        "my probe",
    )
    assert result.exit_code == 0, result.output

    # runs are named for what they are, and the UI's view ranks only those with a held-out score on their own data
    from mlflow import MlflowClient

    from tlkit.core import tracking

    client = MlflowClient(tracking.resolve_tracking_uri())
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT).experiment_id
    names = sorted(r.info.run_name for r in client.search_runs([experiment]))
    assert names == sorted(
        [
            "pixels + svm",
            f"{TINY_MODEL} pretrain (full)",
            f"{TINY_MODEL} + svm",
            "my probe",
            f"{TINY_MODEL} finetune (freeze-unfreeze)",
            "predict (1 image)",
            "evaluate on val",
        ]
    ), names
    view = tracking.runs_view("heldout_accuracy")
    ranked = client.search_runs([experiment], view["searchFilter"], order_by=["metrics.heldout_accuracy DESC"])
    assert sorted(r.info.run_name for r in ranked) == sorted(
        ["pixels + svm", f"{TINY_MODEL} + svm", "my probe", f"{TINY_MODEL} finetune (freeze-unfreeze)"]
    )


def test_bad_inputs_are_one_line_errors(runner, workdir, digits_source, tmp_path):
    assert_one_line_error(invoke(runner, "ingest", "no/such/folder"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke(runner, "ingest", tmp_path / "empty"), "no usable images")
    (tmp_path / "one" / "cat").mkdir(parents=True)
    (tmp_path / "one" / "cat" / "a.png").write_bytes(
        (digits_source / "0" / next(iter(sorted(p.name for p in (digits_source / "0").iterdir())))).read_bytes()
    )
    assert_one_line_error(invoke(runner, "ingest", tmp_path / "one"), "one class only")
    assert_one_line_error(
        invoke(runner, "extract", digits_source, "--model", "resnet_18"), "unknown model", "did you mean"
    )
    (tmp_path / "bad.csv").write_text("file,class\na.png,cat\n")
    assert_one_line_error(invoke(runner, "ingest", tmp_path / "bad.csv"), "lacks column(s) path, label")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "w.pth")
    assert_one_line_error(
        invoke(runner, "extract", digits_source, "--model", TINY_MODEL, "--weights", tmp_path / "w.pth"),
        "do not fit model",
    )
    assert_one_line_error(invoke(runner, "predict", "runs:/0123abcd", digits_source), "no run '0123abcd'")
    assert_one_line_error(invoke(runner, "extract", digits_source), "pass --model NAME")
    assert_one_line_error(
        invoke(runner, "ingest", digits_source, "--val", "0.7", "--test", "0.5"), "must leave images for training"
    )


def test_hub_weights_without_network_fail_fast(runner, workdir, digits_source, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke(runner, "extract", digits_source, "--model", "resnet18")
    assert_one_line_error(result, "--weights", "HF_HUB_OFFLINE")


def test_augment_preview_draws_the_training_view(runner, workdir, digits_source):
    result = invoke(
        runner,
        "augment",
        "preview",
        digits_source,
        "--augment",
        "medium",
        "--model",
        TINY_MODEL,
        "--img-size",
        48,
        "--n",
        6,
        "--out",
        "grid.png",
    )
    assert result.exit_code == 0, result.output
    assert "6 augmented training images drawn to grid.png" in result.stdout, result.output
    from PIL import Image

    assert Image.open("grid.png").size[0] > 300
    assert not Path("mlflow.db").exists()  # a look, not a run


def test_backbone_info_merges_groups(runner):
    result = invoke(runner, "backbone", "info", "resnet18", "--groups", "2")
    assert result.exit_code == 0
    rows = [line for line in result.stdout.splitlines() if line.strip().startswith(("│ 0", "│ 1", "│ 2"))]
    assert len(rows) == 2, result.stdout


def test_finetune_strategies_and_lr_find_from_the_cli(runner, workdir, digits_source):
    common = (
        "--model",
        TINY_MODEL,
        "--no-pretrained",
        "--img-size",
        32,
        "--workers",
        0,
        "--batch-size",
        16,
        "--augment",
        "none",
    )
    result = invoke(
        runner,
        "finetune",
        digits_source,
        *common,
        "--strategy",
        "gradual",
        "--epochs",
        3,
        "--groups",
        2,
        "--lrs",
        "1e-4,1e-3,1e-2",
    )
    assert result.exit_code == 0, result.output
    from tlkit.cli.output import PRECISION_NAMES
    from tlkit.core import tracking

    used = tracking.get_run(result.stdout.split("MLflow run ")[1].split()[0]).data.params["precision"]
    assert f"finetune (gradual, {PRECISION_NAMES[used]})" in result.stdout  # the title says the precision the run used
    result = invoke(runner, "lr-find", digits_source, *common)
    assert result.exit_code == 0, result.output
    assert "suggested head learning rate" in result.stdout, result.output
    result = invoke(
        runner, "finetune", digits_source, *common, "--lr", "auto", "--epochs", 2, "--strategy", "linear-probe"
    )
    assert result.exit_code == 0, result.output


def test_bad_training_options_are_one_line_errors(runner, workdir, digits_source):
    common = ("--model", TINY_MODEL, "--no-pretrained", "--img-size", 32)
    assert_one_line_error(
        invoke(runner, "finetune", digits_source, *common, "--strategy", "fastest"),
        "--strategy",
        "'fastest' is not one of 'freeze-unfreeze', 'linear-probe', 'full', 'gradual', 'lp-ft'",
        "finetune --help",
        usage=True,
    )
    assert_one_line_error(
        invoke(runner, "finetune", digits_source, *common, "--groups", 2, "--lrs", "1,2"), "--lrs needs 3 values"
    )
    assert_one_line_error(
        invoke(runner, "finetune", digits_source, *common, "--lr", "fast"),
        "--lr must be a number or 'auto'; got 'fast'",
    )
    assert_one_line_error(
        invoke(
            runner,
            "finetune",
            digits_source,
            *common,
            "--strategy",
            "freeze-unfreeze",
            "--epochs",
            2,
            "--freeze-epochs",
            2,
        ),
        "--freeze-epochs (2) must be below --epochs (2)",
    )
    assert_one_line_error(
        invoke(runner, "finetune", digits_source, *common, "--resume", "feedface"), "no run 'feedface'"
    )
    assert_one_line_error(
        invoke(runner, "finetune", digits_source, *common, "--use-val", "train", "--patience", 2),
        "drop --patience or --use-val 'select'",
    )
    assert_one_line_error(
        invoke(runner, "finetune", digits_source, *common, "--use-val", "train", "--test", 0),
        "no test split to report on",
    )
    assert_one_line_error(
        invoke(runner, "finetune", digits_source, *common, "--test", 0, "--patience", 2),
        "val is where results are reported",
    )
    assert not Path("mlflow.db").exists()  # every option error came before MLflow was touched


def test_one_epoch_with_default_settings_trains(runner, workdir, digits_source):
    result = invoke(
        runner,
        "finetune",
        digits_source,
        "--model",
        TINY_MODEL,
        "--no-pretrained",
        "--img-size",
        32,
        "--epochs",
        1,
        "--workers",
        0,
    )
    assert result.exit_code == 0, result.output
    assert "heldout_accuracy" in result.stdout, result.output


def test_messages_print_brackets_and_paths_literally(runner, workdir, digits_source, monkeypatch):
    from tlkit.errors import TlkitError
    from tlkit.runs import evaluate as review

    def no_onnx(*args, **kwargs):
        raise TlkitError("ONNX export needs the onnx and onnxscript packages: pip install 'tlkit[export]'")

    monkeypatch.setattr(review, "run_export", no_onnx)
    assert_one_line_error(invoke(runner, "export", "runs:/abc", "--experiment", "x"), "pip install 'tlkit[export]'")
    data = Path("photos [v2]")
    (data / "[empty]").mkdir(parents=True)
    for name in ("0", "1"):
        (data / f"[{name}]").mkdir()
        for image in sorted((digits_source / name).iterdir())[:6]:
            (data / f"[{name}]" / image.name).write_bytes(image.read_bytes())
    result = invoke(runner, "baseline", data, "--classifier", "pixels")
    assert result.exit_code == 0, result.output
    assert "warning: class folder(s) with no usable image, left out of the dataset: [empty]" in " ".join(
        result.stderr.split()
    )


def test_the_options_are_the_settings_models_own():
    """cli/settings.json (read at start-up instead of importing pydantic) is what the models say today."""
    import json

    from tlkit.cli.options import SPEC_FILE, spec_from_models

    assert json.loads(SPEC_FILE.read_text()) == spec_from_models(), "stale: run python -m tlkit.cli.options"


def test_a_command_and_its_pipeline_stage_share_their_defaults(runner):
    from tlkit.config import PretrainConfig, TrainConfig
    from tlkit.pipelines.schema import ExportStage, FinetuneStage, PretrainStage

    finetune = invoke(runner, "finetune", "--help").stdout
    pretrain = invoke(runner, "pretrain", "--help").stdout
    stage_train = FinetuneStage(id="f", stage="finetune", data="d").train
    assert stage_train.model_dump() == TrainConfig().model_dump()
    # the defaults that are resolved per dataset stay unset
    assert stage_train.model_fields_set == TrainConfig().model_fields_set
    assert PretrainStage(id="p", stage="pretrain", data="d").train.model_dump() == PretrainConfig().model_dump()
    assert PretrainStage(id="p", stage="pretrain", data="d").pretrained is False
    for help_text, settings in ((finetune, TrainConfig()), (pretrain, PretrainConfig())):
        shown = " ".join(help_text.replace("│", " ").split())
        assert f"[default: {settings.epochs}]" in shown
        assert f"[default: {settings.strategy}]" in shown
    assert ExportStage(id="e", stage="export", model="m").format == "onnx"
    assert "[default: onnx]" in " ".join(invoke(runner, "export", "--help").stdout.replace("│", " ").split())


def test_run_takes_its_experiment_from_mlflow_s_variable(runner, workdir, digits_target, monkeypatch):
    import yaml
    from mlflow import MlflowClient

    pipeline = workdir / "p.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {
                "name": "env",
                "experiment": "from-the-file",
                "datasets": {"d": {"path": str(digits_target)}},
                "stages": [{"id": "pixels", "stage": "baseline", "data": "d", "baseline": {"classifier": "pixels"}}],
            }
        )
    )
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-the-environment")
    assert invoke(runner, "run", pipeline).exit_code == 0
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert client.get_experiment_by_name("from-the-environment") is not None
    assert client.get_experiment_by_name("from-the-file") is None


def test_an_option_left_at_its_default_is_unset_as_in_a_pipeline_file(runner, digits_target, workdir, monkeypatch):
    """The default epochs are resolved per dataset (at least 100 steps) only where epochs were not given: the command
    line must leave them unset as a pipeline file does, and a given value stays as given."""
    import tlkit.runs.stages

    seen = []

    def capture(data, backbone, train, **kwargs):
        seen.append(train)
        raise TlkitError("captured")

    monkeypatch.setattr(tlkit.runs.stages, "run_train", capture)
    common = ["finetune", digits_target, "--model", TINY_MODEL, "--no-pretrained"]
    invoke(runner, *common)
    invoke(runner, *common, "--epochs", "10", "--lr", "0.002")
    unset, given = seen
    assert "epochs" not in unset.model_fields_set
    assert unset.epochs == 10
    assert {"epochs", "lr"} <= given.model_fields_set
    assert "strategy" not in given.model_fields_set
