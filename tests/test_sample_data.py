import pytest
from PIL import Image

from tlkit.errors import TlkitError
from tlkit.sample_data import parse_classes, write_digits


def test_writes_requested_classes_and_sizes(tmp_path):
    counts = write_digits(tmp_path, classes="3-4", per_class=5, size=24, seed=1)
    assert counts == {"3": 5, "4": 5}
    files = sorted(tmp_path.rglob("*.png"))
    assert len(files) == 10 and {f.parent.name for f in files} == {"3", "4"}
    assert Image.open(files[0]).size == (24, 24)


def test_all_digits_by_default(tmp_path):
    counts = write_digits(tmp_path, size=8)
    assert sum(counts.values()) == 1797 and len(counts) == 10


def test_subsample_is_seeded(tmp_path):
    write_digits(tmp_path / "a", classes="1", per_class=3, seed=7)
    write_digits(tmp_path / "b", classes="1", per_class=3, seed=7)
    assert sorted(p.name for p in (tmp_path / "a").rglob("*.png")) == sorted(p.name for p in (tmp_path / "b").rglob("*.png"))


@pytest.mark.parametrize("spec,expected", [("0-4", [0, 1, 2, 3, 4]), ("5,7,9", [5, 7, 9]), ("1-2,8", [1, 2, 8]), (None, list(range(10)))])
def test_parse_classes(spec, expected):
    assert parse_classes(spec) == expected


@pytest.mark.parametrize("spec", ["3-12", "a-b", "-1"])
def test_parse_classes_rejects_bad_specs(spec):
    with pytest.raises(TlkitError, match="classes"):
        parse_classes(spec)
