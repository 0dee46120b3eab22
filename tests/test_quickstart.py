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
