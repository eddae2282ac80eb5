"""The exact log-likelihood through the probability-flow ODE (`thermodiff evaluate RUN --ode`) next
to the bound K, on the same test examples:

    python benchmarks/ode_likelihood.py swissroll --steps 8000      # trains runs/ode/swissroll (the 3-minute config)
    python benchmarks/ode_likelihood.py battery [--cases ring_2d gauss_10d] [--minutes 3] [--jobs 2]
    python benchmarks/ode_likelihood.py battery --table                   # the Markdown table of docs/ode.md
    python benchmarks/ode_likelihood.py cifar10 --run RUN --examples 8   # a trained CIFAR-10 run (copied, read only)

Each writes benchmarks/results/ode_NAME.json. Swiss roll and battery cases of D <= 3: the exact
trace; larger battery cases and CIFAR-10: Hutchinson's. Binary battery cases are binomial
diffusion, which has no ODE: the battery skips them. Run with OMP_NUM_THREADS=1 on a shared
machine; `--jobs 2` runs two battery cases at once, one per core.
"""

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from record import RESULTS, cited, thermodiff_json, write_result
from thermodiff.data.known_densities import BATTERY, by_name, make_split
from thermodiff.process.tensors import LN2

#: Battery cases of at most this many dimensions get the exact trace by default, larger ones Hutchinson's.
EXACT_TRACE_DIM = 3

#: What each record keeps of an evaluation: K and the ODE figures, how they were measured.
KEPT = ("experiment", "split", "n_examples", "n_test", "estimator", "T", "diffusion", "parameterization", "decoder",
        "schedule", "beta_1", "train_steps", "checkpoint", "unit", "dim", "K_bits", "stderr_bits", "K_original_units_bits",
        "K_bits_per_pixel", "stderr_bits_per_pixel", "nll_bits_per_dim", "nll_stderr_bits_per_dim", "nll_bound",
        "hardware")


def kept(evaluation: dict) -> dict:
    return {k: evaluation[k] for k in (*KEPT, *(k for k in evaluation if k.startswith("ode_"))) if k in evaluation}


