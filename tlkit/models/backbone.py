"""Model name + weights source -> Backbone (timm model, data config, layer groups). The timm boundary.

Weights come from timm's hub (`pretrained=True`), a local file (.safetensors or a PyTorch state
dict, read with weights_only=True), or a run of tlkit that trained a backbone (`runs:/RUN_ID`).
Preprocessing always comes from the backbone's data config.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.models import group_parameters

from tlkit.errors import TlkitError
from tlkit.models import foreign

HUB_TIMEOUT_S = 5.0


@dataclass
class Backbone:
    """A timm model without classifier (`num_classes=0`: forward returns pooled features).

    Attributes:
        model: the timm model.
        name: the timm model name it was created from.
        data_config: input_size, mean, std, interpolation, crop_pct used to preprocess images.
        weights: where the weights came from ('random(seed=0)', 'hub:NAME', 'file:PATH', 'runs:/ID').
        digest: sha256 of the weights, part of every cache key.
    """

    model: torch.nn.Module
    name: str
    data_config: dict
    weights: str
    digest: str

    @property
    def num_features(self) -> int:
        return feature_width(self.model)

    @property
    def preprocessing(self) -> dict:
        """The evaluation transform, serialised: part of every feature-cache key."""
        from tlkit.data import augment

        return augment.to_dict(augment.eval_transform(self.data_config))


def feature_width(model: torch.nn.Module) -> int:
    """Width of what a timm model with num_classes=0 returns (pre-logits), per timm's contract."""
    width: Any = getattr(model, "head_hidden_size", None) or getattr(model, "num_features")  # noqa: B009
    return int(width)


# ----------------------------------------------------------------------------------------------
# Names


def check_model_name(name: str) -> str:
    """Return `name` if timm knows it; else a TlkitError with the closest names."""
    if timm.is_model(name) or timm.is_model(name.split(".")[0]):
        return name
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise TlkitError(f"unknown model {name!r}; {hint}`tlkit backbone list PATTERN` lists timm's models")


def list_backbones(pattern: str = "", *, pretrained: bool = False) -> list[str]:
    """timm model names matching a wildcard pattern (a bare word matches anywhere)."""
    if pattern and not any(ch in pattern for ch in "*?["):
        pattern = f"*{pattern}*"
    return timm.list_models(pattern or "*", pretrained=pretrained)


def pretrained_tags(name: str) -> list[str]:
    arch = name.split(".")[0]
    return [t for t in timm.list_pretrained(f"{arch}*") if t.split(".")[0] == arch]


# ----------------------------------------------------------------------------------------------
# Creating models and loading weights


def create_model(name: str, *, pretrained: bool = False, img_size: int | None = None) -> torch.nn.Module:
    """A timm model without classifier, built for `img_size` where the architecture needs it."""
    kwargs: dict = {"pretrained": pretrained, "num_classes": 0}
    if img_size is not None:
        try:  # transformers build their position embeddings for the input size
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError:  # convnets take any size and have no such argument
            pass
    return timm.create_model(name, **kwargs)


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def data_config_for(model: torch.nn.Module, img_size: int | None = None, weights_config: dict | None = None) -> dict:
    """timm's data config for the model, with what the weights were trained with on top, then `img_size`."""
    config = {**timm.data.resolve_model_data_config(model), **(weights_config or {})}
    if img_size is not None:
        config["input_size"] = (3, int(img_size), int(img_size))
    config["input_size"] = tuple(int(v) for v in config["input_size"])
    config["mean"] = tuple(float(v) for v in config["mean"])
    config["std"] = tuple(float(v) for v in config["std"])
    return config


PREPROCESSING_KEY = "tlkit.preprocessing"  # safetensors metadata: the JSON of the preprocessing the weights expect
PREPROCESSING_FIELDS = ("mean", "std", "interpolation", "crop_pct")


