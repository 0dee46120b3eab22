import csv

import pytest

from tlkit.core.tracking import RunRecord
from tlkit.errors import TlkitError
from tlkit.runs.compare import build_leaderboard, descendants, leaderboard_table, lower_is_better


def run(
    run_id, name, value, *, params=None, parent=None, reused=None, metric="heldout_accuracy", status="FINISHED"
) -> RunRecord:
    tags = {"tlkit.stage_id": name}
    if parent:
        tags["mlflow.parentRunId"] = parent
    if reused:
        tags["tlkit.reused_from"] = reused
    return RunRecord(run_id, name, status, "1", dict(params or {}), {metric: value}, tags, 0)


def no_history(run_id, key):
    return []


def test_seeds_of_one_setting_make_one_row_sorted_best_first():
    runs = [
        run("a0", "tuned", 0.80, params={"train.strategy": "full", "train.seed": "0", "data.fingerprint": "x"}),
        run("a1", "tuned", 0.90, params={"train.strategy": "full", "train.seed": "1", "data.fingerprint": "x"}),
        run("b0", "tuned", 0.95, params={"train.strategy": "gradual", "train.seed": "0", "data.fingerprint": "x"}),
        run("p0", "pixels", 0.70, params={"classifier": "svm", "seed": "0", "data.fingerprint": "x"}),
        run("k0", "tuned", 0.99, params={"train.strategy": "lp-ft"}, status="KILLED"),
    ]
    board = build_leaderboard(runs, "heldout_accuracy", no_history)
    assert [(e.label, e.settings.get("train.strategy"), e.n) for e in board.entries] == [
        ("tuned", "gradual", 1),
        ("tuned", "full", 2),
        ("pixels", None, 1),
    ]
    full = board.entries[1]
    assert full.mean == pytest.approx(0.85)
    assert full.std == pytest.approx(0.05)
    assert board.columns == ["train.strategy"]  # seeds and fingerprints are not settings


def test_seeds_that_kept_different_candidates_are_still_one_row():
    """What a fine-tune delivered (the network or its probe, tlkit.train.choice) is an outcome, not a setting."""
    kept = [("finetune", "svm"), ("probe", "logreg"), ("probe", "svm")]
    runs = [
        run(
            f"d{seed}",
            "default",
            0.8 + seed / 100,
            params={
                "train.seed": str(seed),
                "train.keep": "best",
                "kept": k,
                "probe_classifier": c,
                "selection.kept": "the val split (test reports)",
            },
        )
        for seed, (k, c) in enumerate(kept)
    ]
    board = build_leaderboard(runs, "heldout_accuracy", no_history)
    assert [(e.label, e.n) for e in board.entries] == [("default", 3)]
    assert board.columns == []


def test_runs_of_different_datasets_are_rows_of_their_own_labelled_with_the_dataset():
    def on(run_id, value, source, fingerprint):
        return run(run_id, "svm", value, params={"data.source": source, "data.fingerprint": fingerprint})

    runs = [
        on("a", 0.60, "/data/flowers", "aaaaaaaa1111"),
        on("b", 0.95, "/data/digits", "bbbbbbbb2222"),
        on("c", 0.70, "/data/flowers", "aaaaaaaa1111"),
        on("d", 0.90, "/data/digits", "bbbbbbbb2222"),
    ]
    board = build_leaderboard(runs, "heldout_accuracy", no_history)
    assert [(e.dataset, e.n) for e in board.entries] == [("digits bbbbbbbb", 2), ("flowers aaaaaaaa", 2)]
    assert board.entries[1].mean == pytest.approx(0.65)  # grouped by dataset, never ranked across datasets
    assert board.rows()[0]["dataset"] == "digits bbbbbbbb"
    shown = leaderboard_table(board)
    assert [c.header for c in shown.columns][:3] == ["#", "run", "dataset"]
    for drawn in runs:  # a pipeline names its data: seeds that draw other images are still one dataset
        drawn.tags["tlkit.dataset"] = "photos"
    assert [(e.dataset, e.n) for e in build_leaderboard(runs, "heldout_accuracy", no_history).entries] == [
        ("photos", 4)
    ]


