"""The known-likelihood battery: how close `thermodiff train vectors --data X` with no other flag
gets to the exact log-likelihood of data sets whose density is known (thermodiff.data.known_densities).

For each case: draw a training set and a separate test set, train with the defaults as a new
user would (`thermodiff train vectors --data train.npy`), evaluate the exact bound on the test
set (`thermodiff evaluate RUN --data test.npy --exact --per-example K.npy`), and compare K with
the exact log-likelihood of the same test examples: the gap (exact - K, bits per example; K is
a lower bound, so the gap is positive up to noise) with its paired standard error.

    python benchmarks/known_likelihood.py                    # every case, one after the other
    python benchmarks/known_likelihood.py --cases ring_2d gauss_10d

Each case's record is written to benchmarks/results/known_likelihood.json as soon as it is done
(a stopped battery keeps what it measured); runs and data go to runs/known_likelihood/.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from record import RESULTS, cited, machine
from thermodiff.run.checkpoint import atomic_write_text
from thermodiff.data.known_densities import BATTERY, by_name, make_split
from thermodiff.process.tensors import LN2

GOAL_BITS = 0.1


def thermodiff(*argv: str) -> dict:
    """One `thermodiff` command in a fresh process (its own threads, as a user runs it), its JSON."""
    done = subprocess.run([sys.executable, "-m", "thermodiff", *argv, "--json", "--quiet"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"thermodiff {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def run_case(name: str, out: Path, n_train: int, n_test: int, seed: int, extra: list[str]) -> dict:
    case = by_name(name)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    train, test = make_split(case, n_train, n_test, seed)
    np.save(folder / "train.npy", train)
    np.save(folder / "test.npy", test)
    exact = case.log_prob(test) / LN2
    start = time.perf_counter()
    trained = thermodiff("train", "vectors", "--data", str(folder / "train.npy"), "--out", str(folder / "run"),
                         "--overwrite", *extra)
    train_wall = time.perf_counter() - start
    start = time.perf_counter()
    evaluation = thermodiff("evaluate", str(folder / "run"), "--data", str(folder / "test.npy"), "--exact",
                            "--per-example", str(folder / "K.npy"), "--overwrite")
    eval_wall = time.perf_counter() - start
    k = np.load(folder / "K.npy")
    gap = exact - k
    return {
        "case": name, "kind": case.kind, "dim": case.dim, "description": case.description,
        "n_train_given": n_train, "n_test": n_test, "seed": seed,
        "exact_bits": float(exact.mean()), "exact_stderr_bits": float(exact.std(ddof=1) / math.sqrt(len(exact))),
        "K_bits": float(k.mean()), "K_bits_reported": evaluation["K_original_units_bits"],
        "gap_bits": float(gap.mean()), "gap_stderr_bits": float(gap.std(ddof=1) / math.sqrt(len(gap))),
        "within_goal": bool(gap.mean() <= GOAL_BITS),
        "train_minutes": round(train_wall / 60, 2), "train_steps": trained["steps"], "steps_per_s": trained["steps_per_s"],
        "best": trained["best"], "checkpoint_evaluated": evaluation["checkpoint"],
        "auto_choices": trained["auto_choices"], "estimator": evaluation["estimator"], "T": evaluation["T"],
        "n_draws": evaluation["n_draws"], "parameterization": evaluation["parameterization"],
        "eval_minutes": round(eval_wall / 60, 2), "extra_flags": extra,
        "command": f"thermodiff train vectors --data train.npy {' '.join(extra)}".strip()
                   + "; thermodiff evaluate RUN --data test.npy --exact",
        "machine": machine(),
    }


def diagnose_case(name: str, out: Path, result: dict, examples: int = 5000) -> dict:
    """Where a gap comes from: the same bound and gap on up to ``examples`` of the run's own
    training examples. A gap much smaller there than on the test set is the network's
    generalisation from N examples, not its fit, the resolution beta_1 or T."""
    from thermodiff.run.experiment import load_run

    case, folder = by_name(name), out / name
    train = load_run(folder / "run").dataset.train[:examples]
    np.save(folder / "train_subset.npy", train)
    thermodiff("evaluate", str(folder / "run"), "--data", str(folder / "train_subset.npy"), "--exact",
               "--per-example", str(folder / "K_train.npy"), "--overwrite")
    gap = case.log_prob(train) / LN2 - np.load(folder / "K_train.npy")
    return result | {"gap_on_training_examples_bits": float(gap.mean()),
                     "gap_on_training_examples_stderr_bits": float(gap.std(ddof=1) / math.sqrt(len(gap))),
                     "n_training_examples_scored": len(gap)}


def summary(cases: dict) -> dict:
    """How many cases met the goal, and the largest gap of those that did not."""
    missed = {name: r["gap_bits"] for name, r in cases.items() if not r["within_goal"]}
    return {"cases": len(cases), "within_goal": len(cases) - len(missed), "missed": sorted(missed),
            "largest_gap_bits": max(r["gap_bits"] for r in cases.values()),
            "median_gap_bits": float(np.median([r["gap_bits"] for r in cases.values()]))}


def markdown_table(record: dict, name: str) -> str:
    """The results of benchmarks/results/NAME.json as a Markdown table for docs/, one row per case
    in the battery's order, each figure a link to its place in the record."""
    order = [c.name for c in BATTERY]
    rows = ["| case | kind, D | exact log-likelihood | K (defaults) | gap exact - K | training |",
            "|---|---|---|---|---|---|"]
    for case in sorted(record["cases"], key=order.index):
        r = record["cases"][case]

        def figure(fmt: str, *keys: str) -> str:
            return cited(fmt.format(*(r[k] for k in keys)), name, *(f"cases.{case}.{k}" for k in keys))

        mark = "" if r["within_goal"] else " (missed)"
        rows.append(f"| `{case}`: `{r['description']}` | {r['kind']}, {r['dim']} | {figure('{:.3f}', 'exact_bits')} | "
                    f"{figure('{:.3f}', 'K_bits')} | **{figure('{:.3f} ± {:.3f}', 'gap_bits', 'gap_stderr_bits')}**{mark} | "
                    f"{figure('{:.1f}', 'train_minutes')} min, {figure('{}', 'train_steps')} steps |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=[c.name for c in BATTERY], metavar="NAME")
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-test", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/known_likelihood")
    parser.add_argument("--name", default="known_likelihood", help="results file benchmarks/results/NAME.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every case (the battery's figures use none)")
    parser.add_argument("--table", action="store_true", help="print the results file as a Markdown table and stop")
    parser.add_argument("--diagnose", action="store_true",
                        help="no training: add the gap on the runs' own training examples to the cases' records")
    args = parser.parse_args()
    path = RESULTS / f"{args.name}.json"
    if args.table:
        print(markdown_table(json.loads(path.read_text()), args.name))
        return
    for name in args.cases:
        by_name(name)  # unknown names fail before any work
    extra = [flag for item in args.set for flag in ("--set", item)]
    record = json.loads(path.read_text()) if path.exists() else {"cases": {}}
    record["about"] = __doc__.split("\n\n")[0]
    for name in args.cases:
        if args.diagnose:
            record["cases"][name] = diagnose_case(name, Path(args.out), record["cases"][name])
            atomic_write_text(path, json.dumps(record, indent=2) + "\n")
            print(name, "gap on training examples", record["cases"][name]["gap_on_training_examples_bits"], flush=True)
            continue
        result = run_case(name, Path(args.out), args.n_train, args.n_test, args.seed, extra)
        record["cases"][name] = result
        record["summary"] = summary(record["cases"])
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")  # after every case: a stop loses nothing
        print(f"{name:22} exact {result['exact_bits']:9.3f}  K {result['K_bits']:9.3f}  gap {result['gap_bits']:7.3f} "
              f"+- {result['gap_stderr_bits']:.3f} bits  ({result['train_minutes']:.1f} min, {result['train_steps']} steps)",
              flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
