"""tlkit tune: honest selection splits, pruning, MLflow parent/child runs, Ctrl-C and resume, the pipeline stage."""

from __future__ import annotations

import logging
import sys
import time

import optuna
import pytest
import yaml
from conftest import TINY_MODEL

from tlkit.cli.app import app
from tlkit.config import BackboneConfig, ComputeConfig, SplitConfig, TrainConfig, TuneConfig
from tlkit.data.ingest import ingest
from tlkit.errors import TlkitError
from tlkit.models.backbone import create_backbone
from tlkit.pipelines import tune
from tlkit.pipelines.space import parse_space
from tlkit.runs.stages import RunOptions
from tlkit.train.finetune import FitOptions, train_classifier

SPACE = {
    "lr": {"low": 2e-3, "high": 2e-2, "log": True},
    "epochs": [2, 3],
    "strategy": ["full", "freeze-unfreeze"],
    "freeze_epochs": 1,
    "augment": "none",
    "hflip": False,
}
BACKBONE = BackboneConfig(model=TINY_MODEL, pretrained=False, img_size=32)


def _paths(manifest, *splits):
    return {r.path for r in manifest.records if r.split in splits}


def test_with_a_test_split_trials_get_train_and_val_only(digits_target):
    manifest = ingest(digits_target, val=0.2, test=0.3, seed=0)
    splits = tune.tune_splits(manifest)
    assert splits.heldout == "test"
    assert splits.final_use_val == "train"
    assert not _paths(splits.trials, "test")
    assert not _paths(splits.trials, "train", "val") & _paths(manifest, "test")
    assert _paths(splits.trials, "val") == _paths(manifest, "val")
    assert splits.trials.fingerprint != manifest.fingerprint  # a different set of images


def test_with_train_and_val_only_the_selection_split_comes_out_of_train(digits_target):
    manifest = ingest(digits_target, val=0.3, test=0.0, seed=0)
    splits = tune.tune_splits(manifest, fraction=0.2, seed=1)
    assert splits.heldout == "val"
    assert splits.final_use_val == "select"
    assert splits.final is manifest
    trial_paths = _paths(splits.trials, "train", "val", "test")
    assert not (trial_paths & _paths(manifest, "val"))  # the held-out val images are not in the trials' data at all
    assert trial_paths == _paths(manifest, "train")
    selection = splits.trials.split("val")
    per_class = {label: sum(r.label == label for r in selection) for label in manifest.classes}
    n_train = {label: sum(r.label == label for r in manifest.split("train")) for label in manifest.classes}
    assert all(per_class[c] == round(0.2 * n_train[c]) for c in manifest.classes), per_class


def test_a_dataset_without_a_heldout_split_is_refused(digits_target):
    manifest = ingest(digits_target, val=0.0, test=0.0, seed=0)
    with pytest.raises(TlkitError, match="needs a held-out split"):
        tune.tune_splits(manifest)


def test_a_hopeless_trial_is_pruned_before_its_schedule_ends(digits_target):
    """Three finished trials scored 0.9 at every step; a trial that cannot learn (lr ~ 0) stops early."""
    study = optuna.create_study(direction="maximize", pruner=tune.pruner())
    for _ in range(3):
        study.add_trial(optuna.trial.create_trial(value=0.9, intermediate_values={step: 0.9 for step in range(1, 101)}))
    manifest = tune.tune_splits(ingest(digits_target, val=0.2, test=0.3, seed=0)).trials
    backbone = create_backbone(TINY_MODEL, pretrained=False, img_size=32)
    pruning = tune.PruningCallback(study.ask())
    settings = TrainConfig(epochs=8, lr=1e-9, strategy="full", augment="none", hflip=False)
    fit = FitOptions(callbacks=[pruning], progress=False)
    result = train_classifier(manifest, backbone, settings, fit=fit, compute=ComputeConfig(precision="32-true"))
    assert pruning.pruned_at is not None
    assert pruning.pruned_at < 8
    assert result.epochs_run == pruning.pruned_at  # training stopped at that epoch's end


QUIET = RunOptions(progress=False)


def _tune(data, tmp_path, space=SPACE, **settings):
    study = TuneConfig(**{"trials": 3, "storage": f"sqlite:///{tmp_path / 'optuna.db'}", **settings})
    job = tune.TuneJob(
        data,
        BACKBONE,
        parse_space(space),
        base=TrainConfig(seed=0),
        settings=study,
        split=SplitConfig(val=0.2, test=0.3),
    )
    return tune.run_tune(job, run=QUIET)


