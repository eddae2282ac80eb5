"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (a file, a flag, a config key): reported without a traceback."""


def first_line(e: Exception) -> str:
    """An exception's message cut to one line (its type when it has none), to quote in a UserError."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__
