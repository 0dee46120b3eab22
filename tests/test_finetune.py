"""Training mechanics: learning-rate ratios, freezing, BatchNorm policy, phases, resume, LR finder."""

import warnings

import lightning as L
import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

from tlkit.config import ComputeConfig, TrainConfig
from tlkit.data.ingest import ingest
from tlkit.errors import TlkitError
from tlkit.models.backbone import create_backbone
from tlkit.train.finetune import FitOptions, build_module, train_classifier, train_loader
from tlkit.train.lr_find import find_lr

CPU32 = ComputeConfig(num_workers=0, precision="32-true")
QUIET = FitOptions(progress=False)


def fast(**overrides) -> TrainConfig:
    base = dict(epochs=3, batch_size=16, lr=3e-3, augment="none", groups=3)
    return TrainConfig(**{**base, **overrides})


class Recorder(L.Callback):
    """Per epoch: which body groups had requires_grad, and the lrs the optimizer saw after each step."""

    def __init__(self):
        self.trainable, self.lrs = [], []

    def on_train_epoch_start(self, trainer, module):
        self.trainable.append(tuple(module.trainable_groups()))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups if g.get("log")})


def train(manifest, settings, **kwargs):
    recorder = Recorder()
    backbone = create_backbone(TINY_MODEL, img_size=32)
    fit = FitOptions(progress=False, callbacks=[recorder], **kwargs)
    result = train_classifier(manifest, backbone, settings, compute=CPU32, fit=fit)
    return result, recorder, backbone


@pytest.fixture(scope="module")
def manifest(digits_source):
    return ingest(digits_source, seed=0)


def test_training_learns_and_restores_the_best_epoch(workdir, manifest):
    result, _, _ = train(manifest, fast(epochs=6, strategy="full", lr_mult=1))  # from scratch: no spread
    assert result.epochs_run == 6
    assert 1 <= result.best_epoch <= 6  # counted from 1, as the progress lines and the curves count
    assert result.metrics["heldout_accuracy"] > 0.6  # 3 classes: chance is 0.33
    assert result.heldout_split == "test"
    assert len(result.y_pred) == len(manifest.split("test"))


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_group_lrs_keep_their_ratios_through_the_schedule(workdir, manifest, schedule):
    _, recorder, _ = train(manifest, fast(strategy="full", lr_mult=4, schedule=schedule))
    assert len(recorder.lrs) >= 12
    for step in recorder.lrs[1:-1]:  # after scheduler steps (cosine ends at exactly 0)
        rates = [step["group0"], step["group1"], step["group2"], step["head"]]
        assert rates[-1] > 0
        np.testing.assert_allclose(np.array(rates[1:]) / np.array(rates[:-1]), 4.0, rtol=1e-6)
    heads = [s["head"] for s in recorder.lrs]
    assert max(heads) == pytest.approx(0.003, rel=0.02)
    assert heads[-1] < max(heads)
    if schedule == "onecycle":
        assert heads[0] < max(heads)  # one-cycle warms up before it anneals


def test_frozen_groups_do_not_move_and_bn_statistics_stay_fixed(workdir, manifest):
    backbone = create_backbone(TINY_MODEL, img_size=32)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    settings = fast(strategy="linear-probe", bn="frozen")
    result = train_classifier(manifest, backbone, settings, compute=CPU32, fit=QUIET)
    after = result.module.backbone.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed in a frozen body"
    assert not torch.equal(result.module.head.weight, torch.zeros_like(result.module.head.weight))


def test_bn_train_policy_updates_statistics_of_frozen_groups(workdir, manifest):
    backbone = create_backbone(TINY_MODEL, img_size=32)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items() if "running_mean" in k}
    result = train_classifier(
        manifest,
        backbone,
        fast(strategy="linear-probe", bn="train"),
        compute=CPU32,
        fit=QUIET,
    )
    after = result.module.backbone.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())
    weights = {k: v for k, v in after.items() if k.endswith(".weight")}
    assert all(
        torch.equal(weights[k], backbone_state)
        for k, backbone_state in ((k, create_backbone(TINY_MODEL, img_size=32).model.state_dict()[k]) for k in weights)
    )


