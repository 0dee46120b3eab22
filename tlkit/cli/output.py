"""What commands print: the consoles, one-line errors and warnings, the held-out table, the run footer."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tlkit.core.files import printable

# No markup: messages carry paths, user text and brackets ("pip install 'tlkit[export]'"), printed as they are.
# Piped to a file or CI, rich would cut tables at 80 columns: lay them out at their own width instead.
console = Console(markup=False, width=None if sys.stdout.isatty() else 240)


errors = Console(stderr=True, markup=False, width=None if sys.stderr.isatty() else 240)


class WarningLine(logging.Handler):
    """tlkit's warnings about the user's data, as `warning: ...` lines on stderr, printed literally."""

    def emit(self, record: logging.LogRecord) -> None:
        message = printable(record.getMessage())
        errors.print(Text("warning: ", style="yellow") + Text(message), highlight=False, soft_wrap=True)


def error_line(message: str) -> None:
    text = printable(" ".join(message.split()))  # a file name in it may hold bytes that are not UTF-8
    errors.print(Text("error: ", style="bold red") + Text(text), highlight=False, soft_wrap=True)


def metrics_table(title: str, metrics: dict[str, float], heldout: str = "test") -> Table:
    """The held-out figures (heldout_* metrics; `heldout` says which split they are on)."""
    caption = f"held out: the {heldout} split, which chose nothing"
    # as wide as its title and caption: rich wraps them to the table's width, mid-phrase
    table = Table(
        title=title,
        show_header=True,
        caption=caption,
        title_justify="left",
        min_width=max(len(title), len(caption)) + 2,
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("heldout_accuracy", "heldout_balanced_accuracy", "heldout_macro_f1", "heldout_ece"):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.4f}")
    return table


PRECISION_NAMES = {
    "32-true": "fp32",
    "bf16-mixed": "bf16 mixed",
    "16-mixed": "fp16 mixed",
    "bf16-true": "bf16",
    "64-true": "fp64",
}


def run_footer(run_id: str, *, model: bool = True) -> None:
    saved = f"model: runs:/{run_id}; " if model else ""
    console.print(
        Text("MLflow run ") + Text(run_id, style="bold") + Text(f"  ({saved}browse with `tlkit ui`)"), highlight=False
    )
