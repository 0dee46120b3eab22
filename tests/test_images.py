import numpy as np
import pytest
from PIL import Image

from tlkit.data.images import BadImage, inspect_image, load_rgb, to_rgb


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_8bit_rgb(mode):
    base = Image.fromarray(np.arange(24 * 16, dtype=np.uint8).reshape(16, 24), "L").convert("RGB")
    image = (
        base.convert(mode)
        if mode not in ("I;16", "I", "F")
        else Image.fromarray(
            np.full((16, 24), 40000, np.uint16 if mode == "I;16" else np.int32 if mode == "I" else np.float32)
        )
    )
    out = to_rgb(image)
    assert out.mode == "RGB"
    assert out.size == (24, 16)


def test_sixteen_bit_is_scaled_not_clipped():
    image = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    value = np.asarray(to_rgb(image))[0, 0, 0]
    assert 120 <= value <= 136  # half of 65535 -> half of 255


def test_transparency_is_composited_onto_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(image)).min() == 255


def test_exif_orientation_is_honoured(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (30, 20), "red").save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_rgb(tmp_path / "r.jpg").shape == (30, 20, 3)  # displayed upright: 20 wide, 30 high
    assert inspect_image(tmp_path / "r.jpg") == (20, 30)


def test_bad_files_name_their_problem(awkward_images):
    reasons = {}
    for name in ("b/empty.png", "b/notes.txt", "a/truncated.jpg"):
        with pytest.raises(BadImage) as info:
            inspect_image(awkward_images / name)
        reasons[name] = info.value.reason
    assert reasons == {"b/empty.png": "zero bytes", "b/notes.txt": "not an image", "a/truncated.jpg": "truncated"}


@pytest.mark.parametrize("size", [(2400, 1600), (1600, 2400)])
def test_large_jpegs_are_decoded_at_the_side_the_transform_reads(tmp_path, size):
    rng = np.random.default_rng(0)
    path = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    reduced = load_rgb(path, 300)
    assert min(reduced.shape[:2]) == 300
    assert reduced.shape[1] / reduced.shape[0] == pytest.approx(size[0] / size[1], rel=0.01)
    assert np.array_equal(load_rgb(path, 300), reduced)  # deterministic: a cache may stand in for it
    small = tmp_path / "small.png"
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(small)
    assert np.array_equal(load_rgb(small, 300), load_rgb(small))  # never enlarged


def test_reduced_decode_keeps_the_picture(tmp_path):
    """draft + resize gives the picture a full decode + resize gives (JPEG's DCT scaling is not a crop)."""
    yy, xx = np.mgrid[0:1200, 0:1800]
    picture = np.stack([(xx / 7) % 255, (yy / 5) % 255, ((xx + yy) / 9) % 255], -1).astype(np.uint8)
    path = tmp_path / "smooth.jpg"
    Image.fromarray(picture).save(path, quality=95)
    fast = load_rgb(path, 200).astype(float)
    full = np.asarray(
        Image.fromarray(load_rgb(path)).resize((fast.shape[1], fast.shape[0]), Image.Resampling.BICUBIC)
    ).astype(float)
    assert np.abs(fast - full).mean() < 3
