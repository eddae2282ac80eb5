"""Fast sampling on trained image runs: the exact bound of the chain respaced to T, T/4 and T/10
steps (or --steps), with each of --variances' rules, and the sampling speed on each, through the
CLI as a user runs it.

    OMP_NUM_THREADS=1 python benchmarks/respaced.py RUN [RUN ...] [--max-examples 50] [--samples 8]
                                                    [--steps 10,20,50] [--variances moments,fitted]
                                                    [--spacings even,quad,optimal]

For every run: ``thermodiff evaluate RUN --respace N --variance RULE`` (all N - 1 KL terms, prior
and decoder of the respaced chain, on the first --max-examples test images, one noise draw per
term, steps drawn as --t-sampling says) and ``thermodiff sample RUN --respace N -n S`` timed (not
with --samples 0). With ``--spacings even,optimal`` also ``--respace optimalN`` (the N steps of the
highest expected bound, with fitted variances only; it samples as fast as the even chain), and with
``quad`` ``--respace quadN`` (N quadratically spaced steps, with each rule). Writes
benchmarks/results/respaced_<name>.json (name: --name, or the first run's experiment).
"""

import argparse
import datetime
import tempfile
from pathlib import Path

import torch

from record import thermodiff_json, write_result  # a sibling module: benchmarks/ is on sys.path when run
from thermodiff.tasks.options import VARIANCE_RULES

REPORTED = ("K_bits_per_pixel", "stderr_bits_per_pixel", "K_minus_L_null_bits_per_pixel", "nll_bits_per_dim")


def sampling_rate(run: str, steps: int, n_samples: int, seed: int) -> dict:
    """``thermodiff sample RUN --respace STEPS -n N`` timed: its wall seconds and images/s."""
    with tempfile.TemporaryDirectory() as tmp:
        s = thermodiff_json(["sample", run, "--respace", str(steps), "-n", str(n_samples), "--seed", str(seed),
                             "--out", str(Path(tmp) / "s.npy")])
    return {"sample_wall_s": s["sample_wall_s"], "images_per_s": round(n_samples / s["sample_wall_s"], 4)}


def measure_run(run: str, max_examples: int, n_samples: int, seed: int, step_counts: list[int] | None,
                variances: list[str], t_sampling: str | None, spacings: list[str]) -> dict:
    """The bound (and images/s) at T, T/4 and T/10 steps, or ``step_counts``, for one run."""
    common = ["--max-examples", str(max_examples), "--eval-seed", str(seed)]
    common += ["--t-sampling", t_sampling] if t_sampling else []  # else the run's eval.t_sampling
    full = thermodiff_json(["evaluate", run, *common])
    T, chains = full["T"], []
    for steps in step_counts or (T, max(2, T // 4), max(2, T // 10)):
        timed = sampling_rate(run, steps, n_samples, seed) if n_samples else {}
        chosen = [(spacing, variance) for spacing in ("even", "quad") if spacing in spacings for variance in variances]
        chosen += [("optimal", "fitted")] if "optimal" in spacings and steps < T else []
        for spacing, variance in chosen:
            spec = str(steps) if spacing == "even" else f"{spacing}{steps}"
            e = (full if steps == T and variance == "moments" else
                 thermodiff_json(["evaluate", run, "--respace", spec, "--variance", variance, *common]))
            chains.append({"steps": steps, "spacing": spacing, "variance_rule": variance,
                           "respaced_timesteps": e.get("respaced_timesteps"), **{k: e[k] for k in REPORTED}, **timed})
            if timed:
                chains[-1]["speed_up"] = round(timed["images_per_s"] / chains[0]["images_per_s"], 2)
            print(f"{full['experiment']:24} {steps:5d} {spacing:7} steps, {variance:11} K = "
                  f"{e['K_bits_per_pixel']:.3f} +- {e['stderr_bits_per_pixel']:.3f} bits/pixel", flush=True)
    return {"run": run, "experiment": full["experiment"], "parameterization": full["parameterization"],
            "eps_variance": full.get("eps_variance"), "train_loss": full["train_loss"],
            "train_steps": full["train_steps"], "T": T, "chains": chains}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--max-examples", type=int, default=50)
    parser.add_argument("--samples", type=int, default=8, help="images drawn to time sampling (0: not timed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", help="comma-separated step counts (default T, T/4, T/10)")
    parser.add_argument("--variances", default="moments", help=f"comma-separated rules of {', '.join(VARIANCE_RULES)}")
    parser.add_argument("--spacings", default="even",
                        help="comma-separated, of even, quad (--respace quadN) and optimal (--respace optimalN)")
    parser.add_argument("--t-sampling", choices=["uniform", "importance"], help="default: the run's eval.t_sampling")
    parser.add_argument("--name", help="results file: respaced_NAME.json")
    args = parser.parse_args()
    step_counts = [int(n) for n in args.steps.split(",")] if args.steps else None
    variances = args.variances.split(",")
    if unknown := set(variances) - set(VARIANCE_RULES):
        parser.error(f"--variances: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANCE_RULES)}")
    spacings = args.spacings.split(",")
    if unknown := set(spacings) - {"even", "quad", "optimal"}:
        parser.error(f"--spacings: unknown {', '.join(sorted(unknown))}; choose from even, quad, optimal")
    records = [measure_run(run, args.max_examples, args.samples, args.seed, step_counts, variances, args.t_sampling,
                           spacings) for run in args.runs]
    name = args.name or records[0]["experiment"]
    record = {
        "command": f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/respaced.py {' '.join(args.runs)} "
                   f"--max-examples {args.max_examples} --samples {args.samples} --seed {args.seed}"
                   + (f" --steps {args.steps}" if args.steps else "") + f" --variances {args.variances}"
                   + f" --spacings {args.spacings}"
                   + (f" --t-sampling {args.t_sampling}" if args.t_sampling else "")
                   + (f" --name {args.name}" if args.name else ""),
        "date": datetime.date.today().isoformat(),
        "evaluation": {"split": "test, first --max-examples images", "n_examples": args.max_examples, "n_draws": 1,
                       "bound": "bound of the (respaced) chain: prior, decoder and the KL terms (as many steps per "
                                f"example as thermodiff evaluate's default, drawn {args.t_sampling or 'as the run says'}), "
                                "float64",
                       "respacing": "spacing even: evenly spaced steps including 1 and T; quad: --respace quadN "
                                    "(quadratically spaced, 1 to T); optimal: --respace optimalN; "
                                    "variance_rule: thermodiff evaluate --variance (fitted: on the first 500 "
                                    "training images)",
                       "n_samples_timed": args.samples, "speed_up": "images_per_s relative to the first chain"},
        "runs": records,
    }
    print(f"-> {write_result(f'respaced_{name}', record)}")


if __name__ == "__main__":
    main()
