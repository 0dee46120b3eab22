"""`tlkit predict`, `evaluate`, `explain`, `export` and `serve`: the commands that use a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tlkit.cli.apps import app
from tlkit.cli.common import (
    STORE,
    DataArg,
    NetworkRef,
    Seed,
    require_files,
    run_options,
    split_settings,
    use_tracking,
)
from tlkit.cli.options import build, settings
from tlkit.cli.output import console, errors, run_footer
from tlkit.cli.process import command
from tlkit.core.files import printable
from tlkit.errors import TlkitError


@app.command("predict")
@command
@settings(tracking="tracking")
def predict_command(
    model: Annotated[
        str,
        typer.Argument(
            help="runs:/RUN_ID of a baseline, pretrain or finetune run, a model folder, or an exported MODEL.onnx "
            "(run on onnxruntime, without torch; no run is logged)."
        ),
    ],
    images: Annotated[list[str], typer.Argument(help="Image files or folders.")],
    tracking: dict,
    top_k: Annotated[int, typer.Option(help="Classes to show per image.")] = 1,
    out: Annotated[Path | None, typer.Option(help="Write the predictions to this CSV.")] = None,
):
    """Class names and calibrated probabilities for images, preprocessed as in training (float32, the served model's
    numbers)."""
    require_files(images)  # before torch, timm and MLflow load: a wrong path is said at once
    if model.endswith(".onnx"):  # the exported model alone: onnxruntime, no torch, no MLflow, no run
        from tlkit.core.files import write_csv
        from tlkit.review.predict import predict_onnx

        rows, skipped = predict_onnx(model, images, top_k=top_k)
        if out:
            write_csv(out, rows)
    else:
        from tlkit.runs.stages import run_predict

        use_tracking(tracking)
        rows, skipped, _ = run_predict(model, images, top_k=top_k, out=out, run=run_options(tracking))
    score = "probability"
    table = Table()
    for column in ("image", "rank", "class", score):
        table.add_column(column, justify="right" if column in ("rank", score) else "left")
    shown = rows[: 50 * top_k]
    for row in shown:
        table.add_row(printable(row["image"]), str(row["rank"]), printable(row["class"]), f"{row[score]:.4f}")
    console.print(table)
    if len(rows) > len(shown):
        console.print(f"... {len(rows) - len(shown)} more row(s){'' if out else '; pass --out FILE.csv for all'}")
    for path, why in skipped:
        errors.print(f"skipped {printable(path)}: {why}", highlight=False)
    if out:
        console.print(f"predictions written to {out}")


@app.command("evaluate")
@command
@settings(review=("evaluate", ("-eps",)), data_split="split", tracking="model-tracking")
def evaluate_command(
    model: Annotated[str, typer.Argument(help="runs:/RUN_ID of a baseline, pretrain or finetune run.")],
    data: DataArg,
    review: dict,
    data_split: dict,
    tracking: dict,
    eps: Annotated[
        list[str] | None,
        typer.Option(help="FGSM budgets as fractions of the pixel range: 0.01, 8/255 (repeatable)."),
    ] = None,
    seed: Seed = 0,
):
    """Score a saved model on a split: metrics, calibration, confusion matrices, top losses; TTA, maps, FGSM."""
    from tlkit.review.attack import parse_eps
    from tlkit.runs.evaluate import run_evaluate

    evaluate_config = build("EvaluateConfig", review, eps=parse_eps(eps) if eps else None)
    use_tracking(tracking, model)
    result = run_evaluate(
        model, data, evaluate_config, data_split=split_settings(data_split, seed), run=run_options(tracking)
    )
    m = result.metrics
    title = f"{model} on the {result.details['split']} split"
    table = Table(title=title, min_width=len(title) + 2)  # rich wraps a title to its table's width
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in m.items():
        if "." not in key or "fgsm" in key:  # per-class values are in the run
            table.add_row(key, f"{value:.4f}")
    console.print(table)
    pairs = ", ".join(f"{t}->{p} ({n})" for t, p, n in result.details["most_confused"]) or "none"
    console.print(printable(f"most confused (true->predicted): {pairs}"), highlight=False)
    console.print(f"the model's calibration: {result.details['calibration']}", highlight=False, soft_wrap=True)
    console.print(
        "in the run: predictions.csv, plots/top_losses.png, reliability.png, "
        f"confusion_matrix*.png{', explain/' if evaluate_config.explain else ''}",
        highlight=False,
    )
    run_footer(result.run_id, model=False)


@app.command("explain")
@command
@settings(maps=("evaluate", ("method",)), tracking="model-tracking")
def explain_command(
    model: NetworkRef,
    images: Annotated[list[str], typer.Argument(help="Image files or folders.")],
    maps: dict,
    tracking: dict,
    target: Annotated[str | None, typer.Option(help="Class to explain (default: the predicted one).")] = None,
    patch: Annotated[int, typer.Option(help="occlusion: side of the grey patch in input pixels.")] = 8,
    stride: Annotated[int, typer.Option(help="occlusion: step between patch positions.")] = 4,
    out: Annotated[Path, typer.Option(help="Folder for the PNGs (image | map | overlay).")] = Path("explain"),
):
    """Where the network looks: a map per image (saliency, Grad-CAM or occlusion), beside the image."""
    from tlkit.runs.evaluate import run_explain

    use_tracking(tracking, model)
    method = maps["method"]
    result = run_explain(
        model, images, method=method, target=target, patch=patch, stride=stride, out=out, run=run_options(tracking)
    )
    for path, why in result.details["skipped"]:
        errors.print(f"skipped {printable(path)}: {why}", highlight=False)
    console.print(
        f"{len(result.files)} {method} map(s) written to {out}/ and logged under explain/{method}", highlight=False
    )
    run_footer(result.run_id, model=False)


@app.command("export")
@command
@settings(export="export", tracking="model-tracking")
def export_command(
    model: NetworkRef,
    export: dict,
    tracking: dict,
    out: Annotated[Path, typer.Option(help="Folder for the model file and its JSON sidecar.")] = Path("export"),
):
    """Write the network to run without tlkit, with a JSON sidecar (classes, input size, mean, std, interpolation)."""
    from tlkit.runs.evaluate import run_export

    use_tracking(tracking, model)
    result = run_export(
        model,
        export["format"],
        out,
        run=run_options(tracking),
        force=export["force"],
    )
    console.print(f"written: {result.files[0]} and {result.files[1]}", highlight=False)
    if "max_abs_difference" in result.metrics:
        console.print(
            f"checked: outputs match PyTorch's on a batch within {result.metrics['max_abs_difference']:.2e}",
            highlight=False,
        )
    run_footer(result.run_id, model=False)


@app.command("serve")
@command
@settings(**STORE)
def serve_command(
    model: Annotated[
        str, typer.Argument(help="runs:/RUN_ID of a baseline, pretrain or finetune run, or its model folder.")
    ],
    store: dict,
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5002,
    host: Annotated[
        str, typer.Option(help="Address to listen on; keep 127.0.0.1 unless you mean to serve other machines.")
    ] = "127.0.0.1",
):
    """Serve a saved model over HTTP (MLflow's scoring protocol), behind tlkit's request checks; Ctrl-C stops it."""
    from tlkit.core import tracking
    from tlkit.review.server import serve
    from tlkit.review.serving import limits

    if model.startswith(tracking.RUNS_PREFIX):
        run_id, path = tracking.parse_run_ref(model)
        folder = tracking.download_artifacts(run_id, path or "model", tracking_uri=store["tracking_uri"])
    else:
        folder = Path(model)
    if not (folder / "MLmodel").is_file():
        raise TlkitError(
            f"{folder} holds no MLmodel file: name runs:/RUN_ID of a baseline, pretrain or finetune run, or the model "
            "folder inside one (mlruns/.../artifacts/model)"
        )
    console.print(f"serving {model} on http://{host}:{port}/invocations  (Ctrl-C stops it)", highlight=False)
    try:
        serve(str(folder), host=host, port=port, max_bytes=limits().max_bytes)
    except KeyboardInterrupt:  # uvicorn stops on Ctrl-C or SIGTERM, then raises the signal again: a clean stop
        pass
    console.print("server stopped", highlight=False)
