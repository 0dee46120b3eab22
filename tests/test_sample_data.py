import pytest
from PIL import Image

from tlkit.data.samples import parse_classes, write_digits
from tlkit.errors import TlkitError


def test_writes_requested_classes_and_sizes(tmp_path):
    counts = write_digits(tmp_path, classes="3-4", per_class=5, size=24, seed=1)
    assert counts == {"3": 5, "4": 5}
    files = sorted(tmp_path.rglob("*.png"))
    assert len(files) == 10
    assert {f.parent.name for f in files} == {"3", "4"}
    assert Image.open(files[0]).size == (24, 24)


def test_all_digits_by_default(tmp_path):
    counts = write_digits(tmp_path, size=8)
    assert sum(counts.values()) == 1797
    assert len(counts) == 10


def test_subsample_is_seeded(tmp_path):
    write_digits(tmp_path / "a", classes="1", per_class=3, seed=7)
    write_digits(tmp_path / "b", classes="1", per_class=3, seed=7)
    assert sorted(p.name for p in (tmp_path / "a").rglob("*.png")) == sorted(
        p.name for p in (tmp_path / "b").rglob("*.png")
    )


@pytest.mark.parametrize(
    "spec,expected", [("0-4", [0, 1, 2, 3, 4]), ("5,7,9", [5, 7, 9]), ("1-2,8", [1, 2, 8]), (None, list(range(10)))]
)
def test_parse_classes(spec, expected):
    assert parse_classes(spec) == expected


@pytest.mark.parametrize("spec", ["3-12", "a-b", "-1"])
def test_parse_classes_rejects_bad_specs(spec):
    with pytest.raises(TlkitError, match="classes"):
        parse_classes(spec)


def test_photo_crops_of_different_splits_never_overlap():
    import numpy as np

    from tlkit.data.samples import crop_boxes

    boxes = crop_boxes(451, 300, crop=64, counts=(50, 50, 50), rng=np.random.default_rng(0))
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        for left, top, right, bottom in boxes[a]:
            for left2, top2, right2, bottom2 in boxes[b]:
                assert right <= left2 or right2 <= left or bottom <= top2 or bottom2 <= top, (a, b)
    with pytest.raises(TlkitError, match="--crop 128 does not fit the val band"):
        crop_boxes(451, 300, crop=128, counts=(1, 1, 1), rng=np.random.default_rng(0))


def test_photos_are_a_pre_split_tree_of_real_crops(tmp_path):
    pytest.importorskip("skimage")
    from tlkit.data.ingest import ingest
    from tlkit.data.samples import PHOTO_SOURCES, write_photos

    written = write_photos(tmp_path, crop=32, counts=(3, 2, 4), seed=1)
    assert written["test"] == {label: 4 for label in PHOTO_SOURCES}
    manifest = ingest(tmp_path)
    assert manifest.split_settings == {"splits": "given"}
    assert len(manifest.classes) == 8
    assert Image.open(sorted(tmp_path.rglob("*.png"))[0]).size == (32, 32)
    first = sorted(p.read_bytes() for p in tmp_path.rglob("*.png"))
    write_photos(tmp_path / "again", crop=32, counts=(3, 2, 4), seed=1)
    assert sorted(p.read_bytes() for p in (tmp_path / "again").rglob("*.png")) == first  # a seed gives the same crops