def test_an_evaluate_run_shows_the_figure_it_measured():
    tta = run("e1", "evaluate on test (tta)", 0.81, metric="test_accuracy", params={"tta": "True"})
    tta.tags["tlkit.stage"] = "evaluate"
    tta.metrics["test_tta_accuracy"] = 0.84
    plain = run("t1", "tuned", 0.8)
    board = build_leaderboard([tta, plain], "heldout_accuracy", no_history)
    assert [e.label for e in board.entries] == ["tuned"]  # a re-scoring is no held-out result of a method
    board = build_leaderboard([tta], "test_accuracy", no_history)
    assert board.entries[0].label == "evaluate on test (tta): test_accuracy without tta"
    board = build_leaderboard([tta], "test_tta_accuracy", no_history)
    assert (board.entries[0].label, board.entries[0].mean) == ("evaluate on test (tta)", 0.84)


def test_reused_runs_count_once_and_history_gives_the_best_epoch():
    runs = [run("orig", "pre", 0.5), run("copy1", "pre", 0.5, reused="orig"), run("copy2", "pre", 0.5, reused="orig")]
    board = build_leaderboard(runs, "heldout_accuracy", no_history)
    assert board.entries[0].n == 1
    curves = {"r1": [0.2, 0.9, 0.6]}
    board = build_leaderboard([run("r1", "tuned", 0.6, metric="val_accuracy")], "val_accuracy", lambda r, k: curves[r])
    assert board.entries[0].mean == 0.9  # best epoch, not the last
    loss = build_leaderboard([run("r1", "tuned", 0.6, metric="val_loss")], "val_loss", lambda r, k: [0.9, 0.3, 0.5])
    assert loss.entries[0].mean == 0.3
    assert lower_is_better("val_loss")


def test_weights_from_runs_are_named_by_stage_not_id():
    runs = [
        run("pre1", "pre", 1.0),
        run("t1", "tuned", 0.8, params={"weights": "runs:/pre1"}),
        run("pre2", "pre", 1.0),
        run("t2", "tuned", 0.9, params={"weights": "runs:/pre2"}),
    ]
    board = build_leaderboard(runs, "heldout_accuracy", no_history)
    tuned = [e for e in board.entries if e.label == "tuned"]
    assert len(tuned) == 1
    assert tuned[0].settings["weights"] == "runs:/pre"
    assert tuned[0].n == 2


def test_descendants_and_unknown_metric():
    runs = [run("c", "child", 0.1, parent="p"), run("g", "grandchild", 0.2, parent="c"), run("o", "other", 0.3)]
    assert {r.run_id for r in descendants(runs, "p")} == {"c", "g"}
    with pytest.raises(TlkitError, match="no finished run has a metric 'f1'; pick one with --metric"):
        build_leaderboard(runs, "f1", no_history)


def test_compare_command_prints_writes_and_logs(tracked, tmp_path, digits_target, runner):
    from test_pipeline import sweep_pipeline

    from tlkit.cli.app import app
    from tlkit.pipelines.pipeline import run_pipeline

    summary = run_pipeline(
        sweep_pipeline(tmp_path, digits_target),
        experiment="cmp",
        overrides=[
            "stages=[{id: svm, stage: baseline, data: digits, baseline: {classifier: pixels}}]",
            "sweep={stages.svm.baseline.pixel_size: [8, 16]}",
        ],
    )
    out = tmp_path / "board"
    result = runner.invoke(app, ["compare", "--parent", summary.run_id, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "pixel_size" in result.output
    assert "± " in result.output
    rows = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert sorted(r["pixel_size"] for r in rows) == ["16", "8"]
    assert {r["n"] for r in rows} == {"2"}
    assert (out / "leaderboard.png").stat().st_size > 1000
    assert float(rows[0]["heldout_accuracy_mean"]) >= float(rows[1]["heldout_accuracy_mean"])
    listed = runner.invoke(app, ["compare", "--experiment", "cmp", "--out", str(out)])
    assert listed.exit_code == 0
    assert "pixel_size" in listed.output
    missing = runner.invoke(app, ["compare", "--experiment", "nope"])
    assert missing.exit_code == 1
    assert "no experiment 'nope'" in missing.output


def test_a_rows_values_are_in_seed_order_however_the_runs_finished():
    """With `tlkit run --jobs`, seed 2 may finish before seed 0: the values still read seed by seed."""
    runs = [run(f"s{seed}", "tuned", value) for seed, value in ((2, 0.7), (10, 0.9), (0, 0.5), (1, 0.6))]
    for record, seed in zip(runs, (2, 10, 0, 1)):
        record.tags["tlkit.seed"] = str(seed)
    entry = build_leaderboard(runs, "heldout_accuracy", no_history).entries[0]
    assert entry.values == [0.5, 0.6, 0.7, 0.9]
    assert entry.run_ids == ["s0", "s1", "s2", "s10"]