def test_trials_never_see_the_heldout_split_and_the_best_is_retrained_once(
    tracked, digits_target, tmp_path, monkeypatch
):
    seen = []
    real = train_classifier

    def spy(manifest, *args, **kwargs):
        seen.append(manifest)
        return real(manifest, *args, **kwargs)

    monkeypatch.setattr("tlkit.train.finetune.train_classifier", spy)
    outcome = _tune(digits_target, tmp_path)
    heldout = _paths(ingest(digits_target, val=0.2, test=0.3, seed=0), "test")
    trials, final = seen[:-1], seen[-1]
    assert len(trials) == 3
    assert all(not _paths(m, "train", "val", "test") & heldout for m in trials)
    assert _paths(final, "test") == heldout  # the retrain is scored on the held-out split ...
    assert outcome.final is not None
    assert outcome.trials["COMPLETE"] + outcome.trials["PRUNED"] == 3

    runs = {r.info.run_id: r for r in tracked.search_runs([tracked.get_experiment_by_name("tests").experiment_id])}
    parent = runs[outcome.parent_run_id]
    children = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trial_runs = [r for r in children if r.data.tags["tlkit.stage"] == "trial"]
    assert len(trial_runs) == 3
    assert all(r.info.status == "FINISHED" for r in trial_runs)
    # the curve
    assert all(
        len(tracked.get_metric_history(r.info.run_id, "val_accuracy")) == int(r.data.metrics["epochs_run"])
        for r in trial_runs
    )
    assert all("heldout_accuracy" not in r.data.metrics for r in trial_runs)  # trials have no held-out figure
    assert sum(r.data.tags.get("tlkit.best_trial") == "true" for r in trial_runs) == 1
    finals = [r for r in children if r.data.tags.get("tlkit.role") == "tune-final"]
    assert len(finals) == 1
    assert finals[0].info.run_id == outcome.final.run_id
    assert parent.data.metrics["heldout_accuracy"] == finals[0].data.metrics["heldout_accuracy"]
    assert parent.data.params["heldout_split"] == "test"
    assert "val split" in parent.data.params["selection.recipe"]
    artifacts = {a.path for a in tracked.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/param_importances.png"} <= artifacts
    assert "--use-val train" in outcome.command
    assert "--no-hflip" in outcome.command

    # the same call again: the study is complete, nothing is trained or logged twice
    seen.clear()
    again = _tune(digits_target, tmp_path)
    assert not seen
    assert again.final.run_id == outcome.final.run_id
    assert again.parent_run_id == outcome.parent_run_id

    from tlkit.runs.compare import compare

    board, _ = compare(experiment="tests", out=tmp_path / "compare")
    # the study is one row; its retrain is not counted twice
    assert [e.label for e in board.entries] == [parent.info.run_name]


class _CtrlC(tune.PruningCallback):
    """Presses Ctrl-C during trial 1's first epoch (Lightning turns it into SystemExit, as on a real terminal)."""

    def on_train_batch_end(self, trainer, *args):
        if self.trial.number == 1:
            raise KeyboardInterrupt


def test_ctrl_c_marks_open_runs_killed_and_the_same_command_resumes(
    tracked, digits_target, tmp_path, monkeypatch, runner
):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    argv = [
        "tune",
        str(digits_target),
        "--model",
        TINY_MODEL,
        "--no-pretrained",
        "--img-size",
        "32",
        "--space",
        str(space),
        "--trials",
        "3",
        "--val",
        "0.2",
        "--test",
        "0.3",
        "--experiment",
        "tests",
    ]
    monkeypatch.setattr("tlkit.pipelines.tune.trials.PruningCallback", _CtrlC)  # where a trial builds it
    monkeypatch.setattr(sys, "argv", ["tlkit", *argv])  # the resume hint repeats the command line
    logged = []
    keep = logging.Handler()
    keep.emit = logged.append
    logging.getLogger("optuna").addHandler(keep)  # Optuna's own handler writes to the real stderr, past the runner
    try:
        result = runner.invoke(app, argv)
    finally:
        logging.getLogger("optuna").removeHandler(keep)
    assert result.exit_code == 130, result.output
    assert "the same command resumes the study" in result.output
    # no "Trial 1 failed ... KeyboardInterrupt" and its 110-line traceback
    assert not [r for r in logged if r.levelno >= logging.WARNING]
    storage = tune.open_storage(tune.default_storage())
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    runs = tracked.search_runs([tracked.get_experiment_by_name("tests").experiment_id])
    status = {r.info.run_name.split(" (")[0]: r.info.status for r in runs}
    assert status["trial 0"] == "FINISHED"
    assert status["trial 1"] == "KILLED"
    assert status[f"tune {TINY_MODEL}: {summary.study_name}"] == "KILLED"

    monkeypatch.setattr("tlkit.pipelines.tune.trials.PruningCallback", _CtrlC.__mro__[1])
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    # trial 0 kept, the failed one redone
    assert [t.state.name for t in study.trials] == [
        "COMPLETE",
        "FAIL",
        "COMPLETE",
        "COMPLETE",
    ]
    runs = tracked.search_runs([tracked.get_experiment_by_name("tests").experiment_id])
    parents = [r for r in runs if r.data.tags.get("tlkit.stage") == "tune"]
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"  # one study, one parent run, continued
    assert "reproduce it: tlkit finetune" in result.output


def test_a_study_started_with_other_inputs_is_refused(tracked, digits_target, tmp_path):
    _tune(digits_target, tmp_path, trials=1, study="shared")
    with pytest.raises(TlkitError, match="was started with other space"):
        _tune(digits_target, tmp_path, {**SPACE, "epochs": [2]}, trials=1, study="shared")


def test_an_unreachable_storage_is_a_one_line_error_in_seconds():
    with pytest.raises(TlkitError, match=r"cannot open Optuna storage postgresql://tlkit:\*\*\*@127.0.0.1:9/none"):
        tune.open_storage("postgresql://tlkit:secret@127.0.0.1:9/none")


def test_the_cli_checks_its_options_before_anything_runs(runner, workdir, digits_target):
    result = runner.invoke(app, ["tune", str(digits_target), "--model", TINY_MODEL, "--budget", "soon"])
    assert result.exit_code == 1
    assert "is not a duration" in result.output
    bad = workdir / "space.yaml"
    bad.write_text("lr_mul: [1, 2]\n")
    result = runner.invoke(app, ["tune", str(digits_target), "--model", TINY_MODEL, "--space", str(bad)])
    assert result.exit_code == 1
    assert "did you mean 'lr_mult'" in result.output
    assert not (workdir / "mlflow.db").exists()
    assert not (workdir / "optuna.db").exists()


def test_a_pipeline_tune_stage_feeds_later_stages_and_is_reused(workdir, digits_target, tmp_path):
    from tlkit.pipelines.pipeline import run_pipeline

    pipeline = workdir / "tune.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {
                "name": "tune-test",
                "datasets": {"d": {"path": str(digits_target), "val": 0.2, "test": 0.3}},
                "backbone": {"model": TINY_MODEL, "pretrained": False, "img_size": 32},
                # evaluate scores a saved model in float32; the tune's held-out figure comes from the training
                # precision, which "auto" makes bf16 on a CPU with native bf16: the same figure only in float32
                "compute": {"precision": "32-true"},
                "stages": [
                    {"id": "tuned", "stage": "tune", "data": "d", "trials": 2, "space": SPACE},
                    {"id": "scored", "stage": "evaluate", "model": "tuned", "data": "d"},
                    {
                        "id": "shipped",
                        "stage": "export",
                        "model": "tuned",
                        "format": "torchscript",
                        "out": "exported-{seed}",
                        "force": True,
                    },
                ],
                "seeds": [3],
            }
        )
    )
    summary = run_pipeline(pipeline)
    rows = {row.id: row for row in summary.rows}
    # evaluate scores the tune's model on the split the tune reported on (test here): the same figure
    assert rows["scored"].metrics["test_accuracy"] == pytest.approx(rows["tuned"].metrics["heldout_accuracy"])
    assert rows["shipped"].metrics["max_abs_difference"] < 0.001
    assert sorted(p.suffix for p in (workdir / "exported-3").iterdir()) == [".json", ".pt"]
    again = run_pipeline(pipeline)
    assert {row.id: row.reused_from for row in again.rows}["tuned"] == rows["tuned"].run_id

    broken = yaml.safe_load(pipeline.read_text())
    broken["stages"][0]["space"] = {"lr_mul": [1, 2]}
    pipeline.write_text(yaml.safe_dump(broken))
    with pytest.raises(TlkitError, match="unknown setting 'lr_mul'"):
        run_pipeline(pipeline)


