import math

import numpy as np
import pytest
import torch

from tlkit.data import augment
from tlkit.errors import TlkitError

CONFIG = {
    "input_size": (3, 32, 32),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}


def test_eval_transform_resizes_crops_and_normalises():
    image = np.full((50, 80, 3), 255, np.uint8)
    out = augment.apply(augment.eval_transform(CONFIG), image)
    assert out.shape == (3, 32, 32)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, (1.0 - 0.5) / 0.25))


@pytest.mark.parametrize("preset", augment.PRESETS)
def test_presets_produce_the_input_size(preset):
    out = augment.apply(augment.train_transform(CONFIG, preset), np.zeros((40, 60, 3), np.uint8))
    assert out.shape == (3, 32, 32)


def test_yaml_round_trip(tmp_path):
    transform = augment.train_transform(CONFIG, "heavy", hflip=False)
    path = augment.to_yaml(transform, tmp_path / "t.yaml")
    loaded = augment.resolve_train_transform(CONFIG, str(path))
    assert augment.to_dict(loaded) == augment.to_dict(transform)
    assert "HorizontalFlip" not in path.read_text()


def test_unknown_preset_and_bad_file():
    with pytest.raises(TlkitError, match="choose one of none, light"):
        augment.resolve_train_transform(CONFIG, "extreme")
    with pytest.raises(TlkitError, match="does not exist"):
        augment.load_transform("missing.yaml")


def test_augment_only_yaml_gets_the_backbones_resize_and_normalisation(tmp_path):
    import albumentations as A

    A.save(A.Compose([A.Affine(rotate=(-5, 5), p=1.0)]), str(tmp_path / "aug.yaml"), data_format="yaml")
    transform = augment.resolve_train_transform(CONFIG, str(tmp_path / "aug.yaml"))
    assert [type(t).__name__ for t in transform.transforms] == ["Affine", "Resize", "Normalize", "ToTensorV2"]
    assert augment.apply(transform, np.zeros((50, 40, 3), np.uint8)).shape == (3, 32, 32)


def test_decode_side_covers_what_each_transform_reads():
    config = {**CONFIG, "input_size": (3, 224, 224), "crop_pct": 0.875}
    assert augment.decode_side(augment.eval_transform(config)) == augment.eval_side(config) == 256
    light, heavy = (augment.decode_side(augment.train_transform(config, p)) for p in ("light", "heavy"))
    assert 256 < light < heavy  # smaller random crops need more of the image
    assert heavy == math.ceil(224 / math.sqrt(0.25 * 3 / 4))
