"""Training speed in thermodiff's own training loop (data, EMA, logging and checkpoints included),
one variant of the speed options after another on an idle machine:

    python benchmarks/train_speed.py CONFIG --data-dir DIR [--steps 300] [--from-step 150] [--threads 2]
                                     [--out runs/train_speed] [--name NAME]

Each variant trains ``thermodiff train CONFIG --steps N`` from scratch in OUT/VARIANT with
OMP_NUM_THREADS = --threads, and its speed is the steps per second of wall time from step
--from-step to N, read off the run's metrics.jsonl: past torch.compile's compilation and the
first steps' warm-up. A variant whose folder already holds N steps trained with its settings is
read, not trained again (the record says so), so a stop loses no finished variant. The variants
train the same numbers (the same seed and draws), which the record checks. Writes
benchmarks/results/NAME.json (default train_speed_EXPERIMENT).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from record import write_result  # a sibling module: benchmarks/ is on sys.path when run

#: variant -> the train.* settings it runs with
VARIANTS = {
    "plain": {"compile": False, "channels_last": False},
    "channels_last": {"compile": False, "channels_last": True},
    "compile_channels_last": {"compile": True, "channels_last": True},
}


def trained(run: Path, experiment: str, steps: int, settings: dict) -> list[dict] | None:
    """The run's log records if it is ``experiment``'s and reached ``steps`` with ``settings``, else None."""
    try:
        config = json.loads((run / "config.json").read_text())
        log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return None
    matches = config.get("name") == experiment and all(config["train"].get(key) == value
                                                         for key, value in settings.items())
    return log if matches and log and log[-1]["step"] >= steps else None


def measure(args, variant: str) -> dict:
    settings, run = VARIANTS[variant], Path(args.out) / variant
    command = ["thermodiff", "train", args.config, "--data-dir", args.data_dir, "--out", str(run), "--steps",
               str(args.steps), "--overwrite", *[f"--set=train.{key}={str(value).lower()}" for key, value in settings.items()]]
    experiment = Path(args.config).stem
    log, reused = trained(run, experiment, args.steps, settings), True
    if log is None:
        load_before, reused = os.getloadavg(), False
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                       stdout=subprocess.DEVNULL)
        log = trained(run, experiment, args.steps, settings)
    at = {record["step"]: record for record in log}
    first, last = at[args.from_step], at[args.steps]
    steps_per_s = (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])
    return {"settings": settings, "command": f"OMP_NUM_THREADS={args.threads} " + " ".join(command),
            "reused_run": reused, "load_average_before": None if reused else load_before,
            "load_average_after": None if reused else os.getloadavg(),
            "steps_per_s": steps_per_s, "elapsed_s_to_first_step_measured": first["elapsed_s"],
            "K_bits_running_at_end": last["K_bits_running"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--from-step", type=int, default=150, help="a step at which the log writes a record")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="runs/train_speed")
    parser.add_argument("--name")
    parser.add_argument("--notes", default="")
    args = parser.parse_args()
    results = {variant: measure(args, variant) for variant in args.variants.split(",")}
    base = next(iter(results.values()))
    for r in results.values():
        r["speed_up"] = r["steps_per_s"] / base["steps_per_s"]
    same_numbers = len({round(r["K_bits_running_at_end"], 2) for r in results.values()}) == 1
    experiment = Path(args.config).stem
    record = {"benchmark_command": "python benchmarks/train_speed.py " + " ".join(sys.argv[1:]),
              "method": f"steps/s of wall time from step {args.from_step} to {args.steps} of thermodiff train, "
                        f"OMP_NUM_THREADS={args.threads}, one variant after another",
              "same_numbers": same_numbers, "notes": args.notes, "variants": results}
    print(write_result(args.name or f"train_speed_{experiment}", record))
    for variant, r in results.items():
        print(f"{variant:24} {r['steps_per_s']:.3f} steps/s  x{r['speed_up']:.2f}{'  (reused run)' if r['reused_run'] else ''}")


if __name__ == "__main__":
    main()
