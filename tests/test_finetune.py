import numpy as np
import pytest
import torch

from conftest import TINY_MODEL
from tlkit.backbone import create_backbone
from tlkit.errors import TlkitError
from tlkit.finetune import ImageClassifier, train_classifier
from tlkit.ingest import ingest


def test_training_learns_and_restores_the_best_epoch(workdir, digits_source):
    manifest = ingest(digits_source, seed=0)
    result = train_classifier(
        manifest, create_backbone(TINY_MODEL, img_size=32), epochs=6, lr=3e-3, batch_size=16, augment_preset="none",
        num_workers=0, precision="32-true", progress=False,
    )
    assert result.epochs_run == 6 and 0 <= result.best_epoch < 6
    assert result.metrics["test_accuracy"] > 0.6  # 3 classes: chance is 0.33
    assert result.eval_split == "test" and len(result.y_pred) == len(manifest.split("test"))
    # the returned module holds the best checkpoint's weights, not the last epoch's
    assert result.best_val_accuracy == pytest.approx(_val_accuracy(result.module, manifest), abs=1e-6)


def _val_accuracy(module, manifest):
    from tlkit import augment
    from tlkit.images import load_rgb

    transform = augment.eval_transform(module_backbone_config(manifest))
    records = manifest.split("val")
    batch = torch.stack([augment.apply(transform, load_rgb(manifest.abspath(r))) for r in records])
    with torch.no_grad():
        predicted = module.eval()(batch).argmax(1).numpy()
    return float((predicted == manifest.labels(records)).mean())


def module_backbone_config(manifest):
    return create_backbone(TINY_MODEL, img_size=32).data_config


def test_weight_decay_skips_biases_and_norms():
    module = ImageClassifier(create_backbone(TINY_MODEL).model, 96, 3, lr=0.01, weight_decay=0.1)
    decay, no_decay = module.parameter_groups()
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert decay["lr"] == no_decay["lr"] == 0.01 and no_decay["weight_decay"] == 0.0


def test_bad_settings_are_errors(workdir, digits_source):
    manifest = ingest(digits_source)
    with pytest.raises(TlkitError, match="--epochs"):
        train_classifier(manifest, create_backbone(TINY_MODEL), epochs=0)
