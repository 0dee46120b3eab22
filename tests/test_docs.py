"""The documentation matches the code: the site builds strictly, the CLI reference is the app's own help, and the
README's two commands are the ones CI runs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "tlkit finetune" in reference
    assert "--run-name" in reference
    assert "&lt;folder&gt;" in reference


def test_the_cli_reference_has_every_command_and_option():
    import click
    import typer.main

    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from hooks import cli_reference
    finally:
        sys.path.remove(str(ROOT / "docs"))
    from tlkit.cli.app import app

    page = cli_reference()
    group = typer.main.get_command(app)
    with click.Context(group, info_name="tlkit") as context:
        stack = [(name, group.get_command(context, name)) for name in group.list_commands(context)]
        seen = 0
        while stack:
            name, command = stack.pop()
            if isinstance(command, click.Group):
                stack += [
                    (f"{name} {sub}", command.get_command(context, sub)) for sub in command.list_commands(context)
                ]
                continue
            assert f"## `tlkit {name}`" in page, name
            section = page.split(f"## `tlkit {name}`", 1)[1].split("\n## ", 1)[0]
            for option in (p for p in command.params if isinstance(p, click.Option)):
                assert option.opts[-1] in section, (name, option.opts)
            seen += 1
    assert seen >= 17  # every command, the groups' subcommands included


def test_the_readme_is_short_and_its_two_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    commands = re.findall(r"```bash\n(python3 -m venv .venv && [^\n]+)\n```", readme)
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert all(command in ci for command in commands), commands
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link
