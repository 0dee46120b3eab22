"""Search spaces: validation with one-line errors, sampling, and settings a trial can run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlkit.config import TrainConfig
from tlkit.errors import TlkitError
from tlkit.pipelines.space import DEFAULT_SPACE, load_space, parse_space, settings_for


class FirstChoice:
    """A stand-in for an Optuna trial: the first choice, the low end of each range."""

    def __init__(self):
        self.asked: list[str] = []

    def suggest_categorical(self, name, choices):
        self.asked.append(name)
        return choices[0]

    def suggest_int(self, name, low, high, log=False):
        self.asked.append(name)
        return high

    def suggest_float(self, name, low, high, log=False):
        self.asked.append(name)
        return low


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"lr_mul": [1, 3]}, "unknown setting 'lr_mul'; did you mean 'lr_mult'?"),
        ({"seed": [0, 1]}, "'seed' cannot be searched"),
        ({"use_val": ["train"]}, "'use_val' cannot be searched"),
        ({"lr": {"low": 0.1, "high": 0.01}}, "low (0.1) must be below high (0.01)"),
        ({"lr": {"low": 0, "high": 0.01, "log": True}}, "a log range needs low > 0"),
        ({"lr": {"min": 0, "max": 1}}, "a range is {low: A, high: B"),
        ({"epochs": {"low": 2.5, "high": 10}}, "epochs is a whole number"),
        ({"epochs": [0, 5]}, "epochs: 0 is not a valid value"),
        ({"strategy": ["full", "fine"]}, "strategy: 'fine' is not a valid value"),
        ({"augment": ["light", "missing.yaml"]}, "'missing.yaml' is neither a preset"),
        ({"strategy": ["full", "full"]}, "listed twice"),
        ({"lr": 0.01, "hflip": False}, "every setting is fixed"),
        ([1, 2], "a search space is a YAML mapping"),
    ],
)
def test_a_bad_space_is_one_line_naming_the_key(raw, message):
    with pytest.raises(TlkitError) as err:
        parse_space(raw, "space.yaml")
    text = str(err.value)
    assert message in text
    assert text.startswith("space.yaml")
    assert "\n" not in text


def test_a_value_is_judged_on_its_own_not_against_the_default_epochs():
    """freeze_epochs up to 10 with epochs [10, 20, 40] (spaces/digits.yaml): trials cap it below their own epochs."""
    space = parse_space({"epochs": [10, 20, 40], "freeze_epochs": {"low": 1, "high": 10}}, "space.yaml")
    assert settings_for({"epochs": 10, "freeze_epochs": 10}, TrainConfig()).freeze_epochs == 9
    assert set(space.searched()) == {"epochs", "freeze_epochs"}
    for name in ("default.yaml", "digits.yaml"):
        load_space(Path(__file__).resolve().parents[1] / "pipelines" / "spaces" / name)


def test_the_default_space_is_valid_and_samples_a_runnable_recipe():
    space = parse_space(None)
    assert set(space.searched()) == set(DEFAULT_SPACE)
    settings = settings_for(space.sample(FirstChoice()), TrainConfig(seed=3))
    assert settings.seed == 3
    assert settings.strategy == "freeze-unfreeze"


def test_strategy_specific_settings_are_sampled_only_for_their_strategy():
    space = parse_space(
        {"strategy": ["full", "gradual"], "freeze_epochs": {"low": 1, "high": 3}, "unfreeze_every": [1, 2]}
    )
    trial = FirstChoice()
    values = space.sample(trial)
    assert values == {"strategy": "full"}
    assert trial.asked == ["strategy"]  # neither applies to full


def test_freeze_epochs_is_capped_below_epochs():
    space = parse_space({"epochs": [2], "freeze_epochs": {"low": 1, "high": 5}, "lr": [0.001, 0.01]})
    # FirstChoice takes the high end of int ranges: 5
    settings = settings_for(space.sample(FirstChoice()), TrainConfig())
    assert settings.epochs == 2
    assert settings.freeze_epochs == 1


def test_fixed_values_apply_to_every_trial_and_files_are_relative_to_the_space(tmp_path):
    (tmp_path / "aug").mkdir()
    (tmp_path / "aug" / "digits.yaml").write_text("transform: {}\n")
    path = tmp_path / "space.yaml"
    path.write_text("lr: {low: 1.0e-4, high: 1.0e-2, log: true}\nhflip: false\naugment: [none, aug/digits.yaml]\n")
    space = load_space(path)
    dims = {d.name: d for d in space.dimensions}
    assert dims["hflip"].fixed
    assert dims["lr"].log
    assert dims["augment"].choices[1] == str((tmp_path / "aug" / "digits.yaml").resolve())
    values = space.sample(FirstChoice())
    assert values["hflip"] is False
    assert values["lr"] == pytest.approx(0.0001)
    assert space.digest != parse_space(None).digest


def test_a_missing_or_broken_space_file_is_one_line(tmp_path):
    with pytest.raises(TlkitError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [0.1\n")
    with pytest.raises(TlkitError, match="not valid YAML"):
        load_space(bad)


def test_the_written_out_default_space_is_the_default():
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[1] / "pipelines" / "spaces" / "default.yaml"
    assert yaml.safe_load(path.read_text()) == DEFAULT_SPACE
    assert load_space(path).digest == parse_space(None).digest


def test_the_base_recipe_is_the_first_trial_when_the_space_contains_it():
    defaults = parse_space(None).defaults(TrainConfig())
    assert defaults == {
        "lr": 1e-3,
        "lr_mult": 3.0,
        "strategy": "freeze-unfreeze",
        "epochs": 10,
        "freeze_epochs": 1,
        "augment": "light",
        "label_smoothing": 0.0,
        "bn": "keep-stats",
    }
    # exactly `tlkit finetune` with no training flags
    assert settings_for(defaults, TrainConfig()) == TrainConfig(freeze_epochs=1)
    # 1e-3 is outside: no start point
    assert parse_space({"lr": {"low": 1e-2, "high": 1e-1}}).defaults(TrainConfig()) == {}
    assert parse_space({"lr": [0.006, 0.01], "strategy": ["full", "gradual"]}).defaults(
        TrainConfig(lr=0.006, strategy="gradual")
    ) == {"lr": 0.006, "strategy": "gradual"}
