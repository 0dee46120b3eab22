"""The multi-layer probe's features (tlkit.models.multilayer): every stage's average and the last layer's pooled
features, each of unit length, through timm's contract, and a clear error where a backbone has no stages."""

import pytest
import torch
from conftest import TINY_MODEL

from tlkit.errors import TlkitError
from tlkit.models.backbone import create_model
from tlkit.models.multilayer import MultiLayer, has_stages


def test_every_stage_is_averaged_and_scaled_to_unit_length_beside_the_last_layer():
    model = create_model(TINY_MODEL).eval()
    multi = MultiLayer(model).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = multi(x)
        _, stages = model.forward_intermediates(x)
        expected = torch.cat(
            [
                *(torch.nn.functional.normalize(s.mean(dim=(2, 3)), dim=1) for s in stages),
                torch.nn.functional.normalize(model(x), dim=1),  # timm's pooled features (num_classes=0)
            ],
            dim=1,
        )
    assert got.shape == (3, multi.num_features) == expected.shape
    torch.testing.assert_close(got, expected)
    # timm's contract, as Network reads it: forward_head(forward_features(x)) is forward(x)
    with torch.no_grad():
        torch.testing.assert_close(multi.forward_head(multi.forward_features(x), pre_logits=True), got)
    # Grad-CAM finds each stage under the wrapper's own module names
    for entry in multi.feature_info:
        assert multi.get_submodule(entry["module"]) is model.get_submodule(entry["module"].removeprefix("model."))


def test_a_backbone_without_stages_is_refused_in_one_line():
    vit = create_model("test_vit", img_size=32)
    assert has_stages(create_model(TINY_MODEL)) and not has_stages(vit)
    with pytest.raises(TlkitError, match="use --layers last"):
        MultiLayer(vit, "test_vit")


def test_layers_all_on_a_vision_transformer_is_refused_before_any_run_starts(digits_pair, tracked):
    import tlkit

    with pytest.raises(TlkitError, match="test_vit has no stages.*use --layers last"):
        tlkit.baseline(digits_pair, model="test_vit", pretrained=False, img_size=32, layers="all")
    assert tracked.search_runs([e.experiment_id for e in tracked.search_experiments()]) == []
