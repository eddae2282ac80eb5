"""Training throughput of `thermodiff train vectors`' default networks on one and on two CPU threads,
measured side by side (alternating repeats, each in a fresh process), so that the default can use
what is faster on a 2-core machine.

    python benchmarks/vector_threads.py [--cases gauss_10d bernoulli_mix_64d] [--repeats 5] [--seconds 10]

Each case's training data come from thermodiff.data.known_densities; the config is `vectors` with every
"auto" decided as `train vectors` decides it; a step is the training loop's (training.train_step).
Writes benchmarks/results/vector_threads.json.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from record import machine, write_result

STEPS = '''
import json, sys, time, torch
import numpy as np
from thermodiff.run.config import load_config
from thermodiff.run.experiment import assemble
from thermodiff.run.training import TrainState, draw_batch, train_step
torch.set_num_threads(int(sys.argv[2]))
cfg = load_config("vectors", ["data.source=" + json.dumps(sys.argv[1])])
parts = assemble(cfg)
state = TrainState.start(parts.model, parts.diffusion, cfg.train, cfg.seed)
def step():
    train_step(state, draw_batch(state, parts.dataset, cfg.train.batch_size, torch.device("cpu")), cfg.train)
for _ in range(20):
    step()
start, n = time.perf_counter(), 0
while time.perf_counter() - start < float(sys.argv[3]):
    step(); n += 1
print(json.dumps({"steps_per_s": n / (time.perf_counter() - start), "batch_size": cfg.train.batch_size,
                  "hidden": cfg.model.hidden, "layers": cfg.model.layers, "kind": parts.kind}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["gauss_10d", "bernoulli_mix_64d"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    import numpy as np

    from thermodiff.data.known_densities import by_name, make_split

    record = {"command": "python benchmarks/vector_threads.py " + " ".join(sys.argv[1:]), "cases": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.cases:
            path = Path(folder) / f"{name}.npy"
            np.save(path, make_split(by_name(name), 20000, 10, 0)[0])
            runs = {1: [], 2: []}
            for _ in range(args.repeats):
                for threads in (1, 2):  # alternating: the machine's load falls on both alike
                    out = subprocess.run([sys.executable, "-c", STEPS, str(path), str(threads), str(args.seconds)],
                                         capture_output=True, text=True, check=True).stdout
                    runs[threads].append(json.loads(out))
            medians = {t: statistics.median(r["steps_per_s"] for r in runs[t]) for t in runs}
            record["cases"][name] = {"network": {k: runs[1][0][k] for k in ("kind", "hidden", "layers", "batch_size")},
                                     "steps_per_s": {str(t): [round(r["steps_per_s"], 2) for r in runs[t]] for t in runs},
                                     "median_steps_per_s": {str(t): round(m, 2) for t, m in medians.items()},
                                     "two_over_one": round(medians[2] / medians[1], 3)}
            print(name, record["cases"][name]["median_steps_per_s"], record["cases"][name]["two_over_one"], flush=True)
    write_result("vector_threads", record | {"machine": machine()})


if __name__ == "__main__":
    main()
