"""Plain progress lines, without Lightning: the elapsed-time format and the flushed print every line goes through.

tlkit.core.progress (Lightning's loops) and the plain extraction loop (tlkit.features.forward) share them.
"""

from __future__ import annotations

import sys


def clock(seconds: float) -> str:
    """Seconds as a progress line shows them: 4:07, or 1:02:03 past an hour."""
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def say(line: str) -> None:
    """One line on stdout, flushed at once: a file or a pipe shows it while the command runs."""
    print(line, file=sys.stdout, flush=True)
