from pathlib import Path

import pytest
import yaml

from tlkit.errors import TlkitError
from tlkit.pipelines.sweep import apply_seed, parse_assignment, plan_pipeline, set_path, short_names

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"


def raw() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_assignment_values_are_yaml():
    assert parse_assignment("train.lr=0.01") == ("train.lr", 0.01)
    assert parse_assignment("seeds=[0, 1]") == ("seeds", [0, 1])
    assert parse_assignment("backbone.pretrained=true") == ("backbone.pretrained", True)
    assert parse_assignment("backbone.model=resnet50") == ("backbone.model", "resnet50")
    with pytest.raises(TlkitError, match="is not KEY=VALUE"):
        parse_assignment("backbone.model")


def test_set_path_addresses_stages_by_id_index_and_star():
    config = raw()
    set_path(config, "stages.pretrained + finetune.train.epochs", 3)
    assert config["stages"][4]["train"]["epochs"] == 3
    set_path(config, "stages.0.train.lr", 0.5)
    assert config["stages"][0]["train"]["lr"] == 0.5
    set_path(config, "stages.*.train.patience", 2)  # only the stages that train
    assert [s.get("train", {}).get("patience") for s in config["stages"]] == [2, None, None, None, 2, None, 2]
    set_path(config, "backbone.img_size", 48)
    assert config["backbone"]["img_size"] == 48
    with pytest.raises(TlkitError, match="no stage 'nope'; the stages are 'source-pretrain'"):
        set_path(config, "stages.nope.train.epochs", 1)


def test_written_seeds_are_pinned_the_rest_follow():
    config = raw()
    apply_seed(config, 7)
    assert config["datasets"]["source"]["seed"] == 0  # pinned in the file
    assert config["datasets"]["target"]["seed"] == 7
    assert config["stages"][0]["train"]["seed"] == 0  # source-pretrain pins its seed
    assert config["stages"][1]["baseline"]["seed"] == 7
    assert config["stages"][4]["train"]["seed"] == 7


def test_plan_expands_grid_times_seeds(tmp_path):
    config = raw()
    config["sweep"] = {
        "stages.pretrained + finetune.train.strategy": ["full", "gradual"],
        "backbone.img_size": [32, 48],
    }
    config["seeds"] = [0, 1, 2]
    plan = plan_pipeline(write(tmp_path, config))
    assert len(plan.points) == 12
    assert plan.swept
    first = plan.points[0]
    assert first.label == "strategy=full img_size=32 seed=0"
    assert first.group == "strategy=full img_size=32"
    assert first.config.stages[4].train.strategy == "full"
    assert first.config.backbone.img_size == 32
    last = plan.points[-1]
    assert last.config.stages[4].train.strategy == "gradual"
    assert last.config.datasets["target"].seed == 2


def test_overrides_apply_before_validation(tmp_path):
    plan = plan_pipeline(QUICKSTART, ["stages.*.train.epochs=12", "backbone.model=test_resnet"])
    assert [s.train.epochs for s in plan.points[0].config.stages if hasattr(s, "train")] == [12, 12, 12]
    assert not plan.swept
    with pytest.raises(TlkitError, match=r"unknown key 'stages\.4\.finetune\.train\.epoch'; did you mean 'epochs'\?"):
        plan_pipeline(QUICKSTART, ["stages.4.train.epoch=1"])
    # settings that contradict each other fail here too, before anything runs
    with pytest.raises(TlkitError, match=r"freeze_epochs \(10\) must be below epochs \(1\)"):
        plan_pipeline(QUICKSTART, ["stages.*.train.epochs=1"])


def test_a_bad_grid_point_fails_before_anything_runs(tmp_path):
    config = raw()
    config["sweep"] = {"stages.pretrained + finetune.train.strategy": ["full", "unfreeze-all"]}
    with pytest.raises(TlkitError, match=r"\(strategy=unfreeze-all\): stages\.4\.finetune\.train\.strategy"):
        plan_pipeline(write(tmp_path, config))


def test_short_names_stay_unique():
    keys = ["stages.a.train.lr", "stages.b.train.lr", "backbone.model"]
    assert short_names(keys) == {
        "stages.a.train.lr": "a.train.lr",
        "stages.b.train.lr": "b.train.lr",
        "backbone.model": "model",
    }
