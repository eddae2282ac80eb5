"""A run under concurrency, file-system failures and signals (issue 13), one section per promise:

1. one writer per run: a training holds the run's lock from before it looks at the run until it
   ends; a second writer (a new run, --resume, --overwrite) is refused naming the holder, also
   when two start at the same moment; the lock dies with its holder, even by SIGKILL; readers
   (evaluate) do not need it;
2. every file-system failure (permission denied, a read-only file system, a full disk, a file
   size limit, a file in the path, damaged logs) is one line with exit code 2 (evaluate: its
   result, and a warning) and leaves the run as it was, with no temporary file behind;
3. SIGTERM (a scheduler's preemption) and SIGINT checkpoint the current step and print the
   command that continues the run, which then ends bit for bit as an uninterrupted run.

Processes are real where the promise is about processes (races, kills, signals, permissions):
root ignores permissions, so as root those tests drop it in a user namespace, and skip where
none can be made."""

import contextlib
import errno
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CliResult, assert_one_line_error
from test_reliability import snapshot

from thermodiff.errors import UserError
from thermodiff.run import interruption, lock, stopping, training
from thermodiff.run.checkpoint import load_checkpoint

STEPS = 100  # of the signalled and the racing runs: long enough to be caught in the middle
DEADLINE_S = 300  # a guard against a hang, not a measurement


def thermodiff(*args, prefix: list[str] = (), **kwargs) -> CliResult:
    """``thermodiff ARGS`` in a new process (after ``prefix``, e.g. a namespace)."""
    done = subprocess.run([*prefix, sys.executable, "-m", "thermodiff", *map(str, args)], capture_output=True,
                          text=True, env=interruption.environment(), **kwargs)
    return CliResult(done.returncode, done.stdout, done.stderr)


def wait_for_step(run: Path, proc: subprocess.Popen, step: int) -> None:
    """Until the metrics of ``run`` reach ``step`` (the process still training)."""
    deadline = time.monotonic() + DEADLINE_S
    while interruption.logged_step(run) < step:
        assert proc.poll() is None and time.monotonic() < deadline, f"training ended or hung ({proc.returncode})"
        time.sleep(interruption.POLL_S)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.name.endswith((".tmp", ".lock")) or ".new." in p.name)


# --------------------------------------------------------------------------- 1. one writer per run


@pytest.mark.parametrize("flags", [[], ["--resume"], ["--overwrite"]], ids=["new", "resume", "overwrite"])
def test_a_locked_run_is_refused_to_every_other_writer(flags, cli, copy_run, tiny_config, tmp_path):
    run = copy_run() if flags else tmp_path / "new"
    before = snapshot(tmp_path)
    with lock.hold(run):
        result = cli("train", tiny_config, "--out", run, "--steps", "30", "--quiet", *flags)
    assert_one_line_error(result, str(run), "another process", f"pid {os.getpid()}", "try again")
    assert snapshot(tmp_path) == before


def test_every_spelling_of_a_run_takes_the_same_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "runs", target_is_directory=True)
    (tmp_path / "runs").mkdir()
    with lock.hold(Path("runs/x")):
        for spelling in ("runs/x/", "./runs/../runs/x", tmp_path / "runs" / "x", "link/x"):
            with pytest.raises(UserError, match=f"pid {os.getpid()}"):
                with lock.hold(Path(spelling)):
                    pass
    assert not lock.lock_path(Path("runs/x")).exists()  # removed by its holder
    with lock.hold(Path("link/x")):  # free again
        pass


