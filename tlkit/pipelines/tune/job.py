"""What a tune searches, as one object: the data, the backbone, the space, the base recipe, the study's settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tlkit.config import BackboneConfig, ComputeConfig, SplitConfig, TrainConfig, TuneConfig
from tlkit.data.ingest import Manifest
from tlkit.pipelines.space import SearchSpace


@dataclass
class TuneJob:
    """What a study searches: the images, the backbone every trial starts from, the space, the settings the space
    does not name (default: `tlkit finetune`'s; their seed seeds the study), the study's size and storage, the split
    and the compute. `data_label` names the data in the command that reproduces the best recipe."""

    data: str | Path | Manifest
    backbone: BackboneConfig
    space: SearchSpace
    base: TrainConfig = field(default_factory=TrainConfig)
    settings: TuneConfig = field(default_factory=TuneConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    data_label: str | None = None