def weights_preprocessing(path: Path, name: str) -> dict:
    """The preprocessing a weights file was trained with, when the file says: its safetensors metadata
    (`tlkit export --format safetensors` writes it), else a JSON sidecar beside it (`FILE.json` with `mean`,
    `std`, optionally `interpolation` and `crop_pct`; tlkit's export writes that too). Without either, timm's
    default for `name` is used and a warning says so: weights converted from another layout may expect other
    statistics (EfficientNet-Lite's are mean = std = 0.5, not ImageNet's), and features then score differently."""
    import json
    import logging

    recorded: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as handle:
                text = (handle.metadata() or {}).get(PREPROCESSING_KEY)
            recorded = json.loads(text) if text else {}
        except (OSError, ValueError):
            recorded = {}
    sidecar = path.with_suffix(".json")
    if not recorded and sidecar.is_file():
        try:
            recorded = json.loads(sidecar.read_text())
        except (OSError, ValueError) as err:
            raise TlkitError(
                f"cannot read {sidecar} (the preprocessing of {path.name}): {err}; fix or remove it"
            ) from None
    found = {k: recorded[k] for k in PREPROCESSING_FIELDS if k in recorded}
    if not {"mean", "std"} <= set(found):
        logging.getLogger("tlkit").warning(
            f"{path.name} does not record the preprocessing it was trained with: using timm's for {name}; if the "
            f'weights expect other mean/std, put them in {sidecar.name} beside it ({{"mean": [...], "std": [...]}})'
        )
        return {}
    return found


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise TlkitError(
            f"weights file {path} does not exist; pass a .safetensors or state-dict file, or runs:/RUN_ID of a tlkit "
            "run"
        )
    from timm.models import load_state_dict

    try:  # timm's reader: .safetensors or torch.load (weights only), 'state_dict' / 'model' unwrapped, 'module.' cut
        state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for a bad file
        raise TlkitError(
            f"cannot read weights file {path}: {str(err).splitlines()[0]}; give a .safetensors file or a saved state "
            "dict"
        ) from None
    for wrapper in ("model_state_dict",):  # training scripts' checkpoints (timm unwraps 'state_dict' and 'model')
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TlkitError(f"{path} is not a state dict of tensors; save one with torch.save(model.state_dict(), path)")
    return state


def _strip_prefix(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Accept the 'model.' and 'backbone.' prefixes that wrappers add (timm's reader already cut 'module.')."""
    for prefix in ("model.", "backbone."):
        if not (state.keys() & model_keys) and any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str, name: str) -> str | None:
    """Load `state` into `model`; classifier keys are ignored, anything else that does not fit is an error.

    A state dict in a known foreign key layout (see tlkit.models.foreign) is mapped onto the model first;
    returns that layout's name, or None for timm's own layout.
    """
    model_state = model.state_dict()
    state = _strip_prefix(state, set(model_state))
    layout = foreign.detect_layout(state) if not (state.keys() & model_state.keys()) else None
    if layout is not None:
        model.load_state_dict(foreign.map_in_order(state, model_state, layout=layout, source=source))
        return layout.name
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or "fc"  # timm's contract
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if not (k not in model_state and k.startswith(classifiers))}
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    wrong = [k for k in state if k in model_state and state[k].shape != model_state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]} {tuple(model_state[missing[0]].shape)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]} {tuple(state[unexpected[0]].shape)})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(model_state[k].shape)})"
            )
        raise TlkitError(
            f"weights {source} do not fit model {name!r}: {'; '.join(parts)}; pass the --model they were trained for"
        )
    model.load_state_dict(state)
    return None


def _hub_host(name: str) -> tuple[str, bool]:
    """(host to reach, whether the weights are already in the local Hugging Face cache)."""
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
                if isinstance(try_to_load_from_cache(hub_id, filename), str):
                    return "", True
        except Exception:  # a broken cache is the same as no cache
            pass
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        return urlparse(endpoint).hostname or "huggingface.co", False
    url = getattr(cfg, "url", None) if cfg is not None else None
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        return urlparse(url).hostname or "", cached.exists()
    return "huggingface.co", False


def unreachable(host: str, timeout: float) -> str | None:
    """None if a TCP connection to host:443 opens within `timeout`, else the reason."""
    result: list[str | None] = ["timed out"]

    def connect() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result[0] = None
        except OSError as err:
            result[0] = err.strerror or type(err).__name__

    thread = threading.Thread(target=connect, daemon=True)  # DNS lookups ignore socket timeouts
    thread.start()
    thread.join(timeout)
    return result[0]


