import time

import pytest
import torch
from conftest import TINY_MODEL
from safetensors.torch import save_file

from tlkit.errors import TlkitError
from tlkit.models import backbone as bb


def test_unknown_model_suggests_close_names():
    with pytest.raises(TlkitError, match="unknown model 'resnt18'; did you mean resnet18"):
        bb.create_backbone("resnt18")


def test_random_init_is_reproducible_and_seeded():
    a = bb.create_backbone(TINY_MODEL, img_size=32, seed=1)
    assert bb.create_backbone(TINY_MODEL, img_size=32, seed=1).digest == a.digest
    assert bb.create_backbone(TINY_MODEL, img_size=32, seed=2).digest != a.digest
    assert a.weights == "random(seed=1)"
    assert a.data_config["input_size"] == (3, 32, 32)
    assert a.model(torch.randn(2, 3, 32, 32)).shape == (2, a.num_features)


def test_transformer_is_built_for_the_requested_size():
    vit = bb.create_backbone("test_vit", img_size=32)
    assert vit.model(torch.randn(1, 3, 32, 32)).shape == (1, vit.num_features)


def test_info_shows_groups_and_preprocessing():
    info = bb.backbone_info("resnet18")
    assert info["num_features"] == 512
    assert info["num_params"] > 11000000
    labels = [label for label, _ in info["layer_groups"]]
    assert labels[0].startswith("conv1")
    assert labels[-1].startswith("layer4")
    assert sum(n for _, n in info["layer_groups"]) == info["num_params"]
    assert info["data_config"]["input_size"] == (3, 224, 224)
    assert "resnet18.a1_in1k" in info["pretrained_tags"]


def test_list_matches_patterns():
    assert "resnet18" in bb.list_backbones("resnet1")
    assert all(name.startswith("vit_") for name in bb.list_backbones("vit_*"))


@pytest.mark.parametrize("wrap", ["safetensors", "plain", "lightning", "module"])
def test_weights_files_load_in_common_layouts(tmp_path, wrap):
    source = bb.create_backbone(TINY_MODEL, seed=5)
    state = source.model.state_dict()
    # a classifier is ignored
    state = {
        **state,
        "fc.weight": torch.zeros(10, source.num_features),
        "fc.bias": torch.zeros(10),
    }
    if wrap == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        if wrap == "lightning":
            state = {"state_dict": {f"backbone.{k}": v for k, v in state.items()}, "epoch": 3}
        elif wrap == "module":
            state = {f"module.{k}": v for k, v in state.items()}
        torch.save(state, path)
    loaded = bb.create_backbone(TINY_MODEL, weights=path)
    assert loaded.digest == source.digest
    assert loaded.weights.startswith("file:")


def test_weights_that_do_not_fit_are_a_clear_error(tmp_path):
    torch.save(bb.create_backbone("test_vit").model.state_dict(), tmp_path / "vit.pth")
    # names and shapes of the first keys that do not fit
    with pytest.raises(
        TlkitError,
        match=r"do not fit model 'test_resnet'.*missing \(e\.g\. conv1\.0\.weight \(\d+, 3, \d+, \d+\)\).*unexpected "
        r"\(e\.g\. \S+ \(",
    ):
        bb.create_backbone(TINY_MODEL, weights=tmp_path / "vit.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(TlkitError, match="cannot read weights file"):
        bb.create_backbone(TINY_MODEL, weights=tmp_path / "junk.pth")
    with pytest.raises(TlkitError, match="does not exist"):
        bb.create_backbone(TINY_MODEL, weights=tmp_path / "none.safetensors")


def test_hub_weights_offline_fail_fast_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(bb, "_hub_host", lambda name: ("huggingface.co", False))
    start = time.perf_counter()
    with pytest.raises(TlkitError, match="HF_HUB_OFFLINE is set; pass --weights FILE"):
        bb.create_backbone("resnet18", pretrained=True)
    assert time.perf_counter() - start < 5


def test_unreachable_hub_is_an_error_not_a_hang(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(bb, "_hub_host", lambda name: ("huggingface.co", False))
    monkeypatch.setattr(bb, "unreachable", lambda host, timeout: "timed out")
    with pytest.raises(TlkitError, match="unreachable \\(timed out\\).*--weights FILE"):
        bb.create_backbone("resnet18", pretrained=True)


def test_reachability_probe_respects_its_timeout(monkeypatch):
    # A connection that hangs (as DNS and SYNs do offline), simulated: no packet leaves this machine.
    def hang(*args, **kwargs):
        time.sleep(3)
        raise OSError("simulated: no answer")

    monkeypatch.setattr(bb.socket, "create_connection", hang)
    start = time.perf_counter()
    reason = bb.unreachable("huggingface.co", 0.5)
    assert reason == "timed out"
    assert time.perf_counter() - start < 2


def test_a_weights_file_brings_the_preprocessing_it_records(tmp_path, caplog):
    """Converted weights keep their own mean/std (safetensors metadata, or FILE.json beside the file); without either,
    timm's default is used and a warning says so."""
    import json

    from safetensors.torch import save_file

    from tlkit.models.backbone import create_backbone, create_model

    state = {k: v.contiguous() for k, v in create_model(TINY_MODEL, img_size=32).state_dict().items()}
    recorded = tmp_path / "recorded.safetensors"
    save_file(
        state,
        str(recorded),
        metadata={"tlkit.preprocessing": json.dumps({"mean": [0.3] * 3, "std": [0.6] * 3, "crop_pct": 1.0})},
    )
    backbone = create_backbone(TINY_MODEL, weights=recorded, img_size=32)
    assert backbone.data_config["mean"] == (0.3, 0.3, 0.3)
    assert backbone.data_config["crop_pct"] == 1.0

    beside = tmp_path / "beside.safetensors"
    save_file(state, str(beside))
    beside.with_suffix(".json").write_text(json.dumps({"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}))
    assert create_backbone(TINY_MODEL, weights=beside, img_size=32).data_config["std"] == (0.2, 0.2, 0.2)

    bare = tmp_path / "bare.safetensors"
    save_file(state, str(bare))
    with caplog.at_level("WARNING", logger="tlkit"):
        default = create_backbone(TINY_MODEL, weights=bare, img_size=32).data_config
    from tlkit.models.backbone import data_config_for

    assert default == data_config_for(create_model(TINY_MODEL, img_size=32), 32)
    assert "does not record the preprocessing" in caplog.text
