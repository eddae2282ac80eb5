"""CIFAR-10 recipes at equal CPU time, side by side: every config of configs/recipes_cifar10 (or those
named) trains in its own process on one thread, all at once, each for the same number of CPU minutes
(train.clock = "cpu", so the runs do equal work however busy the machine is), then each is scored
with `thermodiff evaluate` on the same first test images; the record pairs every run with the
yardstick (improved-diffusion's recipe) and with the image default, image by image.

    python benchmarks/recipes.py --data-dir DIR [--cpu-minutes 60] [--examples 200] [--out runs/recipes]
                                 [--t-sampling uniform|importance]

Rerunning the same command continues the runs (`train --resume`) that a stop cut short; a run that
has its budget is not trained again. Writes benchmarks/results/recipes_cifar10_<M>cpumin.json
(recipes_cifar10_<M>cpumin_importance.json for the bound's importance-sampled estimate).
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
import torch

from budget import training_curve  # sibling modules: benchmarks/ is on sys.path when run
from record import RESULTS, write_result
from thermodiff.process.bound import standard_error
from thermodiff.run.checkpoint import atomic_write_text
from thermodiff.run.training import read_metrics

CONFIGS = Path(__file__).resolve().parent.parent / "src" / "thermodiff" / "configs" / "recipes_cifar10"
#: the runs every other is paired with, by the record key of the pairing
REFERENCES = {"paired_vs_yardstick": "improved_diffusion", "paired_vs_eps_simple": "eps_simple"}
ONE_THREAD = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def thermodiff(*args: str) -> list[str]:
    return [sys.executable, "-m", "thermodiff", *args]


def train_all(configs: list[Path], out: Path, data_dir: str, minutes: float) -> dict[str, str]:
    """Train (or continue) every config at once, one thread each; returns each run's command."""
    commands, processes = {}, []
    for config in configs:
        run = out / config.stem
        args = ["train", str(config), "--out", str(run), "--minutes", str(minutes), "--quiet"]
        commands[config.stem] = "OMP_NUM_THREADS=1 thermodiff " + " ".join([*args, "--data-dir", data_dir])
        if not (run / "checkpoint.safetensors").exists():
            args += ["--data-dir", data_dir, "--overwrite"]
        elif read_metrics(run)[-1]["elapsed_s"] < 60 * minutes:
            args.append("--resume")  # the run continues from its own config
        else:
            continue  # it has its budget
        processes.append(subprocess.Popen(thermodiff(*args), env=ONE_THREAD))
    if any(p.wait() for p in processes):
        raise SystemExit("a training run failed; rerun this command to continue the others")
    return commands


def per_example_path(out: Path, name: str, t_sampling: str) -> Path:
    return out / name / f"K_per_example_{t_sampling}.npy"


def evaluate_all(names: list[str], out: Path, examples: int, t_sampling: str) -> dict[str, dict]:
    """`thermodiff evaluate` of every run at once, one thread each, on the first ``examples`` test
    images (its steps drawn as ``t_sampling`` says), with the bound of each image kept for the pairing.
    Each evaluation is kept beside its run, so a run whose checkpoint it has scored since the
    checkpoint was written is not scored again (a stop loses no finished evaluation)."""
    processes, results = {}, {}
    for name in names:
        kept = out / name / f"recipes_evaluation_{t_sampling}_{examples}.json"
        per_example = per_example_path(out, name, t_sampling)
        if kept.exists() and per_example.exists() and \
                kept.stat().st_mtime > (out / name / "checkpoint.safetensors").stat().st_mtime:
            results[name] = json.loads(kept.read_text())
            continue
        per_example.unlink(missing_ok=True)
        processes[name] = (kept, subprocess.Popen(
            thermodiff("evaluate", str(out / name), "--max-examples", str(examples), "--per-example", str(per_example),
                       "--t-sampling", t_sampling, "--json", "--quiet"),
            env=ONE_THREAD, stdout=subprocess.PIPE, text=True))
    for name, (kept, process) in processes.items():
        stdout = process.communicate()[0]
        if process.returncode:
            raise SystemExit(f"the evaluation of {out / name} failed; rerun this command to score the runs "
                             "not yet scored")
        results[name] = json.loads(stdout)
        atomic_write_text(kept, stdout)
    return results


def nll_per_image(out: Path, name: str, dim: int, t_sampling: str) -> torch.Tensor:
    """The 8-bit NLL bound of each image in bits/dim: -K in original units over the dimensions."""
    return torch.from_numpy(-np.load(per_example_path(out, name, t_sampling)) / dim)


#: DDPM's 8-bit NLL on CIFAR-10 (Ho et al. 2020, Table 2), the figure the runs are extrapolated to
DDPM_NLL = 3.70


def record_suffix(t_sampling: str) -> str:
    return "_importance" if t_sampling == "importance" else ""