def test_shipped_tune_pipelines_name_valid_spaces():
    from pathlib import Path

    from tlkit.pipelines.pipeline import resolve_files
    from tlkit.pipelines.points import space_of
    from tlkit.pipelines.schema import TuneStage, load_pipeline

    folder = Path(__file__).resolve().parents[1] / "pipelines"
    stages = [
        s
        for path in folder.glob("tune-*.yaml")
        for s in resolve_files(load_pipeline(path), folder).stages
        if isinstance(s, TuneStage)
    ]
    assert len(stages) == 2
    assert all(stage.trials == 15 for stage in stages)
    assert all(space_of(stage, folder).searched() for stage in stages)


def test_trial_0_is_the_base_recipe(tracked, digits_target, tmp_path):
    space = parse_space(
        {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "epochs": [2, 3], "augment": "none", "hflip": False}
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    job = tune.TuneJob(
        digits_target,
        BACKBONE,
        space,
        base=TrainConfig(epochs=2, augment="none", hflip=False),
        settings=TuneConfig(trials=1, storage=storage),
        split=SplitConfig(val=0.2, test=0.3),
    )
    outcome = tune.run_tune(job, run=QUIET)
    (first,) = optuna.load_study(study_name=outcome.study, storage=storage).trials
    assert first.params == {"lr": 0.001, "epochs": 2}
    assert first.user_attrs["default_recipe"]


class EpochClock:
    """The tune's clock, driven by the test: every epoch of every fit (trials and the retrain) takes one second, the
    set-up of a fit half a second, and nothing else takes any time. The budget's decisions then do not depend on how
    busy the machine is."""

    EPOCH_S, SETUP_S = 1.0, 0.5

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def install(self, monkeypatch) -> None:
        import types

        from tlkit.pipelines.tune import search, trials
        from tlkit.train.callbacks import PhaseCallback

        fake_time = types.SimpleNamespace(
            monotonic=self.monotonic, time=time.time, perf_counter=time.perf_counter, sleep=time.sleep
        )
        for module in (search, trials):  # the budget's start and a trial's deadline read this clock
            monkeypatch.setattr(module, "time", fake_time)
        epoch_end, train_start = PhaseCallback.on_train_epoch_end, PhaseCallback.on_train_start
        clock = self

        def on_train_start(callback, trainer, module):
            clock.now += clock.SETUP_S
            return train_start(callback, trainer, module)

        def on_train_epoch_end(callback, trainer, module):
            clock.now += clock.EPOCH_S
            return epoch_end(callback, trainer, module)

        monkeypatch.setattr(PhaseCallback, "on_train_start", on_train_start)
        monkeypatch.setattr(PhaseCallback, "on_train_epoch_end", on_train_epoch_end)


def test_a_budget_bounds_the_whole_tune_and_scales_a_recipe_that_would_not_fit(tracked, digits_target, monkeypatch):
    """A 60-epoch recipe in a 15 s budget: trial 0 is cut to what fits beside its retrain, the retrain runs that many
    epochs, and the command ends within the budget plus about one epoch (on the test's clock: see EpochClock)."""
    from tlkit.pipelines.space import parse_space

    clock = EpochClock()
    clock.install(monkeypatch)
    space = parse_space({**SPACE, "lr": [1e-2, 5e-3], "epochs": 60, "strategy": "full"})
    lines = []
    start = clock.monotonic()
    job = tune.TuneJob(
        digits_target,
        BACKBONE,
        space,
        base=TrainConfig(seed=0),
        settings=TuneConfig(budget="15s"),
        split=SplitConfig(val=0.2, test=0.3),
        compute=ComputeConfig(num_workers=0),
    )
    outcome = tune.run_tune(job, report=lines.append)
    elapsed = clock.monotonic() - start
    first = lines[0]
    assert first.state == "COMPLETE", first
    assert 2 <= first.epochs < 60, first
    assert "scaled to the budget" in first.note, first
    assert elapsed <= 15 + EpochClock.EPOCH_S + EpochClock.SETUP_S, (elapsed, lines)
    assert outcome.final is not None
    final = tracked.get_run(outcome.final.run_id)
    assert int(final.data.params["train.epochs"]) == first.epochs  # the recipe as scaled
