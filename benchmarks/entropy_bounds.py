"""The entropy of each learned reverse kernel against the paper's bounds on H_q(X_{t-1} | X_t)
(section 2.6), on a trained Swiss roll and a trained heartbeat run, through the CLI as a user runs it.

    OMP_NUM_THREADS=1 python benchmarks/entropy_bounds.py [--out-dir runs/entropy_bounds] [--only NAME]

For each experiment: ``thermodiff train`` with the command below (into --out-dir/NAME, replacing it),
``thermodiff evaluate RUN`` (the bound on the whole test split, and per step t = 2..T the bounds and
the learned kernel's entropy averaged over x_t ~ q on the first 500 test examples), and bound.png's
panels; the steps flagged outside the bounds are measured again with 10000 draws of x_t (``recheck``).
Writes benchmarks/results/entropy_bounds_NAME.json and .png.
"""

import argparse
import datetime
import shutil
from pathlib import Path

import torch

from record import RESULTS, thermodiff_json, write_result  # a sibling module: benchmarks/ is on sys.path when run

#: experiment -> the training command's arguments after ``thermodiff train`` (and before --out)
TRAINING = {"swissroll": ["swissroll"], "heartbeat": ["heartbeat", "--steps", "2000"]}
#: draws of x_t (the test split repeated) with which the flagged steps are measured again
RECHECK_DRAWS = 10000
EVALUATED = ("split", "n_examples", "n_test", "estimator", "n_draws", "T", "diffusion", "parameterization", "decoder",
             "schedule", "beta_1", "unit", "dim", "K_bits", "stderr_bits", "hardware")


def recheck(run_dir: Path, steps: list[int], seed: int = 1) -> dict:
    """The flagged ``steps`` measured again with :data:`RECHECK_DRAWS` draws of x_t (the test split
    repeated), to tell a kernel that leaves the bounds from a chance flag among many steps."""
    from thermodiff.run.experiment import load_run
    from thermodiff.tasks.entropy import entropy_report

    run = load_run(run_dir, split=True)
    x = run.dataset.to_model(run.dataset.test)
    x = x.repeat(-(-RECHECK_DRAWS // len(x)), *[1] * (x.ndim - 1))[:RECHECK_DRAWS]
    return entropy_report(run.diffusion, run.model, x, steps, run.config.eval.batch_size,
                          torch.Generator().manual_seed(seed), examples=RECHECK_DRAWS)


def measure(name: str, out_dir: Path) -> dict:
    """Train, evaluate and draw one experiment; its record."""
    from thermodiff.tasks.plotting import bound_terms

    run = out_dir / name
    train = thermodiff_json(["train", *TRAINING[name], "--out", str(run), "--overwrite"])
    evaluation = thermodiff_json(["evaluate", str(run)])
    figure = bound_terms(evaluation, RESULTS / f"entropy_bounds_{name}.png")
    e = evaluation["entropy"]
    print(f"{name:10} T = {evaluation['T']:4d}: {e['n_outside']} of {e['n_steps']} steps outside the bounds "
          f"({e['n_above']} above, {e['n_below']} below), largest excursion {e['largest_excursion_bits']:+.4g} bits "
          f"at t = {e['largest_excursion_t']}; bounds crossed at {e['n_bounds_crossed']} steps", flush=True)
    again = recheck(run, [s["t"] for s in e["per_step"] if s["outside"]]) if e["n_outside"] else None
    if again:
        print(f"{'':10} the {again['n_steps']} flagged steps again with {again['n_examples']} draws: "
              f"{again['n_outside']} outside", flush=True)
    return {
        "command": f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/entropy_bounds.py --only {name}",
        "steps": [f"thermodiff train {' '.join(TRAINING[name])} --out RUN", "thermodiff evaluate RUN"],
        "date": datetime.date.today().isoformat(),
        "train": {k: train[k] for k in ("steps", "wall_s", "device")},
        "evaluation": {k: evaluation[k] for k in EVALUATED},
        "entropy": e,
        "recheck": again,
        "figure": figure.name,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="runs/entropy_bounds", help="where the runs are trained (replaced)")
    parser.add_argument("--only", choices=sorted(TRAINING), help="one experiment (default: all)")
    parser.add_argument("--keep-runs", action="store_true", help="keep the trained runs")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    for name in [args.only] if args.only else list(TRAINING):
        print(f"-> {write_result(f'entropy_bounds_{name}', measure(name, out_dir))}")
        if not args.keep_runs:
            shutil.rmtree(out_dir / name)


if __name__ == "__main__":
    main()
