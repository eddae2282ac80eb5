"""The one exception type that the CLI turns into a one-line message and exit code 2, and the
one-line description of a failed file-system operation."""

import errno


class UserError(Exception):
    """Bad input from the user (a file, a flag, a config key): reported without a traceback."""


def first_line(e: Exception) -> str:
    """An exception's message cut to one line (its type when it has none), to quote in a UserError."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


#: what to do about a file-system error, by errno (the rest: check the path)
_OS_ADVICE = {
    errno.EACCES: "check its permissions, or write somewhere else, e.g. with --out",
    errno.EPERM: "check its permissions, or write somewhere else, e.g. with --out",
    errno.EROFS: "the file system is read-only: write somewhere else, e.g. with --out",
    errno.ENOSPC: "free some disk space and run the command again; files written before are intact",
    errno.EDQUOT: "free some of your disk quota and run the command again; files written before are intact",
    errno.EFBIG: "the file exceeds a size limit (ulimit -f or the file system's): raise it or write elsewhere",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder: give a file path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EEXIST: "something is in the way (a file where a folder is needed?): choose another path",
}


def os_error_message(e: OSError) -> str:
    """A failed file-system operation in one line: the path(s), the system's words, what to do."""
    where = " -> ".join(str(name) for name in (e.filename, e.filename2) if name is not None) or "a file operation"
    advice = _OS_ADVICE.get(e.errno, "check the path and try again")
    return f"{where}: {e.strerror or first_line(e)} ({advice})"
