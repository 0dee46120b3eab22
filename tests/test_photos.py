"""The shipped real-photo pipeline, in full (slow): ImageNet weights transfer to real photos; the default recipe's
fine-tuned network beats its own probe, the SVM, by at least 0.01 on the mean of 3 seeds, and what `tlkit finetune`
delivers (the network, its probe or their ensemble, whichever val prefers: tlkit.train.choice) is not worse than
either probe."""

import time
from pathlib import Path

import pytest

from tlkit.pipelines.pipeline import run_pipeline

PHOTOS = Path(__file__).resolve().parents[1] / "pipelines" / "photos.yaml"


@pytest.mark.slow
def test_photos_methods_over_three_seeds(workdir, capsys):
    pytest.importorskip("skimage")
    start = time.perf_counter()
    summary = run_pipeline(PHOTOS)
    minutes = (time.perf_counter() - start) / 60
    # one row per method; the sweep's rows are named by their strategy
    rows = {
        e.label if e.label != "finetune" else f"finetune {e.settings['train.strategy']}": e
        for e in summary.leaderboard.entries
    }
    with capsys.disabled():
        print(f"\nphotos.yaml, {minutes:.1f} min\nmethod                      mean   std    seeds")
        for label, e in rows.items():
            print(f"{label:26s}  {e.mean:.3f}  {e.std:.3f}  " + ", ".join(f"{v:.3f}" for v in e.values))
    mean = {label: e.mean for label, e in rows.items()}
    probe = max(mean["imagenet + svm"], mean["imagenet + logreg"])
    assert all(e.n == 3 for e in rows.values())
    assert probe - mean["pixels + svm"] > 0.3  # ImageNet features transfer to these photos, by a wide margin
    assert mean["default"] >= probe - 0.01  # what the default delivers keeps what the backbone knows
    # the default recipe's network alone (the sweep's freeze-unfreeze row keeps the fine-tune) beats its own probe
    assert mean["finetune freeze-unfreeze"] >= mean["imagenet + svm"] + 0.01
    assert minutes < 10
