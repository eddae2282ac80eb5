"""Runs of one data set scored on the same held-out images, each paired with the first image by
image: `thermodiff evaluate RUN --per-example` for every run (the same first test images, the same
dequantisation noise), then each run's mean difference from the first in K per pixel, with its
standard error over the images. Runs may be diffusion runs or baselines (an MCGSM's exact
log-likelihood, a VAE's ELBO stand in K's place).

    python benchmarks/paired.py RUN_A RUN_B [...] --name NAME [--max-examples 200]
                                [--t-sampling importance|uniform] [--command RUN=COMMAND ...] [--notes TEXT]
                                [--earlier NAME ...]

Writes benchmarks/results/NAME.json: per run its evaluation (without the per-step terms), steps,
training time on the run's clock, training curve and the paired difference from the first run
(above 0: a higher bound, or likelihood, on the same images), and how much its training estimate
still rose over the last quarter of its training time. With ``--earlier`` records of the same
runs at smaller budgets, each run's difference by budget and the time at which it would catch up
with the first run, extrapolated from the last two budgets (if the first run was not trained
further between them) and labelled as an extrapolation. Draws benchmarks/results/NAME_curves.png:
the runs' training curves and test K by budget, and their differences from the first by budget.
"""

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from budget import training_curve  # sibling modules: benchmarks/ is on sys.path when run
from record import RESULTS, thermodiff_json, write_result
from thermodiff.process.bound import standard_error
from thermodiff.run.training import read_metrics
from thermodiff.tasks.plotting import save_figure  # selects matplotlib's Agg backend before pyplot loads

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import ScalarFormatter  # noqa: E402


def evaluate(run: Path, max_examples: int, t_sampling: str) -> tuple[dict, np.ndarray, list[str]]:
    """The run's evaluation, its bound per example (bits, original units) and the command."""
    per_example = run / "K_per_example_paired.npy"
    argv = ["evaluate", str(run), "--max-examples", str(max_examples), "--t-sampling", t_sampling,
            "--per-example", str(per_example), "--overwrite"]
    evaluation = thermodiff_json(argv)
    evaluation.pop("per_timestep_bits", None)
    return evaluation, np.load(per_example), argv


def paired(k: np.ndarray, reference: np.ndarray, pixels: int) -> dict:
    """Mean and standard error over images of (k - reference) per pixel."""
    diff = torch.from_numpy((k - reference) / pixels)
    return {"K_difference_bits_per_pixel": float(diff.mean()), "stderr_bits_per_pixel": standard_error(diff),
            "images": len(diff)}


def late_rise(metrics: list[dict], pixels: int) -> dict:
    """Whether training was still paying at the end of the run's budget: the mean training estimate
    of K per pixel (the log's windows) over the last quarter of its training time against the
    quarter before, with the standard error of the difference (windows taken as independent). A
    reference stopped where this is about 0 had levelled off, so a later, longer-trained run that
    passes it is not passing a model merely stopped early."""
    records = [r for r in metrics if "K_bits_window" in r]
    end = records[-1]["elapsed_s"]
    quarters = [torch.tensor([r["K_bits_window"] / pixels for r in records
                              if lo * end < r["elapsed_s"] <= hi * end], dtype=torch.float64)
                for lo, hi in ((0.5, 0.75), (0.75, 1.0))]
    if min(len(q) for q in quarters) < 2:
        return {}
    rise = float(quarters[1].mean() - quarters[0].mean())
    stderr = math.hypot(standard_error(quarters[0]), standard_error(quarters[1]))
    return {"third_quarter_K_bits_per_pixel": float(quarters[0].mean()),
            "last_quarter_K_bits_per_pixel": float(quarters[1].mean()),
            "rise_bits_per_pixel": rise, "stderr_bits_per_pixel": stderr,
            "windows": [len(q) for q in quarters], "minutes": end / 60}


def same_images(first: dict, other: dict, run: Path) -> None:
    """Refuse runs not scored on the same images in the same units: their null model's mean and
    scaling must agree."""
    for key in ("n_examples", "dim"):
        if first[key] != other[key]:
            raise SystemExit(f"{run}: {key} {other[key]} differs from the first run's {first[key]}")
    for key in ("L_null_bits", "log_det_scaling_bits"):
        if not math.isclose(first[key], other[key], rel_tol=1e-9):
            raise SystemExit(f"{run}: {key} differs from the first run's: not the same images or scaling")


def minutes(row: dict) -> float:
    """A record row's training time in minutes, on its run's clock."""
    return row[f"train_{row['clock']}_s"] / 60


