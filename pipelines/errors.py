"""User-facing errors: the CLI prints these as one line, never as a traceback."""


class UserError(Exception):
    """A mistake in what the user gave (a path, a key, a value); the message says which and why."""
