"""The one error type users see: a single line that names the field or file and what was expected."""


class FlowalignError(Exception):
    """A user-facing error; the CLI prints its message as one line and exits with status 2."""