def to_budget(minutes: float) -> float:
    """Training minutes to a tenth of a minute: one budget scored in two records is one budget
    (older records read the time from the last log line, newer ones from the checkpoint)."""
    return round(minutes, 1)


def budget(row: dict) -> float:
    """A row's training budget (``to_budget`` of its minutes)."""
    return to_budget(minutes(row))


def earlier_rows(row: dict, earlier: list[str]) -> list[tuple[dict, dict]]:
    """The run's rows in the ``earlier`` records (the same run scored the same way at other budgets,
    on the same clock), each with that record's first row."""
    pairs = []
    for name in earlier:
        rows = json.loads((RESULTS / f"{name}.json").read_text())["rows"]
        pairs += [(old, rows[0]) for old in rows if old["run"] == row["run"] and old.get(f"train_{row['clock']}_s")]
    return pairs


def by_budget(row: dict, first: dict, earlier: list[str]) -> dict:
    """The run's paired difference from the first run at its budget and at those of the ``earlier``
    records (the same runs, trained less, scored the same way), each with the first run's budget,
    and, from the last two budgets if the first run had the same budget at both, its rise per
    doubling of training time and the time at which it would reach 0 (the first run's K) if it
    kept rising at that rate: an extrapolation, labelled as one (log-linear in time; training
    curves bend over, so it is optimistic)."""
    points = {budget(old): {**old["vs_first"], "first_minutes": minutes(old_first)}
              for old, old_first in earlier_rows(row, earlier)}
    points[budget(row)] = {**row["vs_first"], "first_minutes": minutes(first)}
    budgets = sorted(points)
    out = {"by_minutes": [{"minutes": m, "clock": row["clock"], **points[m]} for m in budgets]}
    last_two = [points[m] for m in budgets[-2:]]
    if len(budgets) >= 2 and math.isclose(last_two[0]["first_minutes"], last_two[1]["first_minutes"], rel_tol=1e-6):
        (m1, m2), (d1, d2) = budgets[-2:], (p["K_difference_bits_per_pixel"] for p in last_two)
        rise = (d2 - d1) / math.log2(m2 / m1)
        out["extrapolation"] = {"label": "extrapolation, not a measurement", "rise_per_doubling_bits_per_pixel": rise,
                                "minutes_to_reach_first": m2 * 2 ** (-d2 / rise) if d2 < 0 < rise else None}
    return out


def held_out_k_by_budget(row: dict, earlier: list[str]) -> list[tuple[float, float, float]]:
    """(minutes, K, standard error) in bits/pixel of the run on the test images at its budget and at
    those of the ``earlier`` records, by budget."""
    points = {budget(old): old["evaluation"] for old, _ in earlier_rows(row, earlier)}
    points[budget(row)] = row["evaluation"]
    return [(m, points[m]["K_bits_per_pixel"], points[m]["stderr_bits_per_pixel"]) for m in sorted(points)]