def test_two_trainings_started_at_once_leave_one_run(tmp_path):
    """Without the lock both exited 0 and the metrics held both runs' rows."""
    config, run = interruption.write_config(tmp_path, steps=STEPS), tmp_path / "run"
    argv = [sys.executable, *interruption.train_argv(config, run, 1, resume=False)[1:]]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=interruption.environment()) for _ in range(2)]
    outputs = [p.communicate() for p in procs]
    results = [CliResult(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    assert sorted(r.rc for r in results) == [0, 2], results
    refused = next(r for r in results if r.rc == 2)
    message = assert_one_line_error(refused, str(run))
    assert "another process" in message or "already exists" in message  # the second started after the first ended
    assert [r["step"] for r in training.read_metrics(run)] == list(range(5, STEPS + 1, 5))
    assert len((run / "metrics.csv").read_text().splitlines()) == STEPS // 5 + 1
    assert load_checkpoint(run / "checkpoint.safetensors")[1]["step"] == STEPS
    assert temporaries(tmp_path) == []


def test_a_resume_during_training_is_refused_and_a_killed_trainers_lock_is_not(tmp_path, cli):
    config, run, log = interruption.write_config(tmp_path, steps=10**6), tmp_path / "run", tmp_path / "train.log"
    proc = interruption.launch(interruption.train_argv(config, run, 1, resume=False), log)
    try:
        wait_for_step(run, proc, 10)
        for flag in ("--resume", "--overwrite"):
            assert_one_line_error(cli("train", config, "--out", run, flag, "--quiet"), str(run), f"pid {proc.pid}")
        assert cli("evaluate", run, "--max-examples", "10", "--quiet").rc == 0  # a reader needs no lock
    finally:
        interruption.kill_tree(proc)  # SIGKILL: no chance to release anything
    step = interruption.checkpoint_step(run)
    result = cli("train", config, "--out", run, "--resume", "--steps", step + 3, "--device", "cpu", "--quiet")
    assert result.rc == 0, result
    assert interruption.checkpoint_step(run) == step + 3
    assert temporaries(tmp_path) == []


# --------------------------------------------------------------------------- 2. file-system failures


def _probe_read_only(prefix: list[str], folder: Path) -> None:
    """Skip unless ``prefix`` runs commands that can read ``folder`` but not write in it."""
    if shutil.which("unshare") is None and prefix[:1] == ["unshare"]:
        pytest.skip("no unshare here")
    readable = subprocess.run([*prefix, "ls", str(folder)], capture_output=True).returncode == 0
    writable = subprocess.run([*prefix, "touch", str(folder / "probe")], capture_output=True).returncode == 0
    if not readable or writable:
        pytest.skip(f"cannot make {folder} read-only for a process here")


@contextlib.contextmanager
def denied(*folders: Path):
    """``folders`` without write permission (chmod 0o500) for the body, and the prefix that runs
    a command without the power to ignore that: none for an ordinary user; for root, a user
    namespace whose one user is root mapped to uid 1000 (it owns root's files, without root's
    capabilities)."""
    prefix = ["unshare", "--user", "--map-user=1000"] if os.geteuid() == 0 else []
    modes = [f.stat().st_mode for f in folders]
    for folder in folders:
        folder.chmod(0o500)
    try:
        _probe_read_only(prefix, folders[0])
        yield prefix
    finally:
        for folder, mode in zip(folders, modes):
            folder.chmod(mode)


def read_only_mount(folder: Path) -> list[str]:
    """The prefix that runs a command where ``folder`` is a read-only file system (a read-only
    bind mount in a mount namespace of its own)."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(folder)]
    _probe_read_only(prefix, folder)
    return prefix


# case -> (tiny config, run, a read-only folder -> (arguments, the folder to deny, exit code, needles))
DENIED = {
    "train_into_a_read_only_folder": lambda c, r, ro: (["train", c, "--out", ro / "new"], ro, 2,
                                                       [str(ro / "new"), "Permission denied", "--out"]),
    "resume_a_read_only_run": lambda c, r, ro: (["train", c, "--out", r, "--resume", "--steps", "30"], r, 2,
                                                [str(r / "metrics.jsonl"), "Permission denied"]),
    "overwrite_a_read_only_run": lambda c, r, ro: (["train", c, "--out", r, "--overwrite", "--steps", "2"], r, 2,
                                                   [str(r), "Permission denied"]),
    "plot_into_a_read_only_run": lambda c, r, ro: (["plot", r], r, 2, [str(r), ".png", "Permission denied", "--out"]),
    "sample_into_a_read_only_run": lambda c, r, ro: (["sample", r, "-n", "3", "--out", r / "s.npy"], r, 2,
                                                     [str(r / "s.npy"), "Permission denied"]),
    "evaluate_a_read_only_run": lambda c, r, ro: (["evaluate", r, "--max-examples", "10"], r, 0,
                                                  ["warning", str(r / "evaluation.json"), "Permission denied"]),
}


@pytest.mark.parametrize("case", DENIED)
def test_permission_denied_is_one_line_and_changes_nothing(case, copy_run, tiny_config, tmp_path):
    run, ro = copy_run(), tmp_path / "ro"
    ro.mkdir()
    args, folder, rc, needles = DENIED[case](tiny_config, run, ro)
    before = snapshot(tmp_path)
    with denied(folder) as prefix:
        result = thermodiff(*args, "--quiet", prefix=prefix)
    assert result.rc == rc and "Traceback" not in result.err and result.err.count("\n") == 1, result
    assert all(needle in result.err for needle in needles), result
    if case.startswith("evaluate"):
        assert "K " in result.out  # the result, although it could not be kept
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["new_run", "resume"])
def test_a_read_only_file_system_is_one_line_and_changes_nothing(case, copy_run, tiny_config, tmp_path):
    run = copy_run()
    target = run if case == "resume" else tmp_path / "ro" / "new"
    target.parent.mkdir(exist_ok=True)
    before = snapshot(tmp_path)
    flags = ["--resume", "--steps", "30"] if case == "resume" else []
    result = thermodiff("train", tiny_config, "--out", target, "--quiet", *flags,
                        prefix=read_only_mount(run if case == "resume" else target.parent))
    assert_one_line_error(result, str(target), "Read-only file system")
    assert snapshot(tmp_path) == before


def _fail_checkpoint_writes(monkeypatch, fail_from: int) -> None:
    """A full disk for checkpoints: fsync of the ``fail_from``-th checkpoint's temporary file, and
    every later one's, fails with ENOSPC (what a file system with delayed allocation reports)."""
    real, calls = os.fsync, []

    def fsync(fd):
        if ".checkpoint.safetensors." in os.readlink(f"/proc/self/fd/{fd}"):
            calls.append(fd)
            if len(calls) >= fail_from:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_during_training_keeps_the_last_checkpoint_and_resumes_exactly(cli, tiny_config, tmp_path,
                                                                                   monkeypatch):
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert cli("train", tiny_config, "--out", reference, "--quiet").rc == 0
    _fail_checkpoint_writes(monkeypatch, fail_from=2)  # step 0's checkpoint is written, step 10's is not
    message = assert_one_line_error(cli("train", tiny_config, "--out", run, "--quiet"), str(run / "checkpoint.safetensors"),
                                    "No space left on device", "checkpoint of step 0", "--resume")
    monkeypatch.undo()
    assert load_checkpoint(run / "checkpoint.safetensors")[1]["step"] == 0
    assert temporaries(tmp_path) == []
    command = shlex.split(message.split("continue with: ")[1])
    assert cli(*command[1:], "--quiet").rc == 0  # as printed (less the program name)
    assert interruption.differences(interruption.final_state(reference), interruption.final_state(run)) == []


def test_a_failed_metrics_append_leaves_no_partial_line(copy_run, monkeypatch):
    run = copy_run()
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "metrics.csv")}

    class HalfWritten:  # a file whose write stores half the bytes, then finds the disk full
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(training, "open", lambda *a, **k: HalfWritten(open(*a, **k)), raising=False)
    with pytest.raises(OSError, match="No space"):
        training.append_metrics(run, {"step": 21, "K_bits_running": 1.0})
    assert {name: (run / name).read_bytes() for name in before} == before