def rungs(name: str, cpu_minutes: float, nll: float, stderr: float, t_sampling: str) -> dict:
    """The run's test NLL at every budget recorded (this one and the records of the others with the
    same estimator, recipes_cifar10_<M>cpumin[_importance].json: the same runs continued, the same
    images), and, from the last two, the NLL's fall per doubling of CPU time and the CPU minutes at
    which it would reach DDPM's 3.70 if it kept falling at that rate: an extrapolation, labelled as
    one (a log-linear curve; training curves bend over, so it is optimistic)."""
    measured = {cpu_minutes: (nll, stderr)}
    for path in RESULTS.glob(f"recipes_cifar10_*cpumin{record_suffix(t_sampling)}.json"):
        record = json.loads(path.read_text())
        measured.setdefault(record["cpu_minutes"], next(((r["nll_bits_per_dim"], r["nll_stderr_bits_per_dim"])
                                                         for r in record["rows"] if r["name"] == name), None))
    points = sorted((c, v) for c, v in measured.items() if v is not None)
    out = {"nll_bits_per_dim_by_cpu_minutes": [{"cpu_minutes": c, "nll_bits_per_dim": v[0], "stderr_bits_per_dim": v[1]}
                                               for c, v in points]}
    if len(points) >= 2:
        (c1, (n1, _)), (c2, (n2, _)) = points[-2:]
        fall = (n1 - n2) / math.log2(c2 / c1)
        out["extrapolation"] = {
            "label": "extrapolation, not a measurement", "fall_per_doubling_bits_per_dim": fall,
            "target_nll_bits_per_dim": DDPM_NLL,
            "cpu_minutes_to_target": c2 * 2 ** ((n2 - DDPM_NLL) / fall) if fall > 0 and n2 > DDPM_NLL else None}
    return out


def row(name: str, out: Path, evaluation: dict, references: dict[str, torch.Tensor], command: str,
        cpu_minutes: float, t_sampling: str) -> dict:
    metrics = read_metrics(out / name)
    nll = nll_per_image(out, name, evaluation["dim"], t_sampling)
    r = {"name": name, "config": f"configs/recipes_cifar10/{name}.toml", "train_command": command,
         "steps": evaluation["train_steps"], "train_cpu_s": metrics[-1]["elapsed_s"],
         "images_seen": evaluation["train_steps"] * 64, "evaluation": evaluation,
         "nll_bits_per_dim": float(nll.mean()), "nll_stderr_bits_per_dim": standard_error(nll),
         "curve": training_curve(out / name, evaluation["dim"] // 3)}  # per pixel: 3 colour channels
    r |= rungs(name, cpu_minutes, r["nll_bits_per_dim"], r["nll_stderr_bits_per_dim"], t_sampling)
    for key, reference in references.items():
        if REFERENCES[key] != name:
            diff = nll - reference  # below 0: this recipe's bound is tighter on the same images
            r[key] = {"nll_difference_bits_per_dim": float(diff.mean()), "stderr_bits_per_dim": standard_error(diff),
                      "images": diff.numel()}
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--cpu-minutes", type=float, default=60.0)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--configs", default=",".join(sorted(p.stem for p in CONFIGS.glob("*.toml"))))
    parser.add_argument("--out", default="runs/recipes")
    parser.add_argument("--t-sampling", choices=["uniform", "importance"], default="uniform",
                        help="how each image's bound estimate draws its 50 steps (thermodiff evaluate --t-sampling)")
    args = parser.parse_args()
    configs = [CONFIGS / f"{name}.toml" for name in args.configs.split(",")]
    out = Path(args.out)
    start, load_before = time.perf_counter(), os.getloadavg()
    commands = train_all(configs, out, args.data_dir, args.cpu_minutes)
    wall_train = time.perf_counter() - start
    names = [c.stem for c in configs]
    evaluations = evaluate_all(names, out, args.examples, args.t_sampling)
    references = {key: nll_per_image(out, name, evaluations[name]["dim"], args.t_sampling)
                  for key, name in REFERENCES.items() if name in names}
    record = {
        "command": " ".join(["python benchmarks/recipes.py", *sys.argv[1:]]),
        "protocol": (f"{len(names)} runs trained at once, one thread each, for {args.cpu_minutes:g} CPU minutes each "
                     f"(train.clock = cpu); each scored by thermodiff evaluate (its exact bound, t stratified, "
                     f"--t-sampling {args.t_sampling}, seed 0) "
                     f"on the first {args.examples} CIFAR-10 test images; nll_bits_per_dim is the 8-bit NLL bound "
                     "(discrete for the discretized decoder, of the uniformly dequantised density otherwise); "
                     "paired_vs_yardstick / paired_vs_eps_simple: the mean over the same images of this run's NLL "
                     "minus improved-diffusion's recipe's / the image default's"),
        "cpu_minutes": args.cpu_minutes, "wall_s_training": wall_train, "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rows": [row(n, out, evaluations[n], references, commands[n], args.cpu_minutes, args.t_sampling)
                 for n in names],
    }
    print(write_result(f"recipes_cifar10_{args.cpu_minutes:g}cpumin{record_suffix(args.t_sampling)}", record))


if __name__ == "__main__":
    main()
