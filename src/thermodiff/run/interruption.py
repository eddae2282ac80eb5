"""Interruption safety, checked: train a small run, kill it with SIGKILL at random moments, restart
it with ``--resume`` each time, and compare its final state with an uninterrupted run's, bit for bit.

A kill lands either during start-up (a uniform time before the first step, measured on the
uninterrupted run: imports, data, creating the run) or during training (once the metrics log
passes a random step, plus a random delay of up to two checkpoint intervals, so the kill hits
any phase of a step or of a checkpoint write). The whole process tree is killed at once, the
``torchrun`` agent and its workers alike (found through /proc: Linux only). After every kill the
run directory must either not exist yet or hold a checkpoint that loads, never older than the
one before, and no more than ``checkpoint_every`` steps behind the metrics seen before the kill.
The final weights, optimiser, RNG, EMA and metrics (all but wall-clock times) must equal the
uninterrupted run's.

:func:`soak` runs one configuration; tests/test_reliability.py runs it with a few kills and
benchmarks/soak.py with many, recording the result.
"""

import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from thermodiff.errors import UserError
from thermodiff.run.checkpoint import load_checkpoint
from thermodiff.run.training import read_metrics

# A small Swiss roll run that still has everything a resume must restore: a learned schedule
# (parameters and optimiser state outside the network), EMA weights, gradient clipping, and a
# checkpoint interval that is not a multiple of the logging interval (the logging window
# spans checkpoints).
TOML = """\
name = "soak"
seed = 7

[data]
source = "swissroll"
n = 400

[diffusion]
T = 6
schedule = "learned"
beta_1 = 1e-3

[model]
network = "mlp"
hidden = 16
layers = 2
readout = "bumps"
n_basis = 4

[train]
steps = {steps}
batch_size = 32
lr = 1e-2
lr_decay_every = {decay_every}
checkpoint_every = {checkpoint_every}
log_every = {log_every}
ema_decay = 0.9
grad_clip = 1.0
"""
POLL_S = 0.01


def write_config(folder: Path, steps: int, checkpoint_every: int = 7, log_every: int = 5) -> Path:
    path = Path(folder) / "soak.toml"
    path.write_text(TOML.format(steps=steps, decay_every=steps // 2, checkpoint_every=checkpoint_every,
                                log_every=log_every), encoding="utf-8")
    return path


def train_argv(config: Path, out: Path, nproc: int, resume: bool) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return [*launcher, "-m", "thermodiff", "train", str(config), "--out", str(out), "--device", "cpu", "--quiet",
            *(["--resume"] if resume else [])]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:  # the child keeps its own descriptor
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=environment(), start_new_session=True)


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and all its descendants at once (torchrun starts its workers in
    sessions of their own, so a process group is not enough), and wait until they are gone."""
    tree, pids, i = _children(), [proc.pid], 0
    while i < len(pids):
        pids.extend(tree.get(pids[i], []))
        i += 1
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for pid in pids[1:]:  # reparented orphans: wait until they are no longer running
        while Path(f"/proc/{pid}").exists() and " Z " not in _stat(pid):
            time.sleep(POLL_S)


def _stat(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
    except OSError:
        return " Z "  # gone


def logged_step(run_dir: Path) -> int:
    """The last step in metrics.jsonl (complete lines only), 0 if none."""
    return max((int(r["step"]) for r in read_metrics(run_dir)), default=0)


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the run's checkpoint; None without a run directory. Raises UserError when a
    run directory exists but its checkpoint does not load."""
    if not run_dir.exists():
        return None
    return int(load_checkpoint(run_dir / "checkpoint.safetensors")[1]["step"])


def run_uninterrupted(config: Path, out: Path, nproc: int, log: Path) -> dict:
    """Train without kills; returns the wall time and when the first metrics appeared."""
    start = time.perf_counter()
    proc = launch(train_argv(config, out, nproc, resume=False), log)
    first_log = None
    while proc.poll() is None:
        if first_log is None and logged_step(out) > 0:
            first_log = time.perf_counter() - start
        time.sleep(POLL_S)
    if proc.returncode != 0:
        raise RuntimeError(f"uninterrupted run failed ({proc.returncode}); see {log}")
    return {"wall_s": time.perf_counter() - start, "startup_s": first_log or 0.0}


