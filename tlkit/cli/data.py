"""`tlkit data`, `augment`, `ingest` and `backbone` commands: sample sets, the dataset, the backbones."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from tlkit.cli.apps import app, augment_app, backbone_app, data_app
from tlkit.cli.common import DataArg, Seed, Weights, run_options, split_settings, use_tracking
from tlkit.cli.options import settings
from tlkit.cli.output import console, errors, run_footer
from tlkit.cli.process import command
from tlkit.errors import TlkitError


@data_app.command("digits")
@command
def data_digits(
    out: Annotated[Path, typer.Argument(help="Folder to write class folders of PNGs into.")],
    classes: Annotated[str, typer.Option(help="Digits to write, e.g. 0-4 or 5,6,7.")] = "0-9",
    per_class: Annotated[int | None, typer.Option(help="At most N images per class (random, seeded).")] = None,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
    seed: Seed = 0,
):
    """Write scikit-learn's bundled handwritten digits (1797 real images, 10 classes) as PNG folders."""
    from tlkit.data.samples import write_digits

    counts = write_digits(out, classes=classes, per_class=per_class, size=size, seed=seed)
    console.print(f"wrote {sum(counts.values())} images of digits {', '.join(counts)} to {out}")


@data_app.command("photos")
@command
def data_photos(
    out: Annotated[Path, typer.Argument(help="Folder to write train/ val/ test/ class folders of PNG crops into.")],
    crop: Annotated[int, typer.Option(help="Side of each square crop, in the photo's own pixels.")] = 64,
    train: Annotated[int, typer.Option(help="Crops per class for train.")] = 12,
    val: Annotated[int, typer.Option(help="Crops per class for val.")] = 8,
    test: Annotated[int, typer.Option(help="Crops per class for test.")] = 20,
    grey: Annotated[
        bool, typer.Option("--grey/--colour", help="Greyscale, so colour alone does not name the photo.")
    ] = True,
    seed: Seed = 0,
):
    """Write crops of real photos (scikit-image's samples) as 8 texture classes, split by photo region."""
    from tlkit.data.samples import write_photos

    written = write_photos(out, crop=crop, counts=(train, val, test), grey=grey, seed=seed)
    sizes = ", ".join(f"{split} {sum(n.values())}" for split, n in written.items())
    console.print(
        f"wrote {len(written['train'])} classes ({', '.join(written['train'])}) to {out}: {sizes}", highlight=False
    )


@augment_app.command("preview")
@command
@settings(backbone=("backbone", ("model", "weights", "img_size")), train=("finetune", ("augment", "hflip")))
def augment_preview(
    data: DataArg,
    backbone: dict,
    train: dict,
    n: Annotated[int, typer.Option(min=1, help="Images in the grid.")] = 16,
    seed: Seed = 0,
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("train_batch.png"),
):
    """Draw a grid of augmented training images as the model would see them (no run is logged)."""
    from tlkit.core.files import save_figure
    from tlkit.core.metrics import close
    from tlkit.models.backbone import preview_data_config
    from tlkit.runs.stages import load_data
    from tlkit.train.finetune import train_batch_figure

    manifest = load_data(data)
    config = preview_data_config(backbone["model"], backbone["weights"], backbone["img_size"])
    augment = train["augment"]
    title = f"augment {Path(augment).name} at {config['input_size'][-1]} px"
    figure = train_batch_figure(manifest, config, augment, hflip=train["hflip"], n=n, seed=seed, title=title)
    save_figure(figure, out)
    close(figure)
    console.print(f"{n} augmented training images drawn to {out}", highlight=False)


@app.command("ingest")
@command
@settings(split="split", tracking="tracking")
def ingest_command(
    data: DataArg,
    split: dict,
    tracking: dict,
    out: Annotated[
        Path | None, typer.Option(help="Manifest file to write (default: <folder>.manifest.json here).")
    ] = None,
    seed: Seed = 0,
):
    """Check every image, make splits, write a manifest and print the dataset report."""
    from tlkit.data.ingest import format_report
    from tlkit.runs.stages import run_ingest

    use_tracking(tracking)
    manifest, path, result = run_ingest(data, split_settings(split, seed), out=out, run_name=tracking["run_name"])
    console.print(format_report(manifest), highlight=False)
    console.print(f"\nmanifest written to {path}")
    run_footer(result.run_id, model=False)


@backbone_app.command("list")
@command
def backbone_list(
    pattern: Annotated[str, typer.Argument(help="Wildcard pattern, e.g. 'resnet*' or 'vit'.")] = "",
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Only models with pretrained weights.")] = False,
):
    """List timm backbone names."""
    from tlkit.models.backbone import list_backbones

    names = list_backbones(pattern, pretrained=pretrained)
    if not names:
        raise TlkitError(f"no timm model matches {pattern!r}; try a shorter pattern such as 'resnet'")
    console.print("\n".join(names), highlight=False)
    errors.print(f"{len(names)} model(s)")


@backbone_app.command("filters")
@command
@settings(tracking=("tracking", ("-run_name",)))
def backbone_filters_command(
    model: Annotated[str, typer.Argument(help="timm model name, or runs:/RUN_ID of a tlkit run.")],
    tracking: dict,
    pretrained: Annotated[
        bool, typer.Option("--pretrained/--no-pretrained", help="timm's hub weights (needs the network).")
    ] = False,
    weights: Weights = None,
    out: Annotated[Path | None, typer.Option(help="PNG to write (default: MODEL-filters.png).")] = None,
):
    """Draw the first convolution's filters as an image grid (edge and colour detectors, once trained)."""
    from tlkit.runs.evaluate import run_filters

    use_tracking(tracking)
    result = run_filters(model, pretrained=pretrained, weights=weights, out=out, run=run_options(tracking))
    shape = result.details["shape"]
    console.print(
        f"{shape[0]} filters of {shape[2]}x{shape[3]} ({result.details['weights']}) drawn to {result.files[0]}",
        highlight=False,
    )


@backbone_app.command("info")
@command
def backbone_info_command(
    name: Annotated[str, typer.Argument(help="timm model name.")],
    img_size: Annotated[int | None, typer.Option(help="Input side in pixels (default: the model's).")] = None,
    groups: Annotated[
        int | None, typer.Option(help="Merge the layer groups into N (as --groups does in finetune).")
    ] = None,
):
    """Feature size, parameters, preprocessing, layer groups and pretrained tags of a backbone."""
    from tlkit.models.backbone import backbone_info

    info = backbone_info(name, img_size=img_size, groups=groups)
    cfg = info["data_config"]
    console.print(
        Text(info["name"], style="bold")
        + Text(f"  features {info['num_features']}  parameters {info['num_params']:,}"),
        highlight=False,
    )
    console.print(
        f"input {cfg['input_size']}  mean {cfg['mean']}  std {cfg['std']}  interpolation {cfg['interpolation']}  "
        f"crop_pct {cfg.get('crop_pct')}",
        highlight=False,
    )
    table = Table(title="layer groups (input side first; the new head follows and learns fastest)")
    table.add_column("#", justify="right")
    table.add_column("group")
    table.add_column("parameters", justify="right")
    for i, (label, count) in enumerate(info["layer_groups"]):
        table.add_row(str(i), label, f"{count:,}")
    console.print(table)
    tags = info["pretrained_tags"]
    console.print(f"pretrained tags: {', '.join(tags) if tags else 'none'}", highlight=False)
