"""Search space file -> validated dimensions over fine-tuning settings, and one trial's settings from them.

A search space is a YAML mapping from `TrainConfig` settings (the names of a pipeline's `train:`
section) to what `tlkit tune` may try:

    lr: {low: 3.0e-4, high: 1.0e-2, log: true}   # a range: float, or int when low and high are ints
    strategy: [freeze-unfreeze, lp-ft, full]       # a list: one of these values
    hflip: false                                   # a single value: fixed in every trial

Settings the file does not name keep their `tlkit finetune` defaults. Every value is checked
against `TrainConfig` before any trial runs, so a typo is a one-line error naming the key.
`freeze_epochs` applies only to freeze-unfreeze and `unfreeze_every` only to gradual: a trial of
another strategy does not sample them. This module does not import Optuna: a trial is anything
with Optuna's `suggest_float`, `suggest_int` and `suggest_categorical`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tlkit.config import TrainConfig
from tlkit.errors import TlkitError

# Settings a tune controls itself: the seed is the study's, the rest would let trials choose on
# the held-out split or change what the selection split means.
RESERVED = {
    "seed": "the study's --seed sets it",
    "use_val": "tune chooses the split use itself",
    "patience": "a trial's curve is judged by the pruner, not by early stopping",
    "lrs": "search lr and lr_mult instead",
}
AUGMENT_PRESETS = ("none", "light", "medium", "heavy")  # augment.PRESETS, without importing albumentations
WHOLE_NUMBERS = {"epochs", "freeze_epochs", "unfreeze_every", "groups", "batch_size"}
ONLY_FOR = {"freeze_epochs": "freeze-unfreeze", "unfreeze_every": "gradual"}  # sampled only for that strategy

DEFAULT_SPACE: dict[str, Any] = {
    "lr": {"low": 3e-4, "high": 1e-2, "log": True},
    "lr_mult": {"low": 1.0, "high": 10.0, "log": True},
    "strategy": ["freeze-unfreeze", "lp-ft", "full", "gradual"],
    "epochs": [5, 10, 20],
    "freeze_epochs": {"low": 1, "high": 3},
    "augment": ["none", "light", "medium"],
    "label_smoothing": {"low": 0.0, "high": 0.2},
    "bn": ["keep-stats", "frozen", "train"],
}


@dataclass(frozen=True)
class Dimension:
    """One setting: a range (low, high, log, int) or a list of choices; one choice is a fixed value."""

    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    @property
    def fixed(self) -> bool:
        return self.choices is not None and len(self.choices) == 1

    def describe(self) -> str:
        if self.choices is not None:
            return str(self.choices[0]) if self.fixed else "{" + ", ".join(map(str, self.choices)) + "}"
        return f"[{self.low:g}, {self.high:g}]{' log' if self.log else ''}"


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]
    source: str = "default"

    @property
    def digest(self) -> str:
        payload = [(d.name, d.choices, d.low, d.high, d.log, d.integer) for d in self.dimensions]
        return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:12]

    def searched(self) -> list[str]:
        return [d.name for d in self.dimensions if not d.fixed]

    def defaults(self, base: TrainConfig) -> dict[str, Any]:
        """The searched settings' values in `base` (tlkit's defaults, or a pipeline stage's `train:`) when the space
        contains all of them: a study's first trial, so a tune never ends below that recipe on its selection split."""
        strategy = base.strategy
        values: dict[str, Any] = {}
        for dim in self.dimensions:
            if dim.fixed or (dim.name in ONLY_FOR and strategy != ONLY_FOR[dim.name]):
                continue
            value = getattr(base, dim.name)
            if dim.name == "freeze_epochs" and value is None:
                value = 1  # what freeze-unfreeze does when it is not set
            inside = (
                value in dim.choices if dim.choices is not None else value is not None and dim.low <= value <= dim.high
            )
            if not inside:
                return {}  # the default is outside the space: nothing to start from
            values[dim.name] = value
        return values

    def sample(self, trial) -> dict[str, Any]:
        """One trial's settings; strategy-specific ones only where they apply."""
        values: dict[str, Any] = {}
        # strategy first: whether freeze_epochs and unfreeze_every apply depends on it
        for dim in sorted(self.dimensions, key=lambda d: (d.name != "strategy", d.name in ONLY_FOR)):
            if dim.name in ONLY_FOR and values.get("strategy", TrainConfig().strategy) != ONLY_FOR[dim.name]:
                continue
            if dim.fixed and dim.choices is not None:
                values[dim.name] = dim.choices[0]
            elif dim.choices is not None:
                values[dim.name] = trial.suggest_categorical(dim.name, list(dim.choices))
            elif dim.integer:
                values[dim.name] = trial.suggest_int(dim.name, int(dim.low or 0), int(dim.high or 0), log=dim.log)
            else:
                values[dim.name] = trial.suggest_float(dim.name, dim.low, dim.high, log=dim.log)
        return values


