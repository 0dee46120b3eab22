"""The shipped quickstart, in full: pretraining on digits 0-4 must transfer to digits 5-9."""

import time
from pathlib import Path

import pytest

from tlkit.pipeline import run_pipeline

QUICKSTART = Path(__file__).resolve().parents[1] / "pipelines" / "quickstart.yaml"


@pytest.mark.slow
def test_quickstart_pretraining_transfers(workdir):
    start = time.perf_counter()
    summary = run_pipeline(QUICKSTART)
    minutes = (time.perf_counter() - start) / 60
    accuracy = {row.id: row.metrics["test_accuracy"] for row in summary.rows}
    print(accuracy, f"{minutes:.1f} min")
    assert accuracy["source-pretrain"] > 0.9  # the source task itself is learned
    assert accuracy["pretrained + svm"] - accuracy["random-init + svm"] > 0.3  # features transfer, by a wide margin
    assert accuracy["pretrained + finetune"] > accuracy["random-init + svm"]
    assert accuracy["pixels + svm"] > 0.5  # reported as it is, even where it wins
    assert minutes < 8


def _with_seed(config: dict, seed: int, pretrain_run: str | None) -> dict:
    import copy

    config = copy.deepcopy(config)
    config["datasets"]["target"]["seed"] = seed
    stages = []
    for stage in config["stages"]:
        if stage["stage"] == "pretrain" and pretrain_run:
            continue
        if pretrain_run and stage.get("weights") == "source-pretrain":
            stage["weights"] = pretrain_run
        for section in ("train", "baseline"):
            if section in stage:
                stage[section]["seed"] = seed
        augment = stage.get("train", {}).get("augment", "")
        if augment.endswith(".yaml"):  # the copy lives elsewhere: pin the file the original names
            stage["train"]["augment"] = str(QUICKSTART.parent / augment)
        stages.append(stage)
    config["stages"] = stages
    return config


@pytest.mark.slow
def test_quickstart_methods_over_three_seeds(workdir, capsys):
    """One source-pretrained backbone; the target task's split and training seed vary (0, 1, 2)."""
    import numpy as np
    import yaml

    base = yaml.safe_load(QUICKSTART.read_text())
    scores: dict[str, list[float]] = {}
    pretrain_run = None
    for seed in (0, 1, 2):
        path = workdir / f"seed{seed}.yaml"
        path.write_text(yaml.safe_dump(_with_seed(base, seed, pretrain_run)))
        summary = run_pipeline(path)
        for row in summary.rows:
            if row.stage == "pretrain":
                pretrain_run = f"runs:/{row.run_id}"
            else:
                scores.setdefault(row.id, []).append(row.metrics["test_accuracy"])
    with capsys.disabled():
        print("\nmethod                  mean   std    seeds 0, 1, 2")
        for method, values in scores.items():
            print(f"{method:22s}  {np.mean(values):.3f}  {np.std(values):.3f}  " + ", ".join(f"{v:.3f}" for v in values))
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    assert mean["pretrained + svm"] - mean["random-init + svm"] > 0.3
    assert mean["pretrained + finetune"] > mean["pretrained + svm"]
