"""Posterior sampling on the toy experiments (issue: posteriors by multiplying distributions).

    python benchmarks/posterior.py heartbeat RUN_DIR [--observed 8] [--sequences 500] [--samples 4]

Heartbeat completion: held-out sequences with their first ``observed`` bins known, the rest
sampled; a completion is right when its spikes are exactly those of the period-5 pattern with
the observed phase. Both ways of fixing known bins are measured side by side: held at their
values at every step (the paper's clamp) and following a forward trajectory to them. Writes
benchmarks/results/posterior_heartbeat.json.
"""

import argparse
import json
import time

import numpy as np

from record import write_result  # a sibling module: benchmarks/ is on sys.path when run
from thermodiff.run.experiment import load_run
from thermodiff.tasks.conditioning import inpaint


def heartbeat_completion(run_dir: str, observed: int, sequences: int, samples: int, seed: int) -> dict:
    run = load_run(run_dir)
    test = run.dataset.test[:sequences]
    phase = test[:, :5].argmax(1)  # the bin of the first spike
    mask = np.zeros_like(test, dtype=bool)
    mask[:, :observed] = True
    result = {}
    for known in ("clamp", "forward"):
        start = time.perf_counter()
        completions = inpaint(run, test, mask, samples, seed, progress=False, known=known)
        right = (completions == test[None]).all(-1)  # the whole sequence continues the observed phase
        result[known] = {"fraction_right": float(right.mean()),
                         "stderr": float(right.std(ddof=1) / np.sqrt(right.size)),
                         "completions": int(right.size), "seconds": round(time.perf_counter() - start, 2)}
    result["phases_observed"] = np.bincount(phase, minlength=5).tolist()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["heartbeat"])
    parser.add_argument("run_dir")
    parser.add_argument("--observed", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=500)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    record = {
        "command": "python benchmarks/posterior.py " + " ".join(
            [args.experiment, args.run_dir, f"--observed {args.observed}", f"--sequences {args.sequences}",
             f"--samples {args.samples}", f"--seed {args.seed}"]),
        "setup": f"held-out sequences (the run's test split), first {args.observed} of 20 bins known, "
                 f"{args.samples} completions each; right = identical to the true sequence",
        "heartbeat": heartbeat_completion(args.run_dir, args.observed, args.sequences, args.samples, args.seed),
    }
    write_result("posterior_heartbeat", record)
    print(json.dumps(record["heartbeat"], indent=2))
