"""Image folder / pre-split tree / CSV / manifest -> Manifest (rows, splits, fingerprint, report)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from tlkit.core.files import printable
from tlkit.data.images import BadImage, frame_count, inspect_image
from tlkit.errors import TlkitError

SPLITS = ("train", "val", "test")
MANIFEST_FORMAT = "tlkit-manifest/1"
FEW_IMAGES = 5  # a class with fewer images than this is flagged in the report
IMBALANCE = 3.0  # largest / smallest class above this is flagged
LARGE_IMAGE_PIXELS = 50_000_000  # above this an image is flagged: it is decoded in full whenever it is read


@dataclass(frozen=True)
class ImageRecord:
    """One usable image: `path` is relative to the manifest's root."""

    path: str
    label: str
    split: str
    sha256: str
    width: int
    height: int


@dataclass
class IngestReport:
    """What ingest found: counts, skipped files with reasons, duplicates, warnings."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> split -> n
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicates: list[list[str]] = field(default_factory=list)  # groups of identical files
    cross_split_duplicates: list[list[str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)  # class folders with no usable image
    large_images: list[tuple[str, int, int]] = field(default_factory=list)  # (path, width, height)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> IngestReport:
        data = dict(data)
        data["skipped"] = [tuple(item) for item in data.get("skipped", [])]
        data["large_images"] = [tuple(item) for item in data.get("large_images", [])]
        return cls(**data)


@dataclass
class Manifest:
    """A dataset as tlkit sees it: images with labels and splits, identified by `fingerprint`.

    The fingerprint hashes every image's path, content and label, so a run records exactly which
    data it saw; `split_settings` records how the splits were made.
    """

    root: Path
    classes: list[str]
    records: list[ImageRecord]
    fingerprint: str
    report: IngestReport
    source: str
    split_settings: dict

    def split(self, name: str) -> list[ImageRecord]:
        return [r for r in self.records if r.split == name]

    def abspath(self, record: ImageRecord) -> Path:
        return self.root / record.path

    def labels(self, records: list[ImageRecord] | None = None) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[r.label] for r in (self.records if records is None else records)], dtype=np.int64)

    def with_val_as_train(self) -> Manifest:
        """The same images with the val split moved into train (fingerprint unchanged: same data)."""
        records = [replace(r, split="train") if r.split == "val" else r for r in self.records]
        return replace(self, records=records, split_settings={**self.split_settings, "val_trained_on": True})

    @property
    def eval_split(self) -> str:
        """The held-out split that results are reported on: test, or val when there is no test."""
        return "test" if self.split("test") else "val"

    def save(self, path: Path) -> Path:
        data = {
            "format": MANIFEST_FORMAT,
            "root": str(self.root),
            "source": self.source,
            "classes": self.classes,
            "fingerprint": self.fingerprint,
            "split_settings": self.split_settings,
            "report": self.report.to_dict(),
            "images": [asdict(r) for r in self.records],
        }
        from tlkit.core.files import write_text

        # ASCII: a file name that is not UTF-8 is kept as \udcXX escapes
        return write_text(path, json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise TlkitError(f"cannot read manifest {path}: {err}; re-create it with `tlkit ingest`") from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise TlkitError(
                f"{path} is not a tlkit manifest; pass an image folder, a CSV, or a file from `tlkit ingest`"
            )
        return cls(
            root=Path(data["root"]),
            classes=list(data["classes"]),
            records=[ImageRecord(**r) for r in data["images"]],
            fingerprint=data["fingerprint"],
            report=IngestReport.from_dict(data["report"]),
            source=data["source"],
            split_settings=data["split_settings"],
        )


# ----------------------------------------------------------------------------------------------
# Reading the three input layouts into (relative path, label, split or None) candidates.


def _list_files(folder: Path, skipped: list | None = None) -> list[Path]:
    """Files under `folder`, symbolic links to files included. Links to folders are not followed (one can loop back);
    they, broken links and links that loop are reported in `skipped`."""
    files = []
    for p in folder.rglob("*"):
        if p.is_file():
            files.append(p)
        elif p.is_symlink() and skipped is not None:
            skipped.append(
                (str(p), "symbolic link to a folder, not followed" if p.is_dir() else "broken or looping symbolic link")
            )
    return sorted(files)


def class_folders(root: Path) -> list[str]:
    """Names of the class folders directly under `root` (hidden folders excluded)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_tree(root: Path, split: str | None, skipped: list) -> list[tuple[str, str, str | None]]:
    rows = []
    for path in _list_files(root, skipped):
        rel = path.relative_to(root)
        if len(rel.parts) < 2:
            skipped.append((str(path), "not inside a class folder"))
            continue
        rows.append((str(path), rel.parts[0], split))
    return rows