def settings_for(values: dict[str, Any], base: TrainConfig) -> TrainConfig:
    """`base` with a trial's values. freeze_epochs is capped below epochs (one epoch at least trains everything)."""
    values = dict(values)
    epochs = values.get("epochs", base.epochs)
    if "freeze_epochs" in values and values["freeze_epochs"] >= epochs:
        values["freeze_epochs"] = max(1, epochs - 1) if epochs > 1 else None
    return TrainConfig.model_validate({**base.model_dump(exclude_unset=True), **values})


def _where(source: str, key: str) -> str:
    return f"{source}: {key}"


def _check_value(source: str, key: str, value: Any) -> None:
    """The value's own type and range. Rules between settings (freeze_epochs below epochs) are a trial's to keep:
    `settings_for` caps freeze_epochs per trial, so they are not judged here against the defaults."""
    try:
        TrainConfig.model_validate({key: value})
    except ValidationError as err:
        own = [e for e in err.errors() if tuple(e["loc"])[:1] == (key,)]
        if own:
            raise TlkitError(f"{_where(source, key)}: {value!r} is not a valid value ({own[0]['msg']})") from None


def _dimension(source: str, key: str, spec: Any, base_dir: Path | None) -> Dimension:
    if key not in TrainConfig.model_fields:
        close = difflib.get_close_matches(key, sorted(TrainConfig.model_fields), n=1)
        hint = (
            f"; did you mean {close[0]!r}?"
            if close
            else f"; the settings are: {', '.join(sorted(set(TrainConfig.model_fields) - set(RESERVED)))}"
        )
        raise TlkitError(f"{source}: unknown setting {key!r}{hint}")
    if key in RESERVED:
        raise TlkitError(f"{source}: {key!r} cannot be searched or fixed in a search space ({RESERVED[key]})")

    def local(value: Any) -> Any:  # augmentation files are relative to the space file, as in pipelines
        if (
            key == "augment"
            and isinstance(value, str)
            and value.endswith((".yaml", ".yml"))
            and base_dir is not None
            and not Path(value).is_absolute()
        ):
            return str((base_dir / value).resolve())
        return value

    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "log"}
        if unknown or not {"low", "high"} <= set(spec):
            raise TlkitError(
                f"{_where(source, key)}: a range is {{low: A, high: B, log: true|false}}; got keys "
                f"{', '.join(map(str, spec))}"
            )
        low, high, log = spec["low"], spec["high"], spec.get("log", False)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not isinstance(
            log, bool
        ):
            raise TlkitError(f"{_where(source, key)}: low and high must be numbers and log true or false")
        if not low < high:
            raise TlkitError(
                f"{_where(source, key)}: low ({low}) must be below high ({high}); for one value write {key}: {low}"
            )
        if log and low <= 0:
            raise TlkitError(f"{_where(source, key)}: a log range needs low > 0, got {low}")
        integer = isinstance(low, int) and isinstance(high, int)
        if key in WHOLE_NUMBERS and not integer:
            raise TlkitError(f"{_where(source, key)}: {key} is a whole number; write low and high as integers")
        for value in (low, high):
            _check_value(source, key, value)
        return Dimension(key, low=low, high=high, log=log, integer=integer)
    choices = spec if isinstance(spec, list) else [spec]
    if not choices:
        raise TlkitError(f"{_where(source, key)}: give at least one value")
    choices = [local(c) for c in choices]
    for value in choices:
        if isinstance(value, (dict, list)):
            raise TlkitError(f"{_where(source, key)}: a choice must be a single value, got {value!r}")
        _check_value(source, key, value)
        if key == "augment" and value not in AUGMENT_PRESETS and not Path(value).is_file():
            raise TlkitError(
                f"{_where(source, key)}: {value!r} is neither a preset ({', '.join(AUGMENT_PRESETS)}) nor an existing "
                "albumentations YAML file"
            )
    if len(set(map(str, choices))) != len(choices):
        raise TlkitError(f"{_where(source, key)}: a value is listed twice")
    return Dimension(key, choices=tuple(choices))


def parse_space(raw: dict | None, source: str = "search space", base_dir: Path | None = None) -> SearchSpace:
    """A search-space mapping -> SearchSpace; None gives the default space."""
    if raw is None:
        return parse_space(DEFAULT_SPACE, "default search space")
    if not isinstance(raw, dict) or not raw:
        raise TlkitError(
            f"{source}: a search space is a YAML mapping of settings, e.g. `lr: "
            f"{{low: 1.0e-4, high: 1.0e-2, log: true}}`"
        )
    dims = tuple(_dimension(source, str(key), spec, base_dir) for key, spec in raw.items())
    space = SearchSpace(dims, source)
    if not space.searched():
        raise TlkitError(f"{source}: every setting is fixed; give at least one a list of values or a range")
    return space


def load_space(path: str | Path | None) -> SearchSpace:
    """The search space of a YAML file (None: the default space)."""
    if path is None:
        return parse_space(None)
    path = Path(path)
    if not path.is_file():
        raise TlkitError(f"search space file {path} does not exist; see pipelines/spaces/ for examples")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TlkitError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_space(raw, str(path), path.resolve().parent)
