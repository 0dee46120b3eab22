import csv
import os
import shutil
from collections import Counter

import numpy as np
import pytest

from tlkit.data.ingest import Manifest, format_report, ingest
from tlkit.errors import TlkitError


def test_class_folders_get_stratified_reproducible_splits(digits_source):
    manifest = ingest(digits_source, val=0.2, test=0.2, seed=3)
    assert manifest.classes == ["0", "1", "2"]
    per_class = Counter((r.label, r.split) for r in manifest.records)
    for label in manifest.classes:
        assert per_class[label, "val"] == 6
        assert per_class[label, "test"] == 6
        assert per_class[label, "train"] == 18
    assert ingest(digits_source, val=0.2, test=0.2, seed=3).records == manifest.records
    assert ingest(digits_source, val=0.2, test=0.2, seed=4).records != manifest.records


def test_records_carry_hash_and_size(digits_source):
    record = ingest(digits_source).records[0]
    assert len(record.sha256) == 64
    assert (record.width, record.height) == (32, 32)


def test_shots_label_few_images_and_test_on_the_rest(digits_target):
    manifest = ingest(digits_target, shots=4, val=0.25, seed=0)
    counts = Counter((r.label, r.split) for r in manifest.records)
    for label in manifest.classes:
        assert (counts[(label, "train")], counts[(label, "val")], counts[(label, "test")]) == (3, 1, 26)


def test_awkward_files_are_converted_or_skipped_with_reasons(awkward_images):
    manifest = ingest(awkward_images, val=0, test=0)
    kept = {r.path for r in manifest.records}
    assert {"a/grey.png", "a/palette.png", "a/rgba.png", "b/cmyk.jpg", "b/sixteen.png", "b/rotated.jpg"} <= kept
    reasons = {path.split("awkward/")[-1]: why for path, why in manifest.report.skipped}
    assert reasons["b/empty.png"] == "zero bytes"
    assert reasons["b/notes.txt"] == "not an image"
    assert reasons["a/truncated.jpg"] == "truncated"
    assert reasons["stray.png"] == "not inside a class folder"
    rotated = next(r for r in manifest.records if r.path == "b/rotated.jpg")
    assert (rotated.width, rotated.height) == (20, 30)
    assert any(set(group) == {"a/rgb.png", "b/duplicate_of_rgb.png"} for group in manifest.report.duplicates)
    assert any("different labels" in w for w in manifest.report.warnings)
    text = format_report(manifest)
    assert "zero bytes" in text
    assert "truncated" in text


def test_duplicates_stay_in_one_split_when_tlkit_splits(tmp_path, digits_source):
    root = shutil.copytree(digits_source, tmp_path / "d")
    for i, path in enumerate(sorted((root / "0").glob("*.png"))[:5]):
        shutil.copy(path, root / "0" / f"copy{i}.png")
    manifest = ingest(root, seed=0)
    for group in manifest.report.duplicates:
        assert len({r.split for r in manifest.records if r.path in group}) == 1
    assert not manifest.report.cross_split_duplicates


def test_pre_split_tree_keeps_given_splits_and_reports_leaks(tmp_path, digits_source):
    root = tmp_path / "split"
    for split, start, stop in (("train", 0, 20), ("val", 20, 25), ("test", 24, 30)):  # one image in val and test
        for label in ("0", "1"):
            (root / split / label).mkdir(parents=True)
            for path in sorted((digits_source / label).glob("*.png"))[start:stop]:
                shutil.copy(path, root / split / label / path.name)
    manifest = ingest(root)
    assert manifest.split_settings == {"splits": "given"}
    assert len(manifest.split("train")) == 40
    assert len(manifest.split("val")) == 10
    assert len(manifest.split("test")) == 12
    assert len(manifest.report.cross_split_duplicates) == 2
    assert any("more than one split" in w for w in manifest.report.warnings)


