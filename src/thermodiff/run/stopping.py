"""Stopping a training early but cleanly: SIGINT (Ctrl-C) and SIGTERM (what cluster schedulers
send before preemption) ask the loop to stop after the current step and checkpoint it; a failed
write stops it with the last checkpoint intact. Either way the run ends with :class:`RunStopped`,
which says how to continue it."""

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from thermodiff.errors import UserError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A signal handler that records the signal for the training loop to act on between steps.
    The first signal restores the previous handlers, so that a second one acts as it would
    without training (Ctrl-C twice: KeyboardInterrupt at once; SIGTERM twice: the process ends)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __call__(self, signum: int, frame) -> None:
        self.signum = signum
        self.restore()

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Catch SIGINT and SIGTERM for the body (in the main thread, where Python runs handlers;
    a signal that the process ignores, as a background job ignores SIGINT, stays ignored)."""
    request = StopRequest()
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            handler = signal.getsignal(signum)
            if handler is not None and handler is not signal.SIG_IGN:  # None: set outside Python, cannot restore
                request.previous[signum] = handler
                signal.signal(signum, request)
    try:
        yield request
    finally:
        request.restore()


class RunStopped(UserError):
    """Training stopped before its end with its state checkpointed at ``step`` in ``run_dir``:
    ``--resume`` (with the run's limits: ``--steps steps`` and ``--minutes minutes``, 0 for none)
    continues it; the process should exit with ``exit_code`` (128 + the signal's number, as a
    shell reports a signal; 2 for a failed write)."""

    def __init__(self, reason: str, run_dir: Path, step: int | None, steps: int, exit_code: int, minutes: float = 0.0):
        super().__init__(reason)
        self.run_dir, self.step, self.steps, self.exit_code, self.minutes = run_dir, step, steps, exit_code, minutes

    @classmethod
    def by_signal(cls, signum: int | None, run_dir: Path, step: int, steps: int, minutes: float = 0.0) -> "RunStopped":
        """Stopped after ``step`` because of ``signum`` (None: a signal to another process of a ``torchrun``)."""
        name = signal.Signals(signum).name if signum is not None else "a signal to another process"
        return cls(f"interrupted by {name} at step {step}; checkpoint saved in {run_dir}", run_dir, step, steps,
                   128 + (signum or signal.SIGTERM), minutes)

    def limits(self) -> list[str]:
        """The flags that give a resumed run this run's limits: its steps, its minutes, or both."""
        return (["--steps", str(self.steps)] if self.steps or not self.minutes else []) + (
            ["--minutes", f"{self.minutes:g}"] if self.minutes else [])
