"""`python -m tlkit` -> the CLI."""

from tlkit.cli import main

main()
