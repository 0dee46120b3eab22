"""The GPU paths: mixed precision, DataLoader workers, extraction and training on CUDA.

Deselected by default (`-m gpu` runs them) and skipped where torch sees no CUDA device.
"""

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

from tlkit.config import ComputeConfig, TrainConfig
from tlkit.core import runtime
from tlkit.data.ingest import ingest
from tlkit.features.extract import extract_features
from tlkit.models.backbone import create_backbone
from tlkit.train.finetune import FitOptions, train_classifier

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_auto_precision_is_mixed_on_a_gpu():
    assert runtime.resolve_precision("auto") == ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed")


def test_a_fine_tune_learns_in_mixed_precision_with_loader_workers(workdir, digits_source):
    manifest = ingest(digits_source, seed=0)
    backbone = create_backbone(TINY_MODEL, img_size=32)
    settings = TrainConfig(epochs=6, batch_size=16, lr=3e-3, strategy="full", lr_mult=1, augment="none", groups=3)
    compute = ComputeConfig(devices=1, num_workers=2)
    result = train_classifier(manifest, backbone, settings, compute=compute, fit=FitOptions(progress=False))
    assert result.settings["precision"] == runtime.resolve_precision("auto")
    assert result.metrics["heldout_accuracy"] > 0.6  # 3 classes: chance is 0.33


def test_features_on_the_gpu_match_the_cpu_loop(workdir, digits_source, monkeypatch, tmp_path):
    manifest = ingest(digits_source, seed=0)
    backbone = create_backbone(TINY_MODEL, img_size=32)
    on_gpu = extract_features(
        manifest, backbone, compute=ComputeConfig(devices=1, precision="32-true", cache_dir=str(tmp_path / "gpu"))
    )
    mixed = extract_features(manifest, backbone, compute=ComputeConfig(devices=1, cache_dir=str(tmp_path / "mixed")))
    monkeypatch.setattr(runtime, "may_have_gpu", lambda accelerator="auto": False)
    on_cpu = extract_features(
        manifest,
        create_backbone(TINY_MODEL, img_size=32),
        compute=ComputeConfig(precision="32-true", num_workers=0, cache_dir=str(tmp_path / "cpu")),
    )
    # cuDNN may run fp32 convolutions in TF32: close, not equal to the last bit
    np.testing.assert_allclose(on_gpu.X, on_cpu.X, rtol=1e-2, atol=1e-3)
    cosine = (mixed.X * on_cpu.X).sum(1) / (np.linalg.norm(mixed.X, axis=1) * np.linalg.norm(on_cpu.X, axis=1))
    assert cosine.min() > 0.99  # half precision moves features a little, not their direction