def _read_csv(csv_path: Path, skipped: list) -> list[tuple[str, str, str | None]]:
    try:
        with open(csv_path, newline="") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in ("path", "label") if c not in columns]
            if missing:
                raise TlkitError(
                    f"CSV {csv_path} lacks column(s) {', '.join(missing)} (found: {', '.join(columns) or 'none'}); "
                    "the header must be path,label[,split]"
                )
            rows = []
            for line, row in enumerate(reader, start=2):
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                if not row.get("path") or not row.get("label"):
                    skipped.append((f"{csv_path}:{line}", "empty path or label"))
                    continue
                split = row.get("split") or None
                if split is not None and split not in SPLITS:
                    raise TlkitError(f"CSV {csv_path} line {line}: split {split!r} is not one of train, val, test")
                rows.append((str((csv_path.parent / row["path"])), row["label"], split))
            return rows
    except UnicodeDecodeError:
        raise TlkitError(f"{csv_path} is not a text CSV; give a CSV with the header path,label[,split]") from None


def _candidates(source: Path, skipped: list) -> tuple[Path, list[tuple[str, str, str | None]], str]:
    """Return (root, rows of (absolute path, label, split), layout name)."""
    if source.is_file() and source.suffix.lower() == ".csv":
        return source.parent.resolve(), _read_csv(source, skipped), "csv"
    subdirs = {p.name for p in source.iterdir() if p.is_dir()}
    if {"train", "val"} <= subdirs or {"train", "test"} <= subdirs:
        rows = []
        for split in SPLITS:
            if split in subdirs:
                rows += _class_tree(source / split, split, skipped)
        for extra in sorted(subdirs - set(SPLITS)):
            skipped.append((str(source / extra), "folder beside train/val/test ignored"))
        return source.resolve(), rows, "pre-split"
    return source.resolve(), _class_tree(source, None, skipped), "class-folders"


# ----------------------------------------------------------------------------------------------
# Checking files, making splits, reporting.


def _expected_classes(source: Path, layout: str) -> list[str]:
    """Class names the layout promises (folder names), whether or not they hold usable images."""
    if layout == "class-folders":
        return class_folders(source)
    if layout == "pre-split":
        return sorted({name for split in SPLITS if (source / split).is_dir() for name in class_folders(source / split)})
    return []


def _hash_and_inspect(path: str) -> tuple[str, int, int, int] | str:
    """(sha256, width, height, frames) of a usable image, or the reason it is not usable."""
    p = Path(path)
    if not p.exists():
        return "file does not exist"
    try:
        size = inspect_image(p)
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        frames = frame_count(p) if p.suffix.lower() in (".gif", ".webp", ".png", ".apng", ".tif", ".tiff") else 1
    except BadImage as bad:
        return bad.reason
    except OSError as err:
        return f"unreadable ({err})"
    return digest, size[0], size[1], frames


