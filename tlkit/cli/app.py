"""The Typer app: command line -> one stage call each, a short summary, and one-line errors (exit code 1).

Each command group registers itself on the apps of `apps.py` when its module is imported, in the order `tlkit
--help` lists them: data (sample sets, ingest, backbones, augmentation), train (making a model), review (using
one), runs (pipelines, compare, the UI).
"""

from tlkit.cli import data  # noqa: F401  (registers its commands)

# isort: split
from tlkit.cli import train  # noqa: F401

# isort: split
from tlkit.cli import review  # noqa: F401

# isort: split
from tlkit.cli import runs  # noqa: F401

# isort: split
from tlkit.cli.apps import app

__all__ = ["app"]