def doublings_axis(ax, clock: str) -> None:
    """Training time on a log axis with a tick per doubling (the unit of the catch-up line)."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel(f"training time ({clock} minutes)")


def k_panel(ax, rows: list[dict], earlier: list[str]) -> None:
    """Each run's training estimate of K against its training time (the record's curve) and its
    test K at each budget (this record and the earlier ones, +- 1 standard error)."""
    lowest, earliest = math.inf, math.inf
    for i, row in enumerate(rows):
        curve = row["curve"]
        ax.plot([c["elapsed_s"] / 60 for c in curve], [c["K_bits_per_pixel_running"] for c in curve],
                color=f"C{i}", alpha=0.4, label=f"{row['run']}: training estimate (running mean)")
        m, k, se = zip(*held_out_k_by_budget(row, earlier))
        ax.errorbar(m, k, se, fmt="o", color=f"C{i}", capsize=3, label=f"{row['run']}: test K")
        lowest, earliest = min(lowest, *k), min(earliest, *m)
    doublings_axis(ax, rows[0]["clock"])
    ax.set(ylabel="K (bits/pixel)",
           title="bound (or log-likelihood) per pixel",  # around the test points, not the first steps
           xlim=(earliest / 4, None), ylim=(lowest - 0.5, None))
    ax.legend(fontsize=7)


def gap_panel(ax, rows: list[dict]) -> None:
    """Each later run's paired difference from the first by budget, a line per budget of the first
    run (gaps to a reference trained further are not on one line), and the catch-up line where one
    was extrapolated (dashed)."""
    for i, row in enumerate(rows[1:], start=1):
        points = row["by_budget"]["by_minutes"]
        for marker, first_minutes in zip("osD^v<>", sorted({to_budget(p["first_minutes"]) for p in points})):
            same = [p for p in points if to_budget(p["first_minutes"]) == first_minutes]
            ax.errorbar([p["minutes"] for p in same], [p["K_difference_bits_per_pixel"] for p in same],
                        [p["stderr_bits_per_pixel"] for p in same], fmt=f"{marker}-", color=f"C{i}", capsize=3,
                        label=f"{row['run']} - {rows[0]['run']} at {first_minutes:.0f} minutes")
        line = row["by_budget"].get("extrapolation", {})
        if line.get("minutes_to_reach_first"):
            ax.plot([points[-1]["minutes"], line["minutes_to_reach_first"]], [points[-1]["K_difference_bits_per_pixel"], 0.0],
                    ls="--", color=f"C{i}", label="extrapolation, not a measurement")
    ax.axhline(0.0, color="k", lw=0.8)
    doublings_axis(ax, rows[0]["clock"])
    ax.set(ylabel="paired difference (bits/pixel)",
           title=f"difference from {rows[0]['run']}, same test images")
    ax.legend(fontsize=7)


def curves_figure(rows: list[dict], earlier: list[str], path: Path) -> Path:
    """The record as a figure: K by training time (left) and, with earlier records, the paired
    differences by budget (right)."""
    with_budgets = len(rows) > 1 and "by_budget" in rows[1]
    fig, axes = plt.subplots(1, 1 + with_budgets, figsize=(6 + 6 * with_budgets, 4.5), squeeze=False)
    k_panel(axes[0, 0], rows, earlier)
    if with_budgets:
        gap_panel(axes[0, 1], rows)
    fig.tight_layout()
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--name", required=True, help="the record: benchmarks/results/NAME.json")
    parser.add_argument("--max-examples", type=int, default=200)
    parser.add_argument("--t-sampling", choices=["uniform", "importance"], default="importance")
    parser.add_argument("--command", action="append", default=[], metavar="RUN=COMMAND",
                        help="the command that trained a run, for the record")
    parser.add_argument("--notes", default="")
    parser.add_argument("--earlier", action="append", default=[], metavar="NAME",
                        help="a record of the same runs at a smaller budget (benchmarks/results/NAME.json): each run "
                             "gets its difference by budget and the time extrapolated to reach the first run's K")
    args = parser.parse_args()
    if len(args.runs) < 2:
        raise SystemExit("paired.py needs two runs or more (the first is the reference)")
    if any("=" not in c for c in args.command):
        raise SystemExit("--command takes RUN=COMMAND")
    commands = dict(c.split("=", 1) for c in args.command)
    rows, reference = [], None
    for run in args.runs:
        evaluation, k, argv = evaluate(run, args.max_examples, args.t_sampling)
        if "pixels" not in evaluation:
            raise SystemExit(f"{run}: not an image run; paired.py compares images per pixel")
        pixels = evaluation["pixels"]
        if reference is None:
            reference, first = k, evaluation
        same_images(first, evaluation, run)
        clock, metrics = evaluation["train_clock"], read_metrics(run)
        rows.append({"run": str(run), "train_command": commands.get(str(run)),
                     "evaluate_command": shlex.join(["thermodiff", *argv]), "steps": evaluation["train_steps"],
                     "clock": clock, f"train_{clock}_s": evaluation["train_s"],  # the scored checkpoint's
                     "evaluation": evaluation, "vs_first": paired(k, reference, pixels),
                     "curve": training_curve(run, pixels)[::10], "late_rise": late_rise(metrics, pixels)})
        if args.earlier and len(rows) > 1:
            rows[-1]["by_budget"] = by_budget(rows[-1], rows[0], args.earlier)
    out = write_result(args.name, {"benchmark_command": "python benchmarks/paired.py " + shlex.join(sys.argv[1:]),
                                   "notes": args.notes, "rows": rows})
    figure = curves_figure(rows, args.earlier, RESULTS / f"{args.name}_curves.png")
    for r in rows:
        e, d = r["evaluation"], r["vs_first"]
        print(f"{r['run']}: K {e['K_bits_per_pixel']:.3f} +- {e['stderr_bits_per_pixel']:.3f} bits/pixel, "
              f"paired difference from the first {d['K_difference_bits_per_pixel']:+.3f} +- {d['stderr_bits_per_pixel']:.3f}")
    print(f"-> {out}, {figure}")


if __name__ == "__main__":
    main()
