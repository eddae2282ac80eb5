"""Record a budget-limited image run: the exact bound on held-out images (and for MNIST the
Parzen-window log-likelihood), the training curve and the time to a stated bound.

    python benchmarks/budget.py RUN_DIR --train-command "..." [--max-examples 200] [--parzen-samples 0]
                                [--parzen-steps N] [--parzen-variance RULE] [--also-variance RULE] [--parzen-clip-x0]
                                [--t-sampling importance|uniform] [--grid] [--name NAME]

Runs `thermodiff evaluate` (and `thermodiff parzen`, with a grid of 20 more samples from the same
chain, NAME_samples.png; ``--grid``: the grid alone) in-process on a finished run and writes
benchmarks/results/NAME.json (default <experiment>_budget). The training curve is the running training
estimate of K (per pixel, on training batches, smoothed) from the run's metrics log against wall
time (CPU time for a run trained with train.clock = "cpu"); "time to bound" reads off it when the
estimate had made 50%, 90% and 100% of its rise. The held-out figure is the evaluation's.
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

import numpy as np

from record import RESULTS, thermodiff_json, write_result  # a sibling module: benchmarks/ is on sys.path when run
from thermodiff.run.training import read_metrics
from thermodiff.tasks.options import VARIANCE_RULES


def training_curve(run_dir: Path, dim: int, smooth: int = 10) -> list[dict]:
    """(step, elapsed_s, running K in bits/pixel averaged over the last ``smooth`` log records)."""
    records = [r for r in read_metrics(run_dir) if "K_bits_running" in r]  # not the score before training
    sums = np.concatenate([[0.0], np.cumsum([r["K_bits_running"] / dim for r in records])])
    ends = np.arange(1, len(records) + 1)
    starts = np.maximum(ends - smooth, 0)
    smoothed = (sums[ends] - sums[starts]) / (ends - starts)
    return [{"step": r["step"], "elapsed_s": r["elapsed_s"], "K_bits_per_pixel_running": round(float(k), 4)}
            for r, k in zip(records, smoothed)]


def time_to(curve: list[dict], fraction: float) -> dict | None:
    """The first log record at which the smoothed running bound has made ``fraction`` of its
    whole rise (first record to last): a time to a stated bound measured on the training estimate."""
    first, last = curve[0]["K_bits_per_pixel_running"], curve[-1]["K_bits_per_pixel_running"]
    level = first + fraction * (last - first)
    return next(({"fraction_of_rise": fraction, "level_bits_per_pixel": round(level, 4), "step": c["step"],
                  "elapsed_s": c["elapsed_s"]} for c in curve if c["K_bits_per_pixel_running"] >= level), None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--train-command", required=True, help="the command that trained the run, for the record")
    parser.add_argument("--max-examples", type=int, default=200)
    parser.add_argument("--parzen-samples", type=int, default=0, help="0: no Parzen estimate")
    parser.add_argument("--parzen-steps", help="draw the Parzen samples on this respaced chain (thermodiff parzen "
                                               "--steps) and evaluate that chain's bound too (evaluate --respace)")
    parser.add_argument("--parzen-variance", choices=VARIANCE_RULES, default="moments",
                        help="the respaced chain's variances for the samples and its bound (thermodiff parzen --variance)")
    parser.add_argument("--parzen-clip-x0", action="store_true",
                        help="clip the samples' chain's x_0 to the data's range, for them and its bound (--clip-x0)")
    parser.add_argument("--also-variance", choices=VARIANCE_RULES,
                        help="also the bound of the same chain with these variances (parzen_chain_evaluation_RULE)")
    parser.add_argument("--t-sampling", choices=["uniform", "importance"], default="importance",
                        help="how the bound's estimate draws its steps (thermodiff evaluate --t-sampling)")
    parser.add_argument("--grid", action="store_true",
                        help="a grid of 20 samples (NAME_samples.png) without a Parzen estimate (with one, always)")
    parser.add_argument("--notes", default="")
    parser.add_argument("--name", help="the record's name (default <experiment>_budget)")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    evaluate = ["evaluate", str(run_dir), "--max-examples", str(args.max_examples), "--t-sampling", args.t_sampling]
    evaluation = thermodiff_json(evaluate)
    name = args.name or f"{evaluation['experiment']}_budget"
    commands = [args.train_command, shlex.join(["thermodiff", *evaluate])]
    curve = training_curve(run_dir, evaluation["dim"])
    record = {"commands": commands, "notes": args.notes}
    chain = ["--steps", args.parzen_steps] if args.parzen_steps else []
    chain += ["--variance", args.parzen_variance] if args.parzen_variance != "moments" else []
    chain += ["--clip-x0"] if args.parzen_clip_x0 else []
    if args.parzen_samples:
        parzen = ["parzen", str(run_dir), "--samples", str(args.parzen_samples), *chain]
        record["parzen"] = thermodiff_json(parzen)
        commands.append(shlex.join(["thermodiff", *parzen]))
        # the bound of the chain the samples came from, and of the same steps with other variances
        for key, variance in (("parzen_chain_evaluation", args.parzen_variance),
                              (f"parzen_chain_evaluation_{args.also_variance}", args.also_variance)):
            if args.parzen_steps and variance:
                respaced = [*evaluate, "--respace", args.parzen_steps, "--variance", variance,
                            *(["--clip-x0"] if args.parzen_clip_x0 else [])]
                record[key] = thermodiff_json(respaced)
                commands.append(shlex.join(["thermodiff", *respaced]))
    if args.parzen_samples or args.grid:
        figure = os.path.relpath(RESULTS / f"{name}_samples.png")  # as the record's command names it
        grid = ["sample", str(run_dir), "-n", "20", "--out", figure, "--overwrite", *chain]
        thermodiff_json(grid)  # what the samples look like: 20 more of them, from the Parzen samples' chain
        commands.append(shlex.join(["thermodiff", *grid]))
    final = evaluation["K_bits_per_pixel"]
    record |= {
        "benchmark_command": "python benchmarks/budget.py " + shlex.join(sys.argv[1:]),
        # the scored checkpoint's updates and time (the log's last line trails it by up to an interval)
        "train": {"steps": evaluation["train_steps"], f"{evaluation['train_clock']}_s": evaluation["train_s"],
                  "clock": evaluation["train_clock"], "device": "cpu"},
        "time_to_bound": [time_to(curve, fraction) for fraction in (0.5, 0.9, 1.0)],
        "training_curve": curve[:: max(1, len(curve) // 40)] + curve[-1:],
        "evaluation": evaluation,
    }
    out = write_result(name, record)
    print(f"K = {final:.3f} +- {evaluation['stderr_bits_per_pixel']:.3f} bits/pixel, "
          f"NLL {evaluation.get('nll_bits_per_dim', float('nan')):.3f} bits/dim -> {out}")