def _create_from_hub(name: str, img_size: int | None) -> torch.nn.Module:
    if not pretrained_tags(name) and not timm.models.get_pretrained_cfg(name, allow_unregistered=True):
        raise TlkitError(f"model {name!r} has no pretrained weights in timm; pass --no-pretrained or --weights FILE")
    host, cached = _hub_host(name)
    fix = "pass --weights FILE (.safetensors or state dict) or --weights runs:/RUN_ID, or --no-pretrained"
    if not cached:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
            raise TlkitError(
                f"pretrained weights for {name!r} are not in the local cache and HF_HUB_OFFLINE is set; {fix}"
            )
        reason = unreachable(host, HUB_TIMEOUT_S)
        if reason is not None:
            raise TlkitError(
                f"cannot download pretrained weights for {name!r}: {host} is unreachable ({reason}); {fix}; "
                "with weights already cached, set HF_HUB_OFFLINE=1"
            )
    try:
        return create_model(name, pretrained=True, img_size=img_size)
    except (OSError, RuntimeError) as err:
        raise TlkitError(
            f"downloading pretrained weights for {name!r} failed ({str(err).splitlines()[0]}); {fix}"
        ) from None


def create_backbone(
    name: str | None,
    *,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
) -> Backbone:
    """Create a timm backbone with its weights and preprocessing.

    Args:
        name: a timm model name (`tlkit backbone list`); may be None when `weights` is a run.
        pretrained: download timm's hub weights (ignored when `weights` is given).
        weights: a .safetensors / state-dict file, or runs:/RUN_ID of a tlkit training run.
        img_size: input side in pixels; default: the model's own (the run's, for run weights).
        seed: seed of the random initialisation when there are no weights.
        tracking_uri: the MLflow store that holds `runs:/` weights.
    """
    from tlkit.core.tracking import RUNS_PREFIX
    from tlkit.models import bundle as bundles

    data_config = None
    if weights is not None and str(weights).startswith(RUNS_PREFIX):
        folder, saved = bundles.fetch_bundle(str(weights), tracking_uri=tracking_uri)
        if saved.model_name is None:
            raise TlkitError(
                f"run {weights} is a pixels baseline and holds no backbone; use a pretrain, finetune or backbone "
                "baseline run"
            )
        if name is not None and name.split(".")[0] != saved.model_name.split(".")[0]:
            raise TlkitError(
                f"run {weights} holds a {saved.model_name!r} backbone, not {name!r}; drop --model or pass --model "
                f"{saved.model_name}"
            )
        name = saved.model_name
        model = create_model(name, img_size=img_size or saved.data_config["input_size"][-1])
        load_state(model, bundles.backbone_state(folder), source=str(weights), name=name)
        data_config = dict(saved.data_config)
        if img_size is not None:
            data_config["input_size"] = (3, int(img_size), int(img_size))
        source = str(weights)
    else:
        if foreign.is_package_ref(weights):
            package, _ = foreign.resolve_package(str(weights))
            if name is not None and name.split(".")[0] != package.model:
                raise TlkitError(
                    f"weights {weights} are for {package.model!r}, not {name!r}; drop --model or pass --model "
                    f"{package.model}"
                )
            name = package.model
        if name is None:
            raise TlkitError("no model given; pass --model NAME (see `tlkit backbone list`)")
        check_model_name(name)
        if foreign.is_package_ref(weights):
            package, path = foreign.resolve_package(str(weights))
            model = create_model(name, img_size=img_size)
            load_state(model, _read_state_dict(path), source=f"{weights} ({path.name})", name=name)
            data_config = data_config_for(model, img_size, package.data_config)
            source = f"{foreign.PACKAGE_PREFIX}{package.package}"
        elif weights is not None:
            path = Path(weights).expanduser()
            model = create_model(name, img_size=img_size)
            load_state(model, _read_state_dict(path), source=str(path), name=name)
            data_config = data_config_for(model, img_size, weights_preprocessing(path, name))
            source = f"file:{path.resolve()}"
        elif pretrained:
            model = _create_from_hub(name, img_size)
            source = f"hub:{getattr(model, 'pretrained_cfg', {}).get('hf_hub_id') or name}"
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = create_model(name, img_size=img_size)
            source = f"random(seed={seed})"
    if data_config is None:
        data_config = data_config_for(model, img_size)
    return Backbone(model=model, name=name, data_config=data_config, weights=source, digest=weights_digest(model))


