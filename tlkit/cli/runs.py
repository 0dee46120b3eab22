"""`tlkit run`, `compare` and `ui`: pipelines, the leaderboard of runs, and the MLflow UI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tlkit.cli.apps import app
from tlkit.cli.common import STORE
from tlkit.cli.options import settings
from tlkit.cli.output import console
from tlkit.cli.process import command


@app.command("run")
@command
@settings(**STORE)
def run_command(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file, e.g. pipelines/quickstart.yaml.")],
    store: dict,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a setting: KEY.PATH=VALUE, e.g. stages.*.train.epochs=2 (repeatable)."),
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Recompute every stage, even those whose inputs are unchanged.")
    ] = False,
    experiment: Annotated[
        str | None,
        typer.Option(envvar="MLFLOW_EXPERIMENT_NAME", help="MLflow experiment (default: the pipeline file's)."),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            help="Points (sweep point, seed) to run at once, each in its own process "
            "with its share of the cores (default: the file's jobs, else 1).",
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run the points as tasks on a Ray cluster: auto, HOST:6379 or ray://HOST:10001 "
            "(default: the file's ray.address; needs pip install 'tlkit[ray]').",
        ),
    ] = None,
):
    """Run a pipeline file: its stages in order, every sweep point and seed, as nested MLflow runs."""
    from tlkit.pipelines.sweep import plan_pipeline

    plan_pipeline(pipeline, set_)  # the file and every grid point checked before the stages' heavy imports
    from tlkit.pipelines.pipeline import print_summary, run_pipeline

    summary = run_pipeline(
        pipeline,
        overrides=set_,
        tracking_uri=store["tracking_uri"],
        experiment=experiment,
        reuse=not fresh,
        jobs=jobs,
        ray=ray,
        console=console,
    )
    print_summary(summary, console)


@app.command("compare")
@command
@settings(**STORE)
def compare_command(
    store: dict,
    experiment: Annotated[
        str | None,
        typer.Option(envvar="MLFLOW_EXPERIMENT_NAME", help="MLflow experiment whose runs to rank (default: tlkit)."),
    ] = None,
    parent: Annotated[
        str | None,
        typer.Option(help="Rank only the runs under this pipeline run (its id); the table is logged to it."),
    ] = None,
    metric: Annotated[
        str, typer.Option(help="Metric to rank by; per-epoch metrics count their best epoch.")
    ] = "heldout_accuracy",
    out: Annotated[Path, typer.Option(help="Folder for leaderboard.csv and leaderboard.png.")] = Path("compare"),
):
    """Leaderboard of runs: mean ± std over seeds, best first, with the settings that differ as columns."""
    from tlkit.runs.compare import compare, leaderboard_table

    board, files = compare(
        experiment=experiment, parent=parent, metric=metric, out=out, tracking_uri=store["tracking_uri"]
    )
    console.print(leaderboard_table(board))
    console.print(
        f"written: {', '.join(str(f) for f in files)}" + (f"; logged to run {parent} under compare/" if parent else ""),
        highlight=False,
    )


@app.command("ui")
@command
@settings(**STORE)
def ui_command(
    store: dict,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
    host: Annotated[
        str, typer.Option(help="Address to listen on; keep 127.0.0.1 unless you mean to share it.")
    ] = "127.0.0.1",
    experiment: Annotated[
        str | None, typer.Option(help="Experiment whose runs page to print (default: the one with the newest run).")
    ] = None,
):
    """Open the MLflow UI on the project's store (Ctrl-C stops it) and print the runs page to open."""
    from tlkit.core import tracking

    tracking_uri = store["tracking_uri"]
    url = tracking.ui_url(f"http://{host}:{port}", experiment, tracking_uri=tracking_uri)
    console.print(
        f"MLflow UI on http://{host}:{port}  (store: {tracking.resolve_tracking_uri(tracking_uri)})", highlight=False
    )
    console.print(f"runs, best held-out accuracy first: {url}", highlight=False, soft_wrap=True)
    raise typer.Exit(tracking.serve_ui(host=host, port=port, tracking_uri=tracking_uri))