def _write_csv(path, rows, header=("path", "label", "split")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_with_and_without_splits(tmp_path, digits_source):
    files = sorted(digits_source.rglob("*.png"))
    rows = [
        (str(p.relative_to(digits_source)), p.parent.name, "train" if i % 3 else "test") for i, p in enumerate(files)
    ]
    given = ingest(_write_csv(digits_source / "given.csv", rows))
    assert len(given.split("test")) == len(files[::3])
    made = ingest(_write_csv(digits_source / "made.csv", [r[:2] for r in rows], header=("path", "label")), seed=0)
    assert len(made.split("train")) > len(made.split("val")) > 0
    assert made.fingerprint == given.fingerprint  # same paths, contents and labels
    (digits_source / "given.csv").unlink()
    (digits_source / "made.csv").unlink()


def test_csv_missing_path_is_skipped_and_missing_column_is_an_error(tmp_path, digits_source):
    files = sorted(digits_source.rglob("*.png"))[:40]
    rows = [(str(p), p.parent.name) for p in files] + [("nowhere.png", "0")]
    manifest = ingest(_write_csv(tmp_path / "a.csv", rows, header=("path", "label")))
    assert "nowhere.png" in manifest.report.skipped[0][0]
    assert manifest.report.skipped[0][1] == "file does not exist"
    with pytest.raises(TlkitError, match="lacks column.*label"):
        ingest(_write_csv(tmp_path / "b.csv", [(str(files[0]),)], header=("path",)))


def test_manifest_round_trip_and_fingerprint(tmp_path, digits_source):
    manifest = ingest(digits_source)
    path = manifest.save(tmp_path / "m.json")
    loaded = ingest(path)
    assert loaded.records == manifest.records
    assert loaded.fingerprint == manifest.fingerprint
    assert loaded.abspath(loaded.records[0]).exists()
    relabelled = Manifest(manifest.root, manifest.classes, list(manifest.records), "", manifest.report, "", {})
    from dataclasses import replace

    from tlkit.data.ingest import records_fingerprint

    relabelled.records[0] = replace(relabelled.records[0], label="1")
    assert records_fingerprint(relabelled.records) != manifest.fingerprint


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "no usable images"),
        (
            lambda p: (
                (p / "only" / "cls").mkdir(parents=True)
                or shutil.copy(next(p.parent.glob("**/*.png")), p / "only" / "cls")
                and p / "only"
            ),
            "one class only",
        ),
    ],
)
def test_bad_sources_are_one_line_errors(tmp_path, digits_source, make, match):
    shutil.copy(next(digits_source.rglob("*.png")), tmp_path.parent / "seed.png")
    with pytest.raises(TlkitError, match=match) as info:
        ingest(make(tmp_path))
    assert "\n" not in str(info.value)


def test_empty_class_folders_and_huge_images_are_reported(tmp_path, digits_source, monkeypatch):
    import tlkit.data.ingest as ingest_module

    root = tmp_path / "data"
    shutil.copytree(digits_source, root)
    (root / "empty_class").mkdir()
    (root / "only_junk").mkdir()
    (root / "only_junk" / "notes.txt").write_text("not an image")
    monkeypatch.setattr(ingest_module, "LARGE_IMAGE_PIXELS", 32 * 32 - 1)  # every 32 px digit counts as huge here
    manifest = ingest(root)
    assert manifest.classes == ["0", "1", "2"]
    assert manifest.report.empty_classes == ["empty_class", "only_junk"]
    assert len(manifest.report.large_images) == len(manifest.records)
    report = format_report(manifest)
    assert "class folder(s) with no usable image, left out of the dataset: empty_class, only_junk" in report
    assert "(32 x 32, 0 MP): each is decoded in full whenever it is read" in report


def test_a_really_huge_image_is_flagged_with_its_size(tmp_path, digits_source):
    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(digits_source, root)
    Image.new("L", (8000, 7000)).save(root / "0" / "huge.png")  # 56 megapixels, blank
    manifest = ingest(root)
    assert manifest.report.large_images == [("0/huge.png", 8000, 7000)]
    assert "0/huge.png (8000 x 7000, 56 MP)" in format_report(manifest)


def test_an_unchanged_folder_is_not_decoded_again_and_a_changed_file_is(tmp_path, digits_source, monkeypatch):
    from tlkit.data import ingest as ingest_module

    data = tmp_path / "data"
    shutil.copytree(digits_source, data)
    checked = []
    real = ingest_module._hash_and_inspect
    monkeypatch.setattr(ingest_module, "_hash_and_inspect", lambda path: checked.append(path) or real(path))
    cache = tmp_path / "cache"
    first = ingest(data, cache=cache)
    assert len(checked) == 90
    checked.clear()
    second = ingest(data, cache=cache)
    assert checked == []
    assert second.fingerprint == first.fingerprint
    assert second.records == first.records

    changed = sorted((data / "5").iterdir())[0] if (data / "5").exists() else sorted(next(data.iterdir()).iterdir())[0]
    from PIL import Image

    Image.fromarray(255 - np.asarray(Image.open(changed))).save(changed)  # same size on disk or not: mtime moves
    third = ingest(data, cache=cache)
    assert checked == [str(changed)]
    assert third.fingerprint != first.fingerprint
    assert {r.path: r.sha256 for r in third.records}[str(changed.relative_to(data))] != {
        r.path: r.sha256 for r in first.records
    }[str(changed.relative_to(data))]
    checked.clear()
    os.utime(changed, ns=(1, 1))  # touched back in time, contents as they were: checked again, same answer
    assert ingest(data, cache=cache).fingerprint == third.fingerprint
    assert checked == [str(changed)]
    checked.clear()
    ingest(data, cache=False)
    assert len(checked) == 90


def test_a_damaged_ingest_cache_is_recomputed_not_trusted(tmp_path, digits_source):
    cache = tmp_path / "cache"
    first = ingest(digits_source, cache=cache)
    for file in (cache / "ingest").glob("*.json"):
        file.write_text("{not json")
    assert ingest(digits_source, cache=cache).fingerprint == first.fingerprint
