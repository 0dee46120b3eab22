"""The selection split a tune's trials are scored on, and the held-out split they never see.

With train/val/test data the selection split is val and test is held out; with train/val only, the selection split
is carved out of train and val is held out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tlkit.config import TuneConfig
from tlkit.data.ingest import Manifest, carve, records_fingerprint
from tlkit.errors import TlkitError

SELECTION_FRACTION = TuneConfig().selection  # of each class's training images, when the data has no test split


@dataclass
class TuneSplits:
    """What trials see, and what the best recipe retrains on and is scored on."""

    trials: Manifest  # train + selection (as its "val" split); no held-out image is in it
    final: Manifest  # the data of the final retrain
    final_use_val: str  # "train": val joins train and test is held out; "select": val is held out
    heldout: str  # the split that the reported figure is on
    selection: str  # what the selection split is, in words


def tune_splits(manifest: Manifest, *, fraction: float = SELECTION_FRACTION, seed: int = 0) -> TuneSplits:
    """The selection split that trials are scored on, and the held-out split they never see."""
    train, val, test = (manifest.split(s) for s in ("train", "val", "test"))
    if not train:
        raise TlkitError("the training split is empty; ingest with smaller --val/--test or give a train/ folder")
    if test:
        if not val:
            raise TlkitError(
                "tune scores trials on the val split and reports on test, but this data has no val split; ingest with "
                "--val > 0"
            )
        records = [r for r in manifest.records if r.split != "test"]
        trials = replace(
            manifest,
            records=records,
            fingerprint=records_fingerprint(records),
            split_settings={**manifest.split_settings, "tune": "test left out"},
        )
        return TuneSplits(
            trials=trials, final=manifest, final_use_val="train", heldout="test", selection="the val split"
        )
    if not val:
        raise TlkitError(
            "tune needs a held-out split to report on and this data has only train; ingest with --val or --test > 0"
        )
    selected = carve(train, fraction, seed)
    if not selected:
        raise TlkitError(
            "too few training images to carve a selection split out of train (a class needs 2 or more); add images or "
            "a test split"
        )
    records = [replace(r, split="val") if r.path in selected else r for r in train]
    trials = replace(
        manifest,
        records=records,
        fingerprint=records_fingerprint(records),
        split_settings={
            **manifest.split_settings,
            "tune": f"selection = {fraction:.0%} of train (seed {seed}); val left out",
        },
    )
    return TuneSplits(
        trials=trials,
        final=manifest,
        final_use_val="select",
        heldout="val",
        selection=f"{len(selected)} images ({fraction:.0%} of each class) carved out of train",
    )
