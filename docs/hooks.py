"""MkDocs hooks: the CLI reference page is generated from the Typer app at build time, so `--help` and the
docs cannot drift apart (the same option texts and defaults, read from the same code); the changelog page is
the repository's CHANGELOG.md, so the history is written once."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

PAGE = "reference/cli.md"
CHANGELOG = Path(__file__).resolve().parents[1] / "CHANGELOG.md"


def cli_reference() -> str:
    import click
    import typer.main
    from typer.cli import get_docs_for_click

    from tlkit.cli.app import app

    command = typer.main.get_command(app)
    with click.Context(command, info_name="tlkit") as context:
        body = get_docs_for_click(obj=command, ctx=context, name="tlkit", title="CLI reference")
    intro = (
        "Generated from the command-line app at build time: the same text as `tlkit COMMAND --help`.\n"
        "Defaults shown are the code's own.\n\n"
    )
    title, rest = body.split("\n", 1)
    return f"{title}\n\n{intro}{_escape_help(rest.lstrip())}"


def _escape_help(text: str) -> str:
    """Help texts are plain text: `<folder>` must show, not become an HTML tag. Code spans and blocks stay as they are."""
    lines, fenced = [], False
    for line in text.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            parts = line.split("`")
            line = "`".join(
                part if i % 2 else part.replace("<", "&lt;").replace(">", "&gt;") for i, part in enumerate(parts)
            )
        lines.append(line)
    return "\n".join(lines)


def on_files(files, config):
    files.append(File.generated(config, PAGE, content=cli_reference()))
    files.append(File.generated(config, "changelog.md", content=CHANGELOG.read_text()))
    return files
