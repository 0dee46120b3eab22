"""The Typer apps the commands register on: the root (`tlkit`) and its groups (`tlkit data`, `backbone`, `augment`)."""

from __future__ import annotations

import sys
import time

import typer

from tlkit.cli.output import error_line

STARTED = time.monotonic()  # about when the process started (heavy imports come later, inside the commands)


class _OneLineUsageErrors(typer.core.TyperGroup):
    """A bad option or argument is one line on stderr (exit code 2), like every other error, not a boxed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):  # type: ignore[override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            sys.exit(1)
        except typer.TyperException as err:  # Typer's (vendored) click usage errors: bad values, unknown options
            context = getattr(err, "ctx", None)
            where = f"; see `{context.command_path} --help`" if context is not None else ""
            error_line(err.format_message().replace("Value error, ", "").rstrip(".") + where)
            sys.exit(getattr(err, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    help="Transfer learning for small image datasets: timm backbones, sklearn baselines and Lightning fine-tuning, "
    "tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


data_app = typer.Typer(help="Sample datasets that need no network.", no_args_is_help=True)


backbone_app = typer.Typer(help="Browse timm backbones.", no_args_is_help=True)


augment_app = typer.Typer(help="Look at augmentations before training.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(backbone_app, name="backbone")
app.add_typer(augment_app, name="augment")
