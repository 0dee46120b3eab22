import pytest
from pydantic import ValidationError

from tlkit.config import TrainConfig
from tlkit.errors import TlkitError
from tlkit.models.backbone import merge_groups
from tlkit.train.strategies import Phase, group_lrs, phase_index, plan_phases


def test_freeze_unfreeze_is_head_then_everything_at_half_rate():
    assert plan_phases("freeze-unfreeze", epochs=5, n_groups=4, freeze_epochs=2) == [
        Phase(0, 0, "head"),
        Phase(2, 4, "all", 0.5),
    ]


def test_gradual_unfreezes_one_group_from_the_top_every_k_epochs():
    phases = plan_phases("gradual", epochs=7, n_groups=3, unfreeze_every=2)
    assert [(p.start, p.trainable) for p in phases] == [(0, 0), (2, 1), (4, 2), (6, 3)]
    assert phase_index(phases, 5) == 2
    assert phase_index(phases, 6) == 3


@pytest.mark.parametrize("strategy,expected", [("linear-probe", [(0, 0)]), ("full", [(0, 4)]), ("lp-ft", [(0, 4)])])
def test_single_phase_strategies(strategy, expected):
    assert [(p.start, p.trainable) for p in plan_phases(strategy, epochs=3, n_groups=4)] == expected


def test_bad_strategy_settings_are_refused_by_the_settings_once():
    with pytest.raises(TlkitError, match="unknown strategy 'fast'"):
        plan_phases("fast", epochs=3, n_groups=2)
    with pytest.raises(ValidationError, match=r"freeze_epochs \(2\) must be below epochs \(2\)"):
        TrainConfig(epochs=2, freeze_epochs=2)
    with pytest.raises(ValidationError, match="lr_mult"):
        TrainConfig(lr_mult=0.5)
    with pytest.raises(ValidationError, match="unfreeze_every"):
        TrainConfig(unfreeze_every=0)


def test_geometric_spread_and_explicit_rates():
    assert group_lrs(0.9, 2, lr_mult=3) == pytest.approx([0.1, 0.3, 0.9])
    assert group_lrs(1.0, 2, lrs=[1, 2, 3]) == [1.0, 2.0, 3.0]
    with pytest.raises(TlkitError, match="needs 3 values"):
        group_lrs(1.0, 2, lrs=[1, 2])


def test_frozen_groups_get_rate_zero_and_one_group_must_train():
    assert group_lrs(1e-3, 4, lr_mult=3.0, frozen=1) == pytest.approx([0.0, 1e-3 / 27, 1e-3 / 9, 1e-3 / 3, 1e-3])
    assert group_lrs(1e-3, 2, lrs=[1e-5, 1e-4, 1e-3], frozen=1) == [0.0, 1e-4, 1e-3]
    with pytest.raises(TlkitError, match="--frozen-groups 4 leaves none of the 4 layer groups to train"):
        group_lrs(1e-3, 4, frozen=4)


def test_merge_keeps_order_and_every_parameter():
    groups = [(f"g{i}", [f"p{i}.{j}" for j in range(size)]) for i, size in enumerate([1, 5, 2, 2, 8, 1])]
    merged = merge_groups(groups, 3)
    assert len(merged) == 3
    assert [n for _, names in merged for n in names] == [n for _, names in groups for n in names]
    assert merge_groups(groups, None) == groups
    assert merge_groups(groups, 10) == groups
