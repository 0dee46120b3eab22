"""The command line: `app` (app.py) holds the Typer commands; options.py builds their options from the settings."""


def main() -> None:
    from tlkit.cli.app import app

    app()