def timed(argv: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    result = thermodiff_json(argv)
    return result, time.perf_counter() - start


def ode_flags(args, exact_trace: bool) -> list[str]:
    return ["--ode", "--ode-rtol", str(args.rtol), "--ode-atol", str(args.atol),
            *(["--ode-exact-trace"] if exact_trace else [])]


def swissroll(args) -> dict:
    run = Path(args.out) / "swissroll"
    train, train_wall = timed(["train", "swissroll", "--out", str(run), "--steps", str(args.steps), "--overwrite"])
    evaluation, eval_wall = timed(["evaluate", str(run), *ode_flags(args, args.exact_trace)])
    return {"train": {"steps": train["steps"], "wall_s": train_wall}, "evaluation": kept(evaluation),
            "eval_wall_s": eval_wall,
            "command": f"thermodiff train swissroll --out RUN --steps {args.steps}; thermodiff evaluate RUN "
                       + " ".join(ode_flags(args, args.exact_trace))}


def battery_case(name: str, args) -> dict:
    """One known-likelihood case as benchmarks/known_likelihood.py trains it (`train vectors` with the
    defaults), with K and the ODE on the same test examples next to the exact log-likelihood."""
    case, folder = by_name(name), Path(args.out) / "battery" / name
    folder.mkdir(parents=True, exist_ok=True)
    train, test = make_split(case, args.n_train, args.n_test, args.seed)
    np.save(folder / "train.npy", train)
    np.save(folder / "test.npy", test)
    train_wall = None  # --reuse: the run trained before, with the same command
    budget = ([] if args.minutes is None else ["--minutes", str(args.minutes)]) + ["--set", "train.clock=cpu"]
    if not (args.reuse and (folder / "run" / "checkpoint.safetensors").exists()):  # none: the defaults' own minutes
        _, train_wall = timed(["train", "vectors", "--data", str(folder / "train.npy"), "--out", str(folder / "run"),
                               "--overwrite", *budget])
    exact_trace = case.dim <= EXACT_TRACE_DIM if args.exact_trace is None else args.exact_trace
    evaluation, eval_wall = timed(["evaluate", str(folder / "run"), "--data", str(folder / "test.npy"), "--exact",
                                   "--per-example", str(folder / "K.npy"), "--overwrite", *ode_flags(args, exact_trace)])
    exact = case.log_prob(test) / LN2
    gaps = {"K": exact - np.load(folder / "K.npy"), "ode": exact - np.load(evaluation["ode_per_example_file"])}
    return {"case": name, "kind": case.kind, "dim": case.dim, "description": case.description,
            "n_train": args.n_train, "n_test": args.n_test, "seed": args.seed,
            "exact_bits": float(exact.mean()), "exact_stderr_bits": float(exact.std(ddof=1) / math.sqrt(len(exact))),
            **{f"{what}_gap_bits": float(g.mean()) for what, g in gaps.items()},
            **{f"{what}_gap_stderr_bits": float(g.std(ddof=1) / math.sqrt(len(g))) for what, g in gaps.items()},
            "train_wall_s": train_wall, "eval_wall_s": eval_wall,
            "evaluation": kept(evaluation),
            "command": f"thermodiff train vectors --data train.npy --out RUN {' '.join(budget)}; thermodiff evaluate RUN "
                       f"--data test.npy --exact {' '.join(ode_flags(args, exact_trace))}"}


def battery(args) -> dict:
    """The cases, ``args.jobs`` at a time in worker processes, each written to the record by this
    process as soon as it is done (a stopped battery keeps them; one writer, so no case is lost)."""
    path = RESULTS / "ode_battery.json"
    record = json.loads(path.read_text()) if path.exists() else {"cases": {}}
    record.pop("machine", None)  # this run's machine, as write_result measures it, not an earlier run's
    binary = [name for name in args.cases if by_name(name).kind == "binary"]
    if binary:
        print(f"skipping {', '.join(binary)}: binary data get binomial diffusion, which has no probability-flow ODE")
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        running = [pool.submit(battery_case, name, args) for name in args.cases if name not in binary]
        for done in concurrent.futures.as_completed(running):
            case = done.result()
            record["cases"][case["case"]] = case
            write_result("ode_battery", record)
    return record


def battery_table(record: dict) -> str:
    """The battery's record as docs/ode.md's Markdown table, in the battery's order, every figure
    a link to its place in benchmarks/results/ode_battery.json."""
    order = [c.name for c in BATTERY]
    rows = ["| case | D | exact | K | ODE | gap exact - K | gap exact - ODE | trace, evaluations | training steps |",
            "|---|---|---|---|---|---|---|---|---|"]
    for case in sorted(record["cases"], key=order.index):
        r = record["cases"][case]

        def figure(fmt: str, *keys: str) -> str:
            values = [r["evaluation"][k[len("evaluation."):]] if k.startswith("evaluation.") else r[k] for k in keys]
            return cited(fmt.format(*values), "ode_battery", *(f"cases.{case}.{k}" for k in keys))

        rows.append(f"| `{case}` ({r['kind']}) | {r['dim']} | {figure('{:.3f}', 'exact_bits')} | "
                    f"{figure('{:.3f}', 'evaluation.K_original_units_bits')} | "
                    f"{figure('{:.3f}', 'evaluation.ode_log_likelihood_original_units_bits')} | "
                    f"{figure('{:.3f} ± {:.3f}', 'K_gap_bits', 'K_gap_stderr_bits')} | "
                    f"{figure('{:.3f} ± {:.3f}', 'ode_gap_bits', 'ode_gap_stderr_bits')} | "
                    f"{r['evaluation']['ode_trace']}, {figure('{}', 'evaluation.ode_nfe')} | "
                    f"{figure('{}', 'evaluation.train_steps')} |")
    return "\n".join(rows)


def cifar10(args) -> dict:
    run = Path(args.out) / "cifar10"
    shutil.copytree(args.run, run, dirs_exist_ok=True, ignore=shutil.ignore_patterns("evaluation.json"))
    evaluation, eval_wall = timed(["evaluate", str(run), "--max-examples", str(args.examples), "--per-example",
                                   str(run / "K.npy"), "--overwrite", *ode_flags(args, args.exact_trace)])
    # the ODE's NLL minus the bound's, image by image (both in original units, bits per image)
    paired = (np.load(run / "K.npy") - np.load(evaluation["ode_per_example_file"])) / evaluation["dim"]
    return {"source_run": str(args.run), "evaluation": kept(evaluation), "eval_wall_s": eval_wall,
            "ode_minus_bound_nll_bits_per_dim": float(paired.mean()),
            "ode_minus_bound_nll_stderr_bits_per_dim": float(paired.std(ddof=1) / math.sqrt(len(paired))),
            "command": f"thermodiff evaluate RUN --max-examples {args.examples} --per-example K.npy "
                       f"{' '.join(ode_flags(args, args.exact_trace))}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["swissroll", "battery", "cifar10"])
    parser.add_argument("--steps", type=int, default=8000, help="swissroll: training steps")
    parser.add_argument("--cases", nargs="+", default=[c.name for c in BATTERY],
                        help="battery cases (default: all; the binary ones are skipped)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="battery: training minutes per case, of the process's CPU time (train.clock = cpu; "
                             "default: the budget the defaults choose, as benchmarks/known_likelihood.py trains)")
    parser.add_argument("--jobs", type=int, default=1, help="battery: cases run at once (one per core)")
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", help="cifar10: the trained run (copied into --out)")
    parser.add_argument("--examples", type=int, default=8, help="cifar10: the first N test images")
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--exact-trace", action=argparse.BooleanOptionalAction, default=None,
                        help=f"the exact trace (default: for swissroll, and battery cases of D <= {EXACT_TRACE_DIM})")
    parser.add_argument("--reuse", action="store_true", help="battery: evaluate a case's run trained before (no training)")
    parser.add_argument("--out", default="runs/ode")
    parser.add_argument("--table", action="store_true", help="battery: print the record as a Markdown table and stop")
    args = parser.parse_args()
    if args.table:
        print(battery_table(json.loads((RESULTS / "ode_battery.json").read_text())))
        return
    if args.exact_trace is None and args.experiment != "battery":
        args.exact_trace = args.experiment == "swissroll"
    start = time.perf_counter()
    record = {"swissroll": swissroll, "battery": battery, "cifar10": cifar10}[args.experiment](args)
    record |= {"about": __doc__.split("\n\n")[0], "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "solver": {"rtol": args.rtol, "atol": args.atol, "exact_trace": args.exact_trace},
               "wall_s": time.perf_counter() - start}
    print(write_result(f"ode_{args.experiment}", record))  # the battery's: once more, with the totals


if __name__ == "__main__":
    main()