SIZE_LIMIT = 8192  # bytes: the tiny run's logs fit, its checkpoint (about 17 kB) does not


def _limit_file_size() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (SIZE_LIMIT, SIZE_LIMIT))  # writes beyond it fail with EFBIG


def test_a_file_size_limit_on_a_new_run_is_one_line_and_leaves_nothing(trained_run, tiny_config, tmp_path):
    """A real write failure from the kernel (``ulimit -f``), half way through the first checkpoint,
    written in the folder that would have become the run."""
    assert (trained_run["run_dir"] / "checkpoint.safetensors").stat().st_size > SIZE_LIMIT
    run = tmp_path / "new"
    before = snapshot(tmp_path)
    result = thermodiff("train", tiny_config, "--out", run, "--quiet", preexec_fn=_limit_file_size)
    assert_one_line_error(result, str(run / "checkpoint.safetensors"), "File too large")
    assert snapshot(tmp_path) == before  # no run, no staging folder, no lock


FULL_DISK = r"""
set -e
mount -t tmpfs -o size=1m tmpfs "$MOUNT"
cp -r "$RUN" "$MOUNT/run"
# fill the disk but three pages: enough to rewrite the logs on resume, not for a checkpoint
"$PYTHON" -c 'import os, sys; s = os.statvfs(sys.argv[1]); open(sys.argv[1] + "/fill", "wb").write(bytes(s.f_bavail * s.f_frsize - 3 * 4096))' "$MOUNT"
set +e
"$PYTHON" -m thermodiff train "$CONFIG" --out "$MOUNT/run" --resume --steps 40 --quiet 2> "$OUT/stderr"
echo $? > "$OUT/rc"
cp -r "$MOUNT/run" "$OUT/run"
"""


