"""Backbone settings -> what identifies its features (name, weights digest, preprocessing), without building it.

Building a timm backbone costs seconds before any work: importing torch, torchvision and timm, then
reading and hashing the weights. A command whose features are already cached needs none of that,
only the facts that make up the feature-cache key. The first time a backbone is built its facts are
written to a card in the cache folder; later commands read the card and build the model only when
they use it (`LazyBackbone.model`).

A card is keyed by everything that decides those facts: the model name, input size, where the
weights come from (a file by its path, size and modification time; a weight package by its
installed version; a run by its id and store; random weights by their seed) and the versions of
tlkit, timm and albumentations. Anything else is not trusted: no card, the model is built.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tlkit.config import BackboneConfig

if TYPE_CHECKING:
    from tlkit.models.backbone import Backbone
from tlkit.core.cache import cache_dir, package_version, read_json, write_json

CARD_FORMAT = "tlkit-backbone-card/1"


@dataclass
class BackboneCard:
    name: str
    data_config: dict
    weights: str
    digest: str
    num_features: int
    preprocessing: dict  # the serialised evaluation transform


def card_key(config: BackboneConfig, tracking_uri: str | None = None) -> str | None:
    """The card's key for these settings, or None when the weights' identity cannot be told cheaply."""
    weights = config.weights
    if weights is None:
        source = ["hub"] if config.pretrained else ["random", config.seed]
    elif weights.startswith("runs:/"):  # a run's saved model never changes
        from tlkit.core.tracking import resolve_tracking_uri

        source = ["run", weights, resolve_tracking_uri(tracking_uri)]
    elif weights.startswith("pkg:"):
        version = package_version(weights.removeprefix("pkg:"))
        if not version:
            return None  # not installed: building the backbone says so
        source = ["package", weights, version]
    else:
        path = Path(weights).expanduser().resolve()
        try:
            st = path.stat()
        except OSError:
            return None
        source = ["file", str(path), st.st_size, st.st_mtime_ns]
    parts = {
        "format": CARD_FORMAT,
        "model": config.model,
        "img_size": config.img_size,
        "weights": source,
        "versions": [package_version(p) for p in ("tlkit", "timm", "albumentations")],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def card_of(backbone) -> BackboneCard:
    return BackboneCard(
        name=backbone.name,
        data_config=dict(backbone.data_config),
        weights=backbone.weights,
        digest=backbone.digest,
        num_features=backbone.num_features,
        preprocessing=backbone.preprocessing,
    )


def _card_path(key: str, cache: str | os.PathLike | None) -> Path:
    return cache_dir(cache) / "backbones" / f"{key}.json"


def _read(path: Path) -> BackboneCard | None:
    data = read_json(path)
    if data is None:
        return None
    try:
        data["data_config"]["input_size"] = tuple(data["data_config"]["input_size"])
        data["data_config"]["mean"] = tuple(data["data_config"]["mean"])
        data["data_config"]["std"] = tuple(data["data_config"]["std"])
        return BackboneCard(**data)
    except (TypeError, KeyError):
        return None  # missing or damaged: build the backbone


def _same(a: BackboneCard, b: BackboneCard | None) -> bool:
    return b is not None and json.dumps(asdict(a), sort_keys=True, default=list) == json.dumps(
        asdict(b), sort_keys=True, default=list
    )


def _write(path: Path, card: BackboneCard) -> None:
    try:
        write_json(path, asdict(card))
    except OSError:  # a read-only cache folder only costs the next command its speed
        pass


class LazyBackbone:
    """A Backbone whose facts come from its card; the timm model is built on first use of `.model`."""

    def __init__(self, config: BackboneConfig, card: BackboneCard, path: Path, tracking_uri: str | None):
        self.config, self.path, self.tracking_uri = config, path, tracking_uri
        self._set(card)
        self._built: Backbone | None = None

    def _set(self, card: BackboneCard) -> None:
        self.name, self.data_config, self.weights = card.name, card.data_config, card.weights
        self.digest, self.num_features, self.preprocessing = card.digest, card.num_features, card.preprocessing

    @property
    def model(self):
        if self._built is None:
            from tlkit.models.backbone import create_backbone

            self._built = create_backbone(
                self.config.model,
                pretrained=self.config.pretrained,
                weights=self.config.weights,
                img_size=self.config.img_size,
                seed=self.config.seed,
                tracking_uri=self.tracking_uri,
            )
            card = card_of(self._built)
            if not _same(card, _read(self.path)):
                _write(self.path, card)  # the card was stale: the built model is the truth from here on
                self._set(card)
        return self._built.model


def backbone_for(config: BackboneConfig, *, tracking_uri: str | None = None, cache: str | os.PathLike | None = None):
    """A LazyBackbone when a card for these settings exists, else the built Backbone (and its card written)."""
    key = card_key(config, tracking_uri)
    if key is not None and (card := _read(_card_path(key, cache))) is not None:
        return LazyBackbone(config, card, _card_path(key, cache), tracking_uri)
    from tlkit.models.backbone import create_backbone

    backbone = create_backbone(
        config.model,
        pretrained=config.pretrained,
        weights=config.weights,
        img_size=config.img_size,
        seed=config.seed,
        tracking_uri=tracking_uri,
    )
    if key is not None:
        _write(_card_path(key, cache), card_of(backbone))
    return backbone
