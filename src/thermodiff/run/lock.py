"""One writer per run directory: an advisory lock (``flock``) that a training process holds from
before it looks at the run until it exits.

The lock file lies beside the run, ``PARENT/.NAME.lock``, not inside it: a new run's folder
appears only with its first checkpoint (filled aside and renamed into place) and ``--overwrite``
renames the old one away, so a lock inside the folder would not exist yet, or would move with
it. The file holds its holder's pid, host and command, which the refusal names. The kernel
releases the lock when the holder dies (even by SIGKILL); the holder deletes the file on a clean
exit, and a taker checks that the file it locked is still the one at the path (else it took a
lock on a file just deleted, and tries again)."""

import contextlib
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from thermodiff.errors import UserError, os_error_message
from thermodiff.run.distributed import Context


def lock_path(run_dir: Path) -> Path:
    """Where ``run_dir``'s lock lies: beside it, named after it, for every spelling of the path
    (``runs/x``, ``./runs/x/``, an absolute path and a symbolic link lock the same file)."""
    resolved = Path(os.path.abspath(run_dir)).resolve()
    return resolved.parent / f".{resolved.name}.lock"


def _holder(path: Path) -> str:
    """Who holds the lock at ``path``, as its file says (empty while the holder is still writing it)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {record['pid']} on {record['host']}: {record['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that did not say which"


def _open_locked(path: Path, run_dir: Path) -> int:
    """A descriptor of ``path`` holding its exclusive lock; a UserError naming the holder if
    another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{run_dir}: another process is writing this run ({_holder(path)}); wait until it "
                            f"ends or stop it, then try again (its lock: {path})") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass  # the previous holder deleted it after we opened it
        os.close(fd)  # a deleted file's lock guards nothing: take the one at the path now


def _write_holder(fd: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the body (its parent folder is created if need be, and removed
    again if it is still empty: a refused run leaves no folder behind)."""
    path = lock_path(run_dir)
    created = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]  # innermost first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(path, run_dir)
    except OSError as e:  # read-only, permission denied, a file in the path: before anything is touched
        raise UserError(f"{run_dir}: cannot lock the run: {os_error_message(e)}") from None
    try:
        _write_holder(fd)
        yield
    finally:
        path.unlink(missing_ok=True)  # while locked: a process that opened it meanwhile checks and retries
        os.close(fd)
        for folder in created:
            with contextlib.suppress(OSError):  # not empty: it holds the run (or another's files)
                folder.rmdir()


@contextlib.contextmanager
def hold_in_main(run_dir: Path, ctx: Context) -> Iterator[None]:
    """:func:`hold` in process 0, which writes the run; the other processes of a ``torchrun``
    fail with it when it cannot take the lock."""
    with contextlib.ExitStack() as stack:
        failure = None
        if ctx.is_main:
            try:
                stack.enter_context(hold(run_dir))
            except (UserError, OSError) as e:
                failure = e
        if ctx.any(failure is not None)[0]:
            raise failure or UserError(f"{run_dir}: process 0 could not lock the run (see its message)")
        yield