def run_with_kills(config: Path, out: Path, nproc: int, kills: int, steps: int, checkpoint_every: int,
                   reference: dict, rng: random.Random, log: Path, startup_fraction: float = 0.2) -> list[dict]:
    """Train ``out`` to completion, killing it ``kills`` times at random moments (see the module
    docstring) and restarting it; returns one record per kill (fewer if the run finished before
    the last kill). Raises AssertionError when a
    kill leaves a checkpoint that does not load, is older than the previous one, or is more
    than ``checkpoint_every`` steps behind the metrics seen before the kill."""
    train_s = max(reference["wall_s"] - reference["startup_s"], 1e-3)
    jitter_s = 2 * checkpoint_every * train_s / steps  # two checkpoint intervals
    records, previous = [], 0
    while True:
        resume = out.exists()
        start = time.perf_counter()
        proc = launch(train_argv(config, out, nproc, resume), log)
        if len(records) == kills:
            if proc.wait() != 0:
                raise RuntimeError(f"the last resume failed ({proc.returncode}); see {log}")
            return records
        seen = logged_step(out)  # may still hold records past the checkpoint until the run trims them
        # the next kill's step: on average the run is spread evenly over the kills; near the end
        # (where the delay after it might let the run finish) the kill comes during start-up instead
        target = max(seen + 1, previous + rng.randint(1, max(1, 2 * steps // (kills + 1))))
        moment = "startup" if rng.random() < startup_fraction or target > steps - 3 * checkpoint_every else "training"
        if moment == "startup":
            time.sleep(rng.uniform(0, reference["startup_s"]))
        else:
            while proc.poll() is None and logged_step(out) < target:
                time.sleep(POLL_S)
            time.sleep(rng.uniform(0, jitter_s))
        if proc.poll() is not None:  # finished before the kill (it should not: then it had too few steps)
            if proc.returncode != 0:
                raise RuntimeError(f"training failed ({proc.returncode}); see {log}")
            return records
        at = time.perf_counter() - start
        kill_tree(proc)
        seen = logged_step(out)
        try:
            step = checkpoint_step(out)
        except UserError as e:
            raise AssertionError(f"kill {len(records) + 1} left a checkpoint that does not load: {e}") from None
        record = {"moment": moment, "after_s": round(at, 3), "resumed": resume, "logged_step": seen,
                  "checkpoint_step": step}
        records.append(record)
        if step is not None:
            # checkpoints are written after the step's metrics, so every multiple of checkpoint_every
            # below the last logged step is complete
            assert step >= previous, f"kill {len(records)}: checkpoint went back from step {previous} to {step}"
            assert step >= (max(seen, 1) - 1) // checkpoint_every * checkpoint_every, \
                f"kill {len(records)}: checkpoint at step {step}, but metrics had reached step {seen}"
            previous = step


def final_state(run_dir: Path) -> dict:
    """What must match bit for bit: every tensor of the checkpoint, its record, the metrics and
    the config, without wall-clock times."""
    tensors, meta = load_checkpoint(run_dir / "checkpoint.safetensors")
    meta = {k: v for k, v in meta.items() if k != "elapsed_s"}
    metrics = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in read_metrics(run_dir)]
    csv_lines = (run_dir / "metrics.csv").read_text().splitlines()
    elapsed_column = csv_lines[0].split(",").index("elapsed_s")
    csv_rows = [[v for i, v in enumerate(line.split(",")) if i != elapsed_column] for line in csv_lines]
    return {"tensors": tensors, "meta": meta, "metrics": metrics, "csv": csv_rows,
            "config": (run_dir / "config.json").read_text()}


def differences(a: dict, b: dict) -> list[str]:
    """Every way two final states differ (empty when identical)."""
    found = [f"tensor {k} only in one run" for k in sorted(a["tensors"].keys() ^ b["tensors"].keys())]
    for k in sorted(a["tensors"].keys() & b["tensors"].keys()):
        x, y = a["tensors"][k], b["tensors"][k]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            found.append(f"tensor {k} differs")
    for k in sorted(a["meta"].keys() | b["meta"].keys()):
        if a["meta"].get(k) != b["meta"].get(k):
            found.append(f"checkpoint record '{k}' differs")
    for key in ("metrics", "csv", "config"):
        if a[key] != b[key]:
            found.append(f"{key} differs")
    return found


def soak(work: Path, nproc: int, kills: int, steps: int, checkpoint_every: int, seed: int) -> dict:
    """One configuration: an uninterrupted run, a killed one, and their comparison."""
    work.mkdir(parents=True, exist_ok=True)
    config = write_config(work, steps, checkpoint_every)
    reference = run_uninterrupted(config, work / "uninterrupted", nproc, work / "uninterrupted.log")
    start = time.perf_counter()
    records = run_with_kills(config, work / "killed", nproc, kills, steps, checkpoint_every, reference,
                             random.Random(seed), work / "killed.log")
    soak_s = time.perf_counter() - start
    found = differences(final_state(work / "uninterrupted"), final_state(work / "killed"))
    return {
        "nproc": nproc,
        "launcher": "torchrun (gloo)" if nproc > 1 else "one process",
        "command": shlex.join(["python", *train_argv(Path("soak.toml"), Path("RUN"), nproc, resume=False)[1:]])
                   + "  [--resume]",
        "config": config.read_text(),
        "steps": steps,
        "checkpoint_every": checkpoint_every,
        "kills": len(records),
        "kills_during_startup": sum(r["moment"] == "startup" for r in records),
        "kills_during_training": sum(r["moment"] == "training" for r in records),
        "kills_before_the_run_existed": sum(r["checkpoint_step"] is None for r in records),
        "checkpoint_always_loadable": True,  # run_with_kills raises otherwise
        "steps_redone_after_kills": sum(max(r["logged_step"] - (r["checkpoint_step"] or 0), 0) for r in records),
        "identical_to_uninterrupted": not found,
        "differences": found,
        "uninterrupted_wall_s": round(reference["wall_s"], 2),
        "startup_s": round(reference["startup_s"], 2),
        "soak_wall_s": round(soak_s, 2),
        "stale_staging_dirs": sorted(p.name for p in work.glob(".killed.new.*")),
        "kill_log": records,
    }