def _check_files(root: Path, paths: list[str], *, workers: int, cache: str | os.PathLike | None | bool) -> list:
    """`_hash_and_inspect` for every path, reusing the answers of an earlier ingest for unchanged files.

    The answers are kept per dataset root in the cache folder, keyed by (absolute path, size, mtime,
    ctime): any write, copy-over, touch or chmod of a file changes one of them, and only that file is
    decoded and hashed again. `cache=False` checks everything and keeps nothing.
    """
    from tlkit.core.cache import cache_dir, read_json, write_json

    store = (
        None
        if cache is False
        else cache_dir(None if cache is True else cache)
        / "ingest"
        / f"{hashlib.sha256(str(root).encode()).hexdigest()[:20]}.json"
    )
    known = (read_json(store) or {}) if store is not None else {}
    results: list = [None] * len(paths)
    stamps: list = [None] * len(paths)
    todo = []
    for i, path in enumerate(paths):
        key = os.path.abspath(path)
        try:
            st = os.stat(key)
            stamps[i] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        except OSError:
            pass
        entry = known.get(key)
        if entry is not None and stamps[i] is not None and entry[:3] == stamps[i]:
            results[i] = entry[3] if isinstance(entry[3], str) else tuple(entry[3])
        else:
            todo.append(i)
    if todo:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, result in zip(todo, pool.map(_hash_and_inspect, [paths[i] for i in todo])):
                results[i] = result
    if store is not None and (todo or len(known) != len(paths)):
        fresh = {
            os.path.abspath(p): [*stamp, result]
            for p, stamp, result in zip(paths, stamps, results)
            if stamp is not None
        }
        try:
            write_json(store, fresh)
        except OSError:  # a read-only or full cache folder: ingest still works, only slower next time
            pass
    return results


def _split_counts(n: int, val: float, test: float) -> tuple[int, int]:
    """How many of `n` groups go to val and test; at least one always stays in train."""
    n_test = int(round(n * test))
    n_val = int(round(n * val))
    if test > 0 and n_test == 0 and n >= 3:
        n_test = 1
    if val > 0 and n_val == 0 and n >= 2 + (n_test > 0):
        n_val = 1
    while n_test + n_val > n - 1 and (n_test or n_val):
        if n_test >= n_val and n_test:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def groups_by_class(items: list[tuple[str, str, object]]) -> dict[str, list[list]]:
    """(label, content digest, value) items -> per class (sorted), the values grouped by identical content (groups
    sorted by digest): what a split draws from, so identical images always land in the same split."""
    by_class: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for label, digest, value in items:
        by_class[label][digest].append(value)
    return {label: [by_class[label][d] for d in sorted(by_class[label])] for label in sorted(by_class)}


def carve(records: list, fraction: float, seed: int) -> set[str]:
    """Paths of about `fraction` of each class's training images (at least one of a class with two or more),
    identical images kept together."""
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for groups in groups_by_class([(r.label, r.sha256, r.path) for r in records]).values():
        if len(groups) < 2:
            continue
        n = min(len(groups) - 1, max(1, round(fraction * len(groups))))
        for i in rng.permutation(len(groups))[:n]:
            chosen.update(groups[i])
    return chosen


def _make_splits(rows: list[tuple], *, val: float, test: float, seed: int, shots: int | None) -> list[str]:
    """Stratified, seeded splits; identical files (same hash) always land in the same split.

    With `shots`, only that many images per class are labelled (train + val, val taken as the
    fraction `val` of them) and all the others become the test set: the few-label setting.
    """
    rng = np.random.default_rng(seed)
    splits = ["train"] * len(rows)
    for groups in groups_by_class([(label, digest, i) for i, (_, label, _, digest) in enumerate(rows)]).values():
        order = rng.permutation(len(groups))
        if shots is not None:
            labelled = min(shots, len(groups))
            n_val, _ = _split_counts(labelled, val, 0.0)
            names = ["val"] * n_val + ["train"] * (labelled - n_val) + ["test"] * (len(groups) - labelled)
        else:
            n_val, n_test = _split_counts(len(groups), val, test)
            names = ["test"] * n_test + ["val"] * n_val + ["train"] * (len(groups) - n_test - n_val)
        for name, g in zip(names, order):
            for i in groups[g]:
                splits[i] = name
    return splits


