"""Pipeline file + `--set` overrides + `sweep:` + `seeds:` -> validated grid points, before anything runs.

Settings are named by dotted paths into the pipeline file. A stage is addressed by its id or its
index, or `*` for every stage that has the key:

    backbone.model=resnet50
    stages.pretrained + finetune.train.lr_mult=5
    stages.*.train.epochs=2

`seeds: [0, 1, 2]` runs every grid point once per seed. A seed sets every dataset's split seed and
every stage's training or baseline seed, except where the file writes a `seed:` itself: a written
seed is pinned, so a stage whose inputs do not depend on the seed runs once and is reused.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tlkit.errors import TlkitError
from tlkit.pipelines.schema import PipelineConfig, read_pipeline, validate_pipeline

SEEDED_SECTIONS = {"pretrain": "train", "finetune": "train", "tune": "train", "baseline": "baseline"}


def parse_assignment(text: str) -> tuple[str, Any]:
    """'train.lr=0.01' -> ('train.lr', 0.01); the value is read as YAML (numbers, lists, true/false)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise TlkitError(f"--set {text!r} is not KEY=VALUE; write e.g. --set backbone.model=resnet50")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        return key.strip(), value


def _stages(raw: dict, ref: str, key: str) -> list[dict]:
    stages = raw.get("stages")
    if not isinstance(stages, list):
        raise TlkitError(f"{key}: the pipeline has no stages list")
    if ref == "*":
        return [s for s in stages if isinstance(s, dict)]
    if ref.isdigit() and int(ref) < len(stages):
        return [stages[int(ref)]]
    found = [s for s in stages if isinstance(s, dict) and s.get("id") == ref]
    if not found:
        ids = ", ".join(repr(s.get("id")) for s in stages if isinstance(s, dict))
        raise TlkitError(f"{key}: no stage {ref!r}; the stages are {ids} (or an index, or *)")
    return found


def set_path(raw: dict, key: str, value: Any) -> None:
    """Set a dotted setting in a pipeline mapping, creating the sections it passes through.

    Unknown names are left for validation to report, with the nearest valid key.
    """
    parts = key.split(".")
    if parts[0] == "stages" and len(parts) > 1:
        if len(parts) < 3:
            raise TlkitError(f"{key}: name a setting inside the stage, e.g. stages.ID.train.epochs")
        ref, rest = parts[1], parts[2:]
        # stage ids may contain dots: take the longest prefix that names a stage
        for cut in range(len(parts) - 1, 1, -1):
            candidate = ".".join(parts[1:cut])
            if any(isinstance(s, dict) and s.get("id") == candidate for s in raw.get("stages") or []):
                ref, rest = candidate, parts[cut:]
                break
        targets = _stages(raw, ref, key)
        if ref == "*":  # every stage that has the first section (e.g. `train`)
            targets = [
                s
                for s in targets
                if rest[0] in s or (len(rest) > 1 and SEEDED_SECTIONS.get(str(s.get("stage"))) == rest[0])
            ]
            if not targets:
                raise TlkitError(f"{key}: no stage has a {rest[0]!r} section")
    else:
        targets, rest = [raw], parts
    for target in targets:
        node = target
        for name in rest[:-1]:
            child = node.get(name)
            if child is None:
                child = node[name] = {}
            if not isinstance(child, dict):
                raise TlkitError(f"{key}: {name!r} is a value, not a section")
            node = child
        node[rest[-1]] = copy.deepcopy(value)


def apply_seed(raw: dict, seed: int) -> None:
    """Give every dataset and stage section the pipeline seed, unless the file pins its own."""
    for dataset in (raw.get("datasets") or {}).values():
        if isinstance(dataset, dict):
            dataset.setdefault("seed", seed)
    for stage in raw.get("stages") or []:
        if isinstance(stage, dict) and stage.get("stage") == "export" and isinstance(stage.get("out"), str):
            stage["out"] = stage["out"].replace("{seed}", str(seed))  # one folder per seed
        section = SEEDED_SECTIONS.get(str(stage.get("stage"))) if isinstance(stage, dict) else None
        if section:
            body = stage.setdefault(section, {})
            if isinstance(body, dict):
                body.setdefault("seed", seed)


def short_names(keys: list[str]) -> dict[str, str]:
    """Column names for swept keys: the last part of each, or more where two would clash."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if sum(k.split(".")[-n:] == parts[-n:] for k in keys) == 1:
                break
        names[key] = name
    return names


@dataclass
class Point:
    """One grid point with one seed: the settings that make it, and its validated pipeline."""

    settings: dict[str, Any]
    seed: int | None
    config: PipelineConfig
    names: dict[str, str] = field(default_factory=dict)

    @property
    def group(self) -> str:
        """The grid point's label, the same for every seed: 'strategy=gradual lr_mult=3'."""
        return " ".join(f"{self.names.get(k, k)}={_show(v)}" for k, v in self.settings.items())

    @property
    def label(self) -> str:
        seed = f"seed={self.seed}" if self.seed is not None else ""
        return " ".join(part for part in (self.group, seed) if part) or "run"


def _show(value: Any) -> str:
    return (
        value
        if isinstance(value, str)
        else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
    )


@dataclass
class Plan:
    """A pipeline file resolved: the base settings, and every (grid point, seed) to run."""

    base: PipelineConfig
    points: list[Point]
    raw: dict

    @property
    def swept(self) -> bool:
        return len(self.points) > 1 or self.points[0].seed is not None


def plan_pipeline(path: str | Path, overrides: list[str] | None = None) -> Plan:
    """Read a pipeline file, apply `--set` overrides, expand sweep x seeds, and validate every point."""
    raw = read_pipeline(path)
    for text in overrides or []:
        key, value = parse_assignment(text)
        set_path(raw, key, value)
    base = validate_pipeline(raw, str(path))
    sweep = base.sweep or {}
    names = short_names(list(sweep))
    seeds: list[int | None] = list(base.seeds) if base.seeds else [None]
    points = []
    for values in itertools.product(*sweep.values()):
        settings = dict(zip(sweep, values))
        for seed in seeds:
            point_raw = {k: copy.deepcopy(v) for k, v in raw.items() if k not in ("sweep", "seeds")}
            for key, value in settings.items():
                set_path(point_raw, key, value)
            if seed is not None:
                apply_seed(point_raw, seed)
            where = (
                f"{path} ({Point(settings, seed, base, names).label})" if settings or seed is not None else str(path)
            )
            points.append(Point(settings, seed, validate_pipeline(point_raw, where), names))
    return Plan(base, points, raw)
