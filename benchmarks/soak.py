"""Soak test of interruption safety (issue 5): train a small run, kill it with SIGKILL at random
moments many times, restart it with ``--resume`` each time, and compare its final state with an
uninterrupted run's, bit for bit (thermodiff.run.interruption says how the kills are placed and what
is checked after each).

    OMP_NUM_THREADS=1 python benchmarks/soak.py                       # 40 kills, then 8 under torchrun
    OMP_NUM_THREADS=1 python benchmarks/soak.py --kills 100 --ddp-kills 0 --steps 4000

Writes benchmarks/results/soak.json: per configuration the kills survived, every kill's moment
and the checkpoint it left, the differences found, timings, the commands and the hardware.
"""

import argparse
import datetime
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from thermodiff.run.checkpoint import atomic_write_text
from thermodiff.run.interruption import soak
from thermodiff.run.machine import machine

RESULTS = Path(__file__).resolve().parent / "results"


def code_version() -> dict:
    """The commit the soak ran on, and whether tracked files had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain", "-uno"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=40, help="kills of the one-process run")
    parser.add_argument("--ddp-kills", type=int, default=8, help="kills of the torchrun run with 2 processes (0: skip)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--ddp-steps", type=int, default=500)
    parser.add_argument("--checkpoint-every", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--work", default="runs/soak", help="folder for the runs (replaced)")
    parser.add_argument("--out", default=str(RESULTS / "soak.json"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    hardware = machine() | {"omp_num_threads": "1 (set for every training process)"}
    result = {"benchmark": "soak: SIGKILL at random moments, --resume, compare with an uninterrupted run",
              "command": shlex.join(["python", "benchmarks/soak.py", *(sys.argv[1:] if argv is None else argv)]),
              "date": started, "code": code_version(), "hardware": hardware, "runs": []}
    for nproc, kills, steps in ((1, args.kills, args.steps), (2, args.ddp_kills, args.ddp_steps)):
        if kills > 0:
            print(f"soak: {kills} kills of a {steps}-step run, {nproc} process(es)", flush=True)
            result["runs"].append(soak(work / f"nproc{nproc}", nproc, kills, steps, args.checkpoint_every,
                                       args.seed + nproc))
            run = result["runs"][-1]
            print(f"  {run['kills']} kills survived, identical: {run['identical_to_uninterrupted']} "
                  f"{run['differences']}, {run['soak_wall_s']:.0f} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    return 0 if all(r["identical_to_uninterrupted"] for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
