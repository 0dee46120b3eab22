"""User-facing errors: one line that says what was wrong and how to fix it."""


class TlkitError(Exception):
    """A mistake in the user's input or environment, not a bug in tlkit.

    The CLI prints the message as one line and exits with code 1; library callers can catch it.
    """
