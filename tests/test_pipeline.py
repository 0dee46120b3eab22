from pathlib import Path

import pytest
import yaml

from conftest import TINY_MODEL
from tlkit.config import load_pipeline
from tlkit.errors import TlkitError
from tlkit.pipeline import run_pipeline, summary_text

ROOT = Path(__file__).resolve().parents[1]


def small_quickstart(tmp_path: Path) -> Path:
    """The shipped quickstart with a tiny model, fewer images and two epochs: same stages, seconds."""
    config = yaml.safe_load((ROOT / "pipelines" / "quickstart.yaml").read_text())
    config["backbone"]["model"] = TINY_MODEL
    for name, dataset in config["datasets"].items():
        dataset["path"] = str(tmp_path / name)
        dataset["digits"]["per_class"] = 30
    for stage in config["stages"]:
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


def test_shipped_pipelines_validate():
    for path in (ROOT / "pipelines").glob("*.yaml"):
        load_pipeline(path)


def test_quickstart_structure_in_mlflow(tracked, tmp_path):
    summary = run_pipeline(small_quickstart(tmp_path), tracking_uri=None, experiment="qs-test")
    ids = [row.id for row in summary.rows]
    assert ids == ["source-pretrain", "pixels + svm", "random-init + svm", "pretrained + svm", "pretrained + finetune"]
    from mlflow import MlflowClient

    from tlkit import tracking

    client = MlflowClient(tracking.resolve_tracking_uri())
    experiment = client.get_experiment_by_name("qs-test")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(ids)
    by_name = {r.info.run_name: r for r in children}
    assert by_name["pretrained + svm"].data.params["weights"] == f"runs:/{by_name['source-pretrain'].info.run_id}"
    assert by_name["random-init + svm"].data.params["weights"] == "random(seed=0)"
    for row in summary.rows:
        assert 0 <= row.metrics["test_accuracy"] <= 1
    text = summary_text(summary)
    assert "pretrained + finetune" in text and summary.rows[0].run_id in text
    parent = client.get_run(summary.run_id)
    assert "pixels_svm.test_accuracy" in parent.data.metrics


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c["backbone"].update(modle="x"), "unknown key 'backbone.modle'; did you mean 'model'?"),
        (lambda c: c["stages"][0].update(stage="pretrian"), "stages.0"),
        (lambda c: c["stages"][1].update(data="nowhere"), "data 'nowhere' is not one of the datasets"),
        (lambda c: c["stages"][3].update(weights="later-stage"), "neither an earlier stage id"),
        (lambda c: c["stages"][0]["train"].update(epochs="many"), "stages.0.pretrain.train.epochs"),
    ],
)
def test_validation_errors_name_the_key(tmp_path, edit, message):
    config = yaml.safe_load((ROOT / "pipelines" / "quickstart.yaml").read_text())
    edit(config)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(TlkitError, match=message.replace("(", "\\(").replace(")", "\\)").replace("?", "\\?").replace(".", "\\.")):
        load_pipeline(path)