def test_freeze_unfreeze_switches_at_the_right_epoch(workdir, manifest):
    _, recorder, _ = train(manifest, fast(epochs=4, strategy="freeze-unfreeze", freeze_epochs=2, schedule="constant"))
    assert recorder.trainable == [(False,) * 3] * 2 + [(True,) * 3] * 2
    first_phase = {s["group0"] for s in recorder.lrs[: len(recorder.lrs) // 2]}
    assert first_phase == {0.0}
    assert recorder.lrs[-1]["head"] == pytest.approx(3e-3 * 0.5)  # fastai halves the rate after unfreezing


def test_gradual_unfreezes_top_down(workdir, manifest):
    _, recorder, _ = train(manifest, fast(epochs=4, strategy="gradual", unfreeze_every=1))
    assert recorder.trainable == [(False, False, False), (False, False, True), (False, True, True), (True, True, True)]


def test_lp_ft_starts_from_a_fitted_head(workdir, manifest, monkeypatch):
    from tlkit.features import forward
    from tlkit.features.extract import extract_features

    backbone = create_backbone(TINY_MODEL, img_size=32)
    extract_features(manifest, backbone, compute=CPU32, progress=False)  # the fine-tune's probe's pass

    def no_second_pass(*args, **kwargs):
        raise AssertionError("LP-FT's head must come from the cached frozen features")

    monkeypatch.setattr(forward, "forward_loader", no_second_pass)
    result = train_classifier(
        manifest,
        backbone,
        fast(epochs=2, strategy="lp-ft"),
        compute=CPU32,
        fit=FitOptions(progress=False),
    )
    assert result.settings["probe_selection_accuracy"] > 0.5
    assert result.epochs_run == 2


def test_a_group_at_rate_zero_never_trains(workdir, manifest):
    """--lrs 0,...: partial fine-tuning; the group gets no gradient (no backward pass through it), keeps its weights."""
    backbone = create_backbone(TINY_MODEL, img_size=32)
    groups = build_module(manifest, backbone, fast()).groups
    before = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    recorder = Recorder()
    train_classifier(
        manifest,
        backbone,
        fast(epochs=2, strategy="full", lrs=[0, 1e-3, 1e-3, 3e-3]),
        compute=CPU32,
        fit=FitOptions(progress=False, callbacks=[recorder]),
    )
    assert recorder.trainable == [(False, True, True)] * 2
    after = dict(backbone.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in groups[0])
    assert not all(torch.equal(before[n], after[n]) for n in groups[2])


def test_held_out_val_is_scored_a_few_times_and_changes_nothing(workdir, digits_source, monkeypatch):
    """Without a test split val chooses nothing: scoring it every epoch or at most 5 times gives the same model."""
    from tlkit.train import finetune

    manifest = ingest(digits_source, val=0.3, test=0.0, seed=0)

    class Scored(L.Callback):
        def __init__(self):
            self.epochs = []

        def on_validation_epoch_end(self, trainer, module):
            self.epochs.append(trainer.current_epoch)

    runs, default = {}, finetune.HELDOUT_CURVE_POINTS
    for points in (default, 100):
        monkeypatch.setattr(finetune, "HELDOUT_CURVE_POINTS", points)
        scored = Scored()
        result = train_classifier(
            manifest,
            create_backbone(TINY_MODEL, img_size=32),
            fast(epochs=10, strategy="full"),
            compute=CPU32,
            fit=FitOptions(progress=False, callbacks=[scored]),
        )
        runs[points] = (scored.epochs, result)
    (few, cheap), (every, full) = runs[default], runs[100]
    assert (every, few) == (list(range(10)), [1, 3, 5, 7, 9])
    np.testing.assert_array_equal(cheap.y_pred, full.y_pred)
    assert torch.equal(cheap.module.head.weight, full.module.head.weight)


def test_the_default_epochs_make_at_least_100_steps_on_a_small_set(manifest):
    """10 epochs by default, more where an epoch is only a few steps; epochs given are kept."""
    from dataclasses import replace

    from tlkit.train.finetune import MIN_DEFAULT_STEPS, with_resolved_defaults

    kept, seen = [], {}
    for r in manifest.records:  # 10 training images a class: 30 images, 8 a batch, 3 steps an epoch
        seen[(r.label, r.split)] = seen.get((r.label, r.split), 0) + 1
        if r.split != "train" or seen[(r.label, r.split)] <= 10:
            kept.append(r)
    small = replace(manifest, records=kept)
    resolved = with_resolved_defaults(TrainConfig(), small)
    assert (resolved.batch_size, resolved.epochs) == (8, -(-MIN_DEFAULT_STEPS // 3))  # 34 epochs of 3 steps
    assert with_resolved_defaults(resolved, small).epochs == resolved.epochs  # resolved once
    assert with_resolved_defaults(TrainConfig(epochs=3), small).epochs == 3
    assert with_resolved_defaults(TrainConfig(batch_size=1), small).epochs == 10  # 30 steps an epoch: 300 steps


def test_balance_weights_and_sampler(workdir, manifest):
    module = build_module(manifest, create_backbone(TINY_MODEL, img_size=32), fast(balance="weights"))
    assert torch.allclose(module.class_weights, torch.ones(3), atol=0.05)  # digits are balanced
    loader, _ = train_loader(manifest, create_backbone(TINY_MODEL, img_size=32), fast(balance="sampler"), num_workers=0)
    assert type(loader.sampler).__name__ == "WeightedRandomSampler"


def test_resume_continues_from_the_last_checkpoint(workdir, manifest):
    class Stop(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            if trainer.current_epoch == 1:
                raise RuntimeError("power cut")

    settings = fast(epochs=4, strategy="freeze-unfreeze", freeze_epochs=1)
    backbone = create_backbone(TINY_MODEL, img_size=32)
    with pytest.raises(RuntimeError, match="power cut"):
        train_classifier(
            manifest,
            backbone,
            settings,
            compute=CPU32,
            fit=FitOptions(progress=False, callbacks=[Stop()], workdir=workdir / "ck"),
        )
    saved = torch.load(workdir / "ck" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 0
    assert saved["tlkit_phase"] == 0
    recorder = Recorder()
    result = train_classifier(
        manifest,
        create_backbone(TINY_MODEL, img_size=32),
        settings,
        compute=CPU32,
        fit=FitOptions(progress=False, callbacks=[recorder], workdir=workdir / "ck", resume=True),
    )
    assert result.epochs_run == 4
    assert len(recorder.trainable) == 3  # epochs 1, 2, 3 only
    with pytest.raises(TlkitError, match="nothing to resume"):
        train_classifier(
            manifest, backbone, settings, fit=FitOptions(workdir=workdir / "none", resume=True, progress=False)
        )


def test_lr_finder_keeps_ratios_and_restores_weights(workdir, manifest):
    backbone = create_backbone(TINY_MODEL, img_size=32)
    settings = fast(lr_mult=10)
    module = build_module(manifest, backbone, settings)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    loader, _ = train_loader(manifest, backbone, settings, num_workers=0)
    result = find_lr(module, loader, steps=40, min_lr=1e-5, max_lr=1.0)
    assert 1e-05 <= result.suggestion <= 1.0
    assert len(result.lrs) == len(result.losses) >= 5
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())
    assert result.losses[0] > result.losses.min()  # the loss fell somewhere in the sweep


def test_best_epoch_is_accuracy_first_then_lower_loss():
    from tlkit.train.module import selection_score

    n = 10
    assert selection_score(9, 2.0, n) > selection_score(9, 5.0, n)  # same accuracy: lower loss wins
    assert selection_score(9, 1e6, n) > selection_score(8, 0.0, n)  # one more correct image always wins


def test_use_val_train_trains_on_val_and_keeps_the_last_epoch(workdir, manifest):
    seen = []

    class Batches(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            seen.append(len(trainer.train_dataloader.dataset))

    n_train, n_val = len(manifest.split("train")), len(manifest.split("val"))
    result, _, _ = train(manifest, fast(epochs=2, use_val="train"))
    assert result.best_epoch is None
    assert result.best_val_accuracy is None
    assert result.epochs_run == 2
    backbone = create_backbone(TINY_MODEL, img_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_classifier(
            manifest,
            backbone,
            fast(epochs=1, use_val="train", strategy="full"),
            compute=CPU32,
            fit=FitOptions(progress=False, callbacks=[Batches()]),
        )
    assert seen == [n_train + n_val]
    # no val loader is the plan, not a mistake to report
    assert not [w for w in caught if "val_dataloader" in str(w.message)]
    assert result.heldout_split == "test"
    assert len(result.y_true) == len(manifest.split("test"))


def test_without_test_split_val_chooses_no_epoch(workdir, digits_source):
    """Train/val data: the schedule runs to its end, the last epoch is kept and scored on val."""
    manifest = ingest(digits_source, val=0.3, test=0.0, seed=0)
    result, _, _ = train(manifest, fast(epochs=3, strategy="full", lr_mult=1))
    assert result.heldout_split == "val"
    assert result.best_epoch is None
    assert result.best_val_accuracy is None
    assert result.settings["selection"]["epoch"].startswith("last")
    assert len(result.y_true) == len(manifest.split("val"))
    with pytest.raises(TlkitError, match="--patience stops on the val split, but this data has no test split"):
        train(manifest, fast(patience=2))


def test_lp_ft_probe_never_chooses_on_the_held_out_val(workdir, digits_source):
    manifest = ingest(digits_source, val=0.3, test=0.0, seed=0)
    result, _, _ = train(manifest, fast(epochs=2, strategy="lp-ft"))
    assert result.settings["selection"]["probe_C"].endswith("-fold cross-validation on train")
    with_test, _, _ = train(ingest(digits_source, seed=0), fast(epochs=2, strategy="lp-ft"))
    assert with_test.settings["selection"]["probe_C"] == "validation split"


def test_keep_stats_keeps_every_batchnorm_in_eval_mode_while_training(workdir, manifest):
    backbone = create_backbone(TINY_MODEL, img_size=32)
    module = build_module(manifest, backbone, fast(strategy="full", bn="keep-stats"))
    module.apply_phase(0)
    module.train()
    norms = [m for m in module.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    assert not any(m.training for m in norms)
    assert all(p.requires_grad for m in norms for p in m.parameters())  # scale and shift still learn
    before = [m.running_mean.clone() for m in norms]
    module(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms))


def test_one_epoch_runs_with_the_default_freeze(workdir, manifest):
    """freeze-unfreeze with --epochs 1 and no --freeze-epochs: no head-only epoch, everything trains once."""
    result, recorder, _ = train(manifest, fast(epochs=1, strategy="freeze-unfreeze"))
    assert result.epochs_run == 1
    assert recorder.trainable == [(True, True, True)]
    with pytest.raises(ValueError, match="freeze_epochs \\(2\\) must be below epochs \\(2\\)"):
        fast(epochs=2, strategy="freeze-unfreeze", freeze_epochs=2)


def test_lp_ft_two_class_head_starts_with_the_probe_s_probabilities(workdir, tmp_path):
    """The LP-FT head of a two-class task gives the fitted logistic regression's probabilities, not sharper ones."""
    from sklearn.linear_model import LogisticRegression

    from tlkit.data.samples import write_digits
    from tlkit.features.extract import extract_features
    from tlkit.train.finetune import LP_FT_C_GRID, fit_linear_probe

    write_digits(tmp_path / "two", classes="0-1", per_class=20, size=32, seed=0)
    two = ingest(tmp_path / "two", seed=0)
    backbone = create_backbone(TINY_MODEL, img_size=32)
    module = build_module(two, backbone, fast(strategy="lp-ft"))
    features = extract_features(two, backbone, compute=CPU32, progress=False)
    fit_linear_probe(module, features)
    X, y = features.subset("train")
    with torch.no_grad():
        logits = module.head(torch.from_numpy(X)).double().numpy()
    odds = logits[:, 1] - logits[:, 0]  # log-odds of class 1: the probe's decision function, not twice it
    probes = [LogisticRegression(C=C, max_iter=3000).fit(X, y) for C in LP_FT_C_GRID]
    errors = [float(np.abs(odds - p.decision_function(X)).max() / np.abs(p.decision_function(X)).max()) for p in probes]
    assert min(errors) < 1e-3, errors


def test_the_kept_epoch_counts_from_one_and_a_fit_leaves_no_folder_behind(workdir, manifest, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the system's temporary folder, for this test alone
    result, _, _ = train(manifest, fast(epochs=1, strategy="full"))
    assert result.best_epoch == 1  # the first epoch, as the progress line and the curves call it
    assert list(scratch.iterdir()) == []  # its checkpoints went with it
