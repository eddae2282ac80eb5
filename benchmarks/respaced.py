"""Fast sampling on trained image runs: the exact bound of the chain respaced to T, T/4 and T/10
steps, and the sampling speed on each, through the CLI as a user runs it.

    OMP_NUM_THREADS=1 python benchmarks/respaced.py RUN [RUN ...] [--max-examples 50] [--samples 8]

For every run: ``thermodiff evaluate RUN --respace N`` (all N - 1 KL terms, prior and decoder of
the respaced chain, on the first --max-examples test images, one noise draw per term) and
``thermodiff sample RUN --respace N -n S`` timed. Writes benchmarks/results/respaced_<name>.json
(name: --name, or the first run's experiment).
"""

import argparse
import datetime
import tempfile
from pathlib import Path

import torch

from record import thermodiff_json, write_result  # a sibling module: benchmarks/ is on sys.path when run

REPORTED = ("K_bits_per_pixel", "stderr_bits_per_pixel", "K_minus_L_null_bits_per_pixel", "nll_bits_per_dim")


def measure_run(run: str, max_examples: int, n_samples: int, seed: int) -> dict:
    """The bound and the images/s at T, T/4 and T/10 steps for one run."""
    common = ["--max-examples", str(max_examples), "--eval-seed", str(seed)]
    full = thermodiff_json(["evaluate", run, *common])
    T, chains = full["T"], []
    for steps in (T, max(2, T // 4), max(2, T // 10)):
        e = full if steps == T else thermodiff_json(["evaluate", run, "--respace", str(steps), *common])
        with tempfile.TemporaryDirectory() as tmp:
            s = thermodiff_json(["sample", run, "--respace", str(steps), "-n", str(n_samples), "--seed", str(seed),
                                 "--out", str(Path(tmp) / "s.npy")])
        chains.append({"steps": steps, **{k: e[k] for k in REPORTED},
                       "sample_wall_s": s["sample_wall_s"], "images_per_s": round(n_samples / s["sample_wall_s"], 4)})
        chains[-1]["speed_up"] = round(chains[-1]["images_per_s"] / chains[0]["images_per_s"], 2)
        print(f"{full['experiment']:24} {steps:5d} steps  K = {e['K_bits_per_pixel']:.3f} +- {e['stderr_bits_per_pixel']:.3f}"
              f" bits/pixel  {chains[-1]['images_per_s']:.3f} images/s", flush=True)
    return {"run": run, "experiment": full["experiment"], "parameterization": full["parameterization"],
            "train_loss": full["train_loss"], "train_steps": full["train_steps"], "T": T, "chains": chains}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--max-examples", type=int, default=50)
    parser.add_argument("--samples", type=int, default=8, help="images drawn to time sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="results file: respaced_NAME.json")
    args = parser.parse_args()
    records = [measure_run(run, args.max_examples, args.samples, args.seed) for run in args.runs]
    name = args.name or records[0]["experiment"]
    record = {
        "command": f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/respaced.py {' '.join(args.runs)} "
                   f"--max-examples {args.max_examples} --samples {args.samples} --seed {args.seed}"
                   + (f" --name {args.name}" if args.name else ""),
        "date": datetime.date.today().isoformat(),
        "evaluation": {"split": "test, first --max-examples images", "n_examples": args.max_examples, "n_draws": 1,
                       "bound": "exact bound of the (respaced) chain: all KL terms, prior and decoder, float64",
                       "respacing": "evenly spaced steps including 1 and T, kernels by the moments rule",
                       "n_samples_timed": args.samples, "speed_up": "images_per_s relative to the T-step chain"},
        "runs": records,
    }
    print(f"-> {write_result(f'respaced_{name}', record)}")


if __name__ == "__main__":
    main()