def test_a_real_full_disk_keeps_the_last_checkpoint(copy_run, tiny_config, tmp_path):
    """A 1 MB tmpfs, filled: mounted in a user and mount namespace of its own, skipped where none can be made."""
    run, mount, out = copy_run(), tmp_path / "mnt", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    prefix = ["unshare", "--user", "--map-root-user", "--mount"]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "mount", "-t", "tmpfs", "tmpfs", str(mount)],
                                                         capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    env = interruption.environment() | {"MOUNT": str(mount), "RUN": str(run), "CONFIG": str(tiny_config),
                                        "OUT": str(out), "PYTHON": sys.executable}
    subprocess.run([*prefix, "sh", "-c", FULL_DISK], env=env, check=True)
    err = (out / "stderr").read_text()
    assert (out / "rc").read_text().strip() == "2" and err.count("\n") == 1 and "Traceback" not in err, err
    assert "No space left on device" in err and "checkpoint of step 20" in err and "--resume" in err, err
    assert load_checkpoint(out / "run" / "checkpoint.safetensors")[1]["step"] == 20
    assert temporaries(out) == []
    assert [r["step"] for r in training.read_metrics(out / "run")][:4] == [5, 10, 15, 20]


def test_a_file_in_the_path_is_one_line(cli, copy_run, tiny_config, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    run = copy_run()
    before = snapshot(tmp_path)
    assert_one_line_error(cli("train", tiny_config, "--out", blocker / "run", "--quiet"), str(blocker))
    assert_one_line_error(cli("sample", run, "-n", "2", "--out", blocker / "s.npy", "--quiet"), str(blocker))
    assert_one_line_error(cli("plot", run, "--out", blocker / "figures", "--quiet"), str(blocker))
    assert snapshot(tmp_path) == before


# damage -> the line refused (None: resumed)
DAMAGED_LOGS = {
    "non_utf8_byte": (lambda lines: [lines[0], b'{"step": 10, "K_bits\xff": 1}', *lines[2:]], 2),
    "garbage_line": (lambda lines: [lines[0], bytes(range(256)).replace(b"\n", b""), *lines[2:]], 2),
    "not_a_record": (lambda lines: [*lines[:2], b"[1, 2]", *lines[3:]], 3),
    "last_line_cut_by_a_kill": (lambda lines: [*lines, b'{"step": 25, "K_bi'], None),
}


@pytest.mark.parametrize("case", DAMAGED_LOGS)
def test_damaged_metrics_before_resume_are_refused_in_one_line(case, cli, copy_run, tiny_config, tmp_path):
    run = copy_run()
    damage, line = DAMAGED_LOGS[case]
    lines = (run / "metrics.jsonl").read_bytes().splitlines()
    cut = case == "last_line_cut_by_a_kill"
    (run / "metrics.jsonl").write_bytes(b"\n".join(damage(lines)) + (b"" if cut else b"\n"))
    before = snapshot(tmp_path)
    result = cli("train", tiny_config, "--out", run, "--resume", "--steps", "25", "--quiet")
    if line is None:
        assert result.rc == 0, result
        assert [r["step"] for r in training.read_metrics(run)] == [5, 10, 15, 20, 25]
        return
    assert_one_line_error(result, str(run / "metrics.jsonl"), f"line {line}", "damaged", "delete")
    assert snapshot(tmp_path) == before


def test_a_damaged_evaluation_record_is_refused_by_plot(cli, copy_run, tmp_path):
    run = copy_run()
    (run / "evaluation.json").write_bytes(b'{"K_bits": 1.0, \xff')
    before = snapshot(tmp_path)
    assert_one_line_error(cli("plot", run, "--quiet"), str(run / "evaluation.json"), "damaged", "thermodiff evaluate")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- 3. SIGTERM and SIGINT


@contextlib.contextmanager
def sigint_not_ignored():
    """Children started in the body do not inherit an ignored SIGINT (as a background job has),
    which thermodiff leaves ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    config = interruption.write_config(folder, steps=STEPS)
    interruption.run_uninterrupted(config, folder / "run", 1, folder / "train.log")
    return folder / "run"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_the_step_and_the_printed_resume_ends_bit_for_bit(signum, request, tmp_path):
    """Both signals take one path; SIGTERM's run is resumed and compared (what a preempted job does)."""
    config, run, log = interruption.write_config(tmp_path, steps=STEPS), tmp_path / "run", tmp_path / "train.log"
    with sigint_not_ignored():
        proc = interruption.launch(interruption.train_argv(config, run, 1, resume=False), log)
    wait_for_step(run, proc, 20)
    proc.send_signal(signum)
    assert proc.wait() == 128 + signum, log.read_text()
    message = log.read_text()
    assert message.count("\n") == 1 and "Traceback" not in message, message
    step = int(re.fullmatch(rf"thermodiff train: interrupted by {signum.name} at step (\d+); checkpoint saved in "
                            rf"{re.escape(str(run))}; continue with: (.*)\n", message)[1])
    assert 20 <= step < STEPS and interruption.checkpoint_step(run) == step
    command = shlex.split(message.split("continue with: ")[1])
    assert command[:2] == ["thermodiff", "train"] and "--resume" in command
    if signum != signal.SIGTERM:
        return
    uninterrupted = request.getfixturevalue("uninterrupted")
    resumed = thermodiff(*command[1:], "--quiet")  # as printed (thermodiff being python -m thermodiff)
    assert resumed.rc == 0, resumed
    assert interruption.differences(interruption.final_state(uninterrupted), interruption.final_state(run)) == []
    assert temporaries(tmp_path) == []


def test_a_second_ctrl_c_stops_at_once_and_an_ignored_signal_stays_ignored():
    with sigint_not_ignored():
        with stopping.stop_requests() as stop:
            os.kill(os.getpid(), signal.SIGINT)  # the first: recorded, for the loop to stop between steps
            assert stop.signum == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)  # the second: as without training
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with stopping.stop_requests():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