def records_fingerprint(records: list[ImageRecord]) -> str:
    digest = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.path):
        # names need not be UTF-8
        digest.update(f"{r.path}\t{r.sha256}\t{r.label}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def _report(records: list[ImageRecord], classes: list[str], skipped: list, folders: list[str]) -> IngestReport:
    report = IngestReport(skipped=skipped)
    report.empty_classes = [name for name in folders if name not in classes]
    if report.empty_classes:
        report.warnings.append(
            f"class folder(s) with no usable image, left out of the dataset: {', '.join(report.empty_classes)}; "
            "fill them or remove them"
        )
    report.large_images = [(r.path, r.width, r.height) for r in records if r.width * r.height > LARGE_IMAGE_PIXELS]
    if report.large_images:
        path, width, height = max(report.large_images, key=lambda item: item[1] * item[2])
        report.warnings.append(
            f"{len(report.large_images)} image(s) above {LARGE_IMAGE_PIXELS // 1_000_000} megapixels, the largest "
            f"{path} ({width} x {height}, {width * height / 1e6:.0f} MP): each is decoded in full whenever it is read "
            "(every epoch), which is slow and memory-hungry; downscale them (the model sees at most a few hundred "
            "pixels a side)"
        )
    for c in classes:
        report.counts[c] = {s: 0 for s in SPLITS}
    for r in records:
        report.counts[r.label][r.split] += 1
    by_hash: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        by_hash[r.sha256].append(r)
    for group in by_hash.values():
        if len(group) > 1:
            report.duplicates.append([r.path for r in group])
            if len({r.split for r in group}) > 1:
                report.cross_split_duplicates.append([f"{r.path} ({r.split})" for r in group])
            if len({r.label for r in group}) > 1:
                report.warnings.append(
                    "identical images with different labels: " + ", ".join(f"{r.path}={r.label}" for r in group)
                )
    totals = {c: sum(report.counts[c].values()) for c in classes}
    few = [c for c in classes if totals[c] < FEW_IMAGES]
    if few:
        report.warnings.append(f"classes with fewer than {FEW_IMAGES} images: {', '.join(few)}")
    no_train = [c for c in classes if report.counts[c]["train"] == 0]
    if no_train:
        report.warnings.append(f"classes with no training image: {', '.join(no_train)}")
    if totals and min(totals.values()) > 0 and max(totals.values()) / min(totals.values()) > IMBALANCE:
        big, small = max(totals, key=totals.__getitem__), min(totals, key=totals.__getitem__)
        report.warnings.append(
            f"imbalanced classes: {big} has {totals[big]} images, {small} has {totals[small]} "
            f"(ratio {totals[big] / totals[small]:.1f})"
        )
    if report.cross_split_duplicates:
        report.warnings.append(
            f"{len(report.cross_split_duplicates)} identical image(s) appear in more than one split (leaks into "
            "evaluation)"
        )
    return report


def ingest(
    source: str | os.PathLike,
    *,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    shots: int | None = None,
    workers: int = 8,
    cache: str | os.PathLike | None | bool = None,
) -> Manifest:
    """Read a dataset, check every file, and return its Manifest.

    Args:
        source: a class-per-folder tree, a tree with train/ val/ [test/] each holding class
            folders, a CSV with the header ``path,label[,split]`` (paths relative to the CSV),
            or a manifest written by :func:`ingest` (returned as it is).
        val, test: fractions of each class for the splits that the source does not give.
        seed: seed of those splits.
        shots: label only this many images per class (train + val); the rest become test.
        workers: threads that decode and hash images.
        cache: where earlier answers for unchanged files are kept (default: tlkit's cache folder);
            False checks every file again.

    Raises:
        TlkitError: the source does not exist, holds no usable images, or has one class only.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise TlkitError(
            f"data path {str(source)!r} does not exist; give an image folder, a CSV (path,label[,split]) "
            "or a manifest from `tlkit ingest`"
        )
    if source.is_file() and source.suffix.lower() == ".json":
        return Manifest.load(source)
    if source.is_file() and source.suffix.lower() != ".csv":
        raise TlkitError(f"{source} is neither a folder, a .csv nor a .json manifest; see `tlkit ingest --help`")
    _check_split_settings(val=val, test=test, shots=shots)
    skipped: list[tuple[str, str]] = []
    root, rows, layout = _candidates(source, skipped)
    folders = _expected_classes(source, layout)
    checked = _check_files(root, [path for path, _, _ in rows], workers=workers, cache=cache)
    good = []
    for (path, label, split), result in zip(rows, checked):
        if isinstance(result, str):
            skipped.append((path, result))
        else:
            good.append((path, label, split, *result))
    if not good:
        why = f"; {len(skipped)} file(s) skipped, e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise TlkitError(f"no usable images found in {source}{why}; expected class folders of images, or a CSV")
    classes = sorted({label for _, label, _, *_ in good})
    if len(classes) < 2:
        raise TlkitError(f"{source} has one class only ({classes[0]!r}); a classifier needs at least two class folders")

    splits, split_settings = _assign_splits(good, source, val=val, test=test, seed=seed, shots=shots)
    records, animated = _records(good, splits, root)
    report = _report(records, classes, skipped, folders)
    if animated:
        report.warnings.append(
            f"{len(animated)} image(s) with several frames (animated GIF, WebP or PNG, multi-page TIFF), e.g. "
            f"{animated[0][0]} ({animated[0][1]} frames): the first frame is used"
        )
    return Manifest(
        root=root,
        classes=classes,
        records=records,
        fingerprint=records_fingerprint(records),
        report=report,
        source=f"{layout}:{source.resolve()}",
        split_settings=split_settings,
    )


def _check_split_settings(*, val: float, test: float, shots: int | None) -> None:
    for name, value in (("val", val), ("test", test)):
        if not 0 <= value < 1:
            raise TlkitError(f"--{name} must be a fraction in [0, 1), got {value}")
    if val + test >= 1:
        raise TlkitError(f"--val + --test must leave images for training, got {val} + {test}")
    if shots is not None and shots < 1:
        raise TlkitError(f"--shots must be at least 1, got {shots}")


def _assign_splits(
    good: list[tuple], source: Path, *, val: float, test: float, seed: int, shots: int | None
) -> tuple[list[str], dict[str, object]]:
    """Each checked image's split: the source's own when it gives them all, else made per class; and how."""
    given = [split for _, _, split, *_ in good]
    if all(s is not None for s in given):
        if shots is not None:
            raise TlkitError(
                "--shots makes the splits, but the data already gives them; drop --shots or the split column"
            )
        return given, {"splits": "given"}
    if any(s is not None for s in given):
        raise TlkitError(f"some rows of {source} give a split and some do not; give it for every row or for none")
    splits = _make_splits([(p, lab, s, d) for p, lab, s, d, *_ in good], val=val, test=test, seed=seed, shots=shots)
    return splits, {"splits": "made", "val": val, "test": test, "seed": seed, "shots": shots}


def _records(good: list[tuple], splits: list[str], root: Path) -> tuple[list[ImageRecord], list[tuple[str, int]]]:
    """The manifest's records (paths relative to `root`, sorted) and the images of several frames (path, frames)."""
    records, animated = [], []
    for (path, label, _, digest, width, height, *frames), split in zip(good, splits):
        rel = os.path.relpath(path, root)
        records.append(ImageRecord(path=rel, label=label, split=split, sha256=digest, width=width, height=height))
        if frames and frames[0] > 1:
            animated.append((rel, frames[0]))
    records.sort(key=lambda r: r.path)
    return records, animated


def format_report(manifest: Manifest, *, max_items: int = 10) -> str:
    """The report as plain text for the terminal and for MLflow (a name's bytes that are not UTF-8 shown as \\xNN)."""
    report = manifest.report
    lines = [f"dataset {manifest.source}  fingerprint {manifest.fingerprint}", ""]
    width = max(len(c) for c in manifest.classes + ["class"])
    lines.append(f"{'class':<{width}}  {'train':>6} {'val':>6} {'test':>6} {'total':>6}")
    totals: Counter[str] = Counter()
    for c in manifest.classes:
        row = report.counts[c]
        totals.update(row)
        lines.append(f"{c:<{width}}  {row['train']:>6} {row['val']:>6} {row['test']:>6} {sum(row.values()):>6}")
    lines.append(
        f"{'all':<{width}}  {totals['train']:>6} {totals['val']:>6} {totals['test']:>6} {sum(totals.values()):>6}"
    )
    if report.skipped:
        lines += ["", f"skipped {len(report.skipped)} file(s):"]
        lines += [f"  {path}: {reason}" for path, reason in report.skipped[:max_items]]
        if len(report.skipped) > max_items:
            lines.append(f"  ... and {len(report.skipped) - max_items} more (all in the manifest's report)")
    if report.duplicates:
        lines += ["", f"{len(report.duplicates)} group(s) of identical files:"]
        lines += [f"  {' = '.join(group)}" for group in report.duplicates[:max_items]]
    if report.warnings:
        lines += [""] + [f"warning: {w}" for w in report.warnings]
    return printable("\n".join(lines))
