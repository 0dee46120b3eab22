"""A duration as a user writes it ('30m', '2h', '1h30m', '90s', or minutes) -> seconds."""

from __future__ import annotations

import re

from tlkit.errors import TlkitError


def parse_duration(text: str | int | float) -> float:
    """'30m', '2h', '90s', '1h30m' or a number of minutes -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text) * 60
    else:
        match = re.fullmatch(
            r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)s)?\s*", str(text)
        )
        plain = re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", str(text))
        if plain:
            seconds = float(text) * 60
        elif match and any(match.groups()):
            h, m, s = (float(g) if g else 0.0 for g in match.groups())
            seconds = h * 3600 + m * 60 + s
        else:
            raise TlkitError(f"budget {text!r} is not a duration; write e.g. 30m, 2h, 1h30m or 90s")
    if seconds <= 0:
        raise TlkitError(f"budget {text!r} must be more than zero")
    return seconds
