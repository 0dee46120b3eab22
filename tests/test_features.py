import numpy as np
from conftest import TINY_MODEL

from tlkit.config import ComputeConfig
from tlkit.data.ingest import ingest
from tlkit.features import extract as feats
from tlkit.models.backbone import create_backbone


def test_extract_caches_by_model_weights_and_data(workdir, digits_source, monkeypatch):
    manifest = ingest(digits_source)
    backbone = create_backbone(TINY_MODEL, img_size=32)
    first = feats.extract_features(
        manifest, backbone, compute=ComputeConfig(batch_size=32, num_workers=0), progress=False
    )
    assert first.X.shape == (90, backbone.num_features)
    assert not first.cached
    assert np.isfinite(first.X).all()
    assert first.X.std() > 0
    assert list(first.y) == list(manifest.labels())

    def refuse(*args, **kwargs):
        raise AssertionError("the second identical call must read the cache")

    monkeypatch.setattr("tlkit.features.forward.forward_loader", refuse)
    second = feats.extract_features(
        manifest, backbone, compute=ComputeConfig(batch_size=32, num_workers=0), progress=False
    )
    assert second.cached
    assert np.array_equal(second.X, first.X)
    assert second.key == first.key
    other = create_backbone(TINY_MODEL, img_size=32, seed=9)
    monkeypatch.undo()
    monkeypatch.chdir(workdir)
    third = feats.extract_features(manifest, other, compute=ComputeConfig(batch_size=32, num_workers=0), progress=False)
    assert not third.cached
    assert third.key != first.key


def test_features_match_a_plain_forward_pass(workdir, digits_source):
    import torch

    from tlkit.data import augment
    from tlkit.data.images import load_rgb

    manifest = ingest(digits_source)
    backbone = create_backbone(TINY_MODEL, img_size=32)
    got = feats.extract_features(
        manifest, backbone, compute=ComputeConfig(precision="32-true", num_workers=0), progress=False
    )
    transform = augment.eval_transform(backbone.data_config)
    batch = torch.stack([augment.apply(transform, load_rgb(manifest.abspath(r))) for r in manifest.records[:4]])
    with torch.no_grad():
        expected = backbone.model.eval()(batch).numpy()
    np.testing.assert_allclose(got.X[:4], expected, rtol=1e-4, atol=1e-5)


def test_split_subsets_and_pixel_features(workdir, digits_source):
    manifest = ingest(digits_source)
    pixels = feats.pixel_features(manifest, size=8)
    assert pixels.X.shape == (90, 8 * 8 * 3)
    assert 0 <= pixels.X.min()
    assert pixels.X.max() <= 1
    X, y = pixels.subset("train")
    assert len(X) == len(manifest.split("train")) == len(y)


def test_the_plain_cpu_loop_gives_lightnings_features_and_progress_lines(workdir, digits_source, capsys, monkeypatch):
    """One CPU runs a plain loop (no Lightning import); its features are those of Lightning's predict loop, which
    GPUs and several devices use, to the bit; piped output gets the same progress lines."""
    from tlkit.data import augment
    from tlkit.data.loaders import ImageDataset, make_loader
    from tlkit.features.forward import forward_loader
    from tlkit.features.forward_devices import forward_on_devices

    manifest = ingest(digits_source)
    backbone = create_backbone(TINY_MODEL, img_size=32)
    transform = augment.ToTensor(augment.eval_transform(backbone.data_config))
    loader = make_loader(
        ImageDataset([manifest.abspath(r) for r in manifest.records], None, transform), batch_size=16, num_workers=0
    )
    monkeypatch.setenv("TLKIT_PROGRESS", "plain")
    for precision in ("32-true", "bf16-mixed"):
        plain = forward_loader(
            backbone.model, backbone.num_features, loader, devices="auto", precision=precision, progress=True
        )
        lightning = forward_on_devices(
            backbone.model, backbone.num_features, loader, devices=1, precision=precision, progress=False
        )
        np.testing.assert_array_equal(plain, lightning)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("features: batch")]
    assert lines[-1].startswith(f"features: batch {len(loader)}/{len(loader)}")
    assert "elapsed, eta" in lines[-1]