def preview_data_config(name: str | None, weights: str | None = None, img_size: int | None = None) -> dict:
    """The preprocessing a backbone would use, without downloading weights (timm's ImageNet defaults, no model)."""
    if weights is not None:
        return create_backbone(name, weights=weights, img_size=img_size).data_config
    if name is None:
        return data_config_for(create_model("resnet18"), img_size or 224)
    check_model_name(name)
    return data_config_for(create_model(name, img_size=img_size), img_size)


# ----------------------------------------------------------------------------------------------
# Layer groups


def _group_label(names: list[str]) -> str:
    tops = list(dict.fromkeys(n.split(".")[0] for n in names))
    if len(tops) > 1:
        return ", ".join(tops)
    parts = [n.split(".") for n in names]
    common = []
    for column in zip(*parts):
        if len(set(column)) > 1:
            break
        common.append(column[0])
    return ".".join(common[:-1] if len(common) == len(parts[0]) else common) or tops[0]


def layer_groups(model: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """Ordered (label, parameter names) groups, input side first, from timm's group_matcher.

    Models without a matcher fall back to one group per top-level child module.
    """
    try:
        matcher: Any = model.group_matcher  # timm's contract (AttributeError: a model without one)
        grouped = group_parameters(model, matcher(coarse=False))
        groups = [names for _, names in sorted(grouped.items())]
    except (AttributeError, NotImplementedError):
        by_child: dict[str, list[str]] = {}
        for pname, _ in model.named_parameters():
            by_child.setdefault(pname.split(".")[0], []).append(pname)
        groups = list(by_child.values())
    groups = [g for g in groups if g]
    return [(_group_label(g), g) for g in groups]


def merge_groups(groups: list[tuple[str, list[str]]], n: int | None) -> list[tuple[str, list[str]]]:
    """Merge neighbouring layer groups into `n` groups of similar parameter-name counts (order kept; 0 or None:
    timm's own groups)."""
    if n is not None and n < 0:
        raise TlkitError(f"--groups must be 0 (timm's own groups) or more, got {n}")
    if not n or n >= len(groups):
        return groups
    merged: list[tuple[str, list[str]]] = []
    sizes = [len(names) for _, names in groups]
    total, start = sum(sizes), 0
    for k in range(n):
        # take groups until this bucket reaches its share of what is left, leaving one group per later bucket
        left_buckets = n - k
        target = sum(sizes[start:]) / left_buckets
        end, acc = start, 0
        while end < len(groups) - (left_buckets - 1) and (acc < target or end == start):
            acc += sizes[end]
            end += 1
        labels = [label for label, _ in groups[start:end]]
        names = [name for _, names in groups[start:end] for name in names]
        merged.append((labels[0] if len(labels) == 1 else f"{labels[0]} .. {labels[-1]}", names))
        start = end
    assert start == len(groups) and sum(len(names) for _, names in merged) == total  # an invariant, not input
    return merged


def backbone_info(name: str, *, img_size: int | None = None, groups: int | None = None) -> dict:
    """What `tlkit backbone info` shows: sizes, preprocessing, layer groups (merged into `groups`), tags."""

    check_model_name(name)
    model = create_model(name, img_size=img_size)
    params = dict(model.named_parameters())
    return {
        "name": name,
        "num_features": feature_width(model),
        "num_params": sum(p.numel() for p in params.values()),
        "data_config": data_config_for(model, img_size),
        "layer_groups": [
            (label, sum(params[n].numel() for n in names)) for label, names in merge_groups(layer_groups(model), groups)
        ],
        "pretrained_tags": pretrained_tags(name),
    }
