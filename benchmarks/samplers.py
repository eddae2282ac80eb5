"""Sample quality at equal network calls: the ancestral sampler on respaced chains, DDIM (eta 0 and
1), Heun's method and DPM-Solver++(2M), against held-out data, by a kernel two-sample statistic.

    OMP_NUM_THREADS=1 python benchmarks/samplers.py RUN --name NAME [--data TEST.npy] [--calls 5,10,20,50,100]
    python benchmarks/samplers.py --name NAME --table median_over_16     # the Markdown tables of docs/samplers.md

For each sampler and each budget C of network calls per sample, the longest evenly respaced chain
(respace.evenly_spaced) whose sampler makes at most C calls (counted, not computed: a decoder that
is the forward step reversed calls no network). Statistic: the unbiased MMD^2 (Gretton et al. 2012,
Lemma 6) with the Gaussian kernel exp(-|x - y|^2 / (2 h^2)) in the model's (whitened) units, h the
median pairwise distance of the first 1000 held-out points (and h / 4, h / 16: finer), between --n samples
and --n held-out points, over --replicates independent replicates (their own samples and their own
disjoint held-out points): mean and standard error over replicates. The permutation null (two
held-out sets, pooled and re-split) gives the noise floor. The respaced ancestral chains' exact
bound (``thermodiff evaluate RUN --respace K --exact``) is reported next to them. Writes
benchmarks/results/samplers_NAME.json and .png.
"""

import argparse
import datetime
import json
import math
import sys
import time

import numpy as np
import torch

from record import RESULTS, cited, thermodiff_json, write_result  # a sibling module: benchmarks/ is on sys.path when run
from thermodiff.process.respace import evenly_spaced, respace
from thermodiff.process.samplers import CountingModel, karras_timesteps, sample
from thermodiff.run.experiment import load_run

# name -> (sampler, eta, the kept steps: evenly spaced or nearest Karras et al.'s levels)
SETTINGS = {"ancestral": ("ancestral", 0.0, "even"), "ddim_eta0": ("ddim", 0.0, "even"),
            "ddim_eta1": ("ddim", 1.0, "even"), "heun": ("heun", 0.0, "even"), "heun_karras": ("heun", 0.0, "karras"),
            "dpm2m": ("dpm2m", 0.0, "even"), "dpm2m_karras": ("dpm2m", 0.0, "karras")}
BANDWIDTH_FACTORS = {"median": 1.0, "median_over_4": 0.25, "median_over_16": 0.0625}


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0)


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, h: float) -> float:
    """The unbiased MMD^2 of samples x and y with the Gaussian kernel of bandwidth h (Gretton et al.
    2012, Lemma 6): the within-sample means leave out the diagonal."""
    k = lambda a, b: np.exp(-squared_distances(a, b) / (2 * h * h))  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def permutation_null(a: np.ndarray, b: np.ndarray, h: float, permutations: int, seed: int) -> dict:
    """MMD^2 of two held-out sets, and the mean and standard deviation of its permutation null."""
    pooled, rng = np.concatenate([a, b]), np.random.default_rng(seed)
    null = [mmd2_unbiased(*np.split(pooled[rng.permutation(len(pooled))], 2), h) for _ in range(permutations)]
    return {"held_out_vs_held_out": mmd2_unbiased(a, b, h), "null_mean": float(np.mean(null)),
            "null_sd": float(np.std(null, ddof=1)), "permutations": permutations}


def kept_steps(run, name: str, count: int) -> list[int]:
    """The ``count`` steps (fewer for Karras's, when two levels share a step) of setting ``name``."""
    if SETTINGS[name][2] == "karras":
        return karras_timesteps(run.diffusion.log_alphas_cumprod().detach(), count)
    return evenly_spaced(run.diffusion.T, count)


def draw(run, steps: list[int], name: str, n: int, seed: int) -> tuple[np.ndarray, int]:
    """n samples (model units) of setting ``name`` on the chain respaced to ``steps``, and the
    network calls each made."""
    sampler, eta, _ = SETTINGS[name]
    model = CountingModel(run.model)
    chain = respace(run.diffusion, steps)
    x = sample(chain, model, (n, *run.dataset.event_shape), torch.Generator().manual_seed(seed), sampler=sampler, eta=eta)
    return x.double().numpy(), model.calls


def steps_for(run, name: str, calls: int) -> list[int]:
    """The kept steps of the longest chain of setting ``name`` whose sampler makes at most ``calls``
    network calls per sample."""
    best = None
    for count in range(2, run.diffusion.T + 1):
        steps = kept_steps(run, name, count)
        if draw(run, steps, name, 1, 0)[1] > calls:
            break
        best = steps
    if best is None:
        raise SystemExit(f"{name}: no chain makes at most {calls} network calls")
    return best


def measure(run, held_out: np.ndarray, name: str, steps: list[int], n: int, replicates: int, bandwidths: dict) -> dict:
    values, calls, start = {b: [] for b in bandwidths}, None, time.perf_counter()
    for r in range(replicates):
        x, calls = draw(run, steps, name, n, seed=1000 + r)
        for b, h in bandwidths.items():
            values[b].append(mmd2_unbiased(x, held_out[r * n:(r + 1) * n], h))
    mmd = {b: {"mmd2": float(np.mean(v)), "stderr": float(np.std(v, ddof=1) / math.sqrt(len(v))), "replicates": v}
           for b, v in values.items()}
    return {"steps": len(steps), "kept_steps": steps, "network_calls": calls, "mmd2": mmd,
            "wall_s": round(time.perf_counter() - start, 2)}


def bound(run_dir: str, steps: int, data: str | None, max_examples: int) -> dict:
    e = thermodiff_json(["evaluate", run_dir, "--respace", str(steps), "--exact", "--max-examples", str(max_examples),
                         *(["--data", data] if data else [])])
    return {key: e[key] for key in ("K_bits", "stderr_bits", "K_original_units_bits", "n_examples") if key in e}


def plot(record: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BANDWIDTH_FACTORS), figsize=(5.5 * len(BANDWIDTH_FACTORS), 4))
    for ax, b in zip(axes, BANDWIDTH_FACTORS):
        for name, rows in record["samplers"].items():
            calls = [r["network_calls"] for r in rows]
            ax.errorbar(calls, [r["mmd2"][b]["mmd2"] for r in rows], [r["mmd2"][b]["stderr"] for r in rows],
                        marker="o", capsize=3, label=name)
        full = record["full_chain"]
        ax.axhline(full["mmd2"][b]["mmd2"], color="k", ls="--", label=f"ancestral, all {full['steps']} steps")
        ax.axhline(record["null"][b]["null_sd"], color="grey", ls=":", label="permutation null, 1 sd")
        ax.set(xscale="log", yscale="symlog", xlabel="network calls per sample", ylabel="MMD$^2$ (unbiased)",
               title=f"{record['name']}: h = {b.replace('_', ' ')} ({record['bandwidths'][b]:.3g})")
        ax.set_yscale("symlog", linthresh=max(record["null"][b]["null_sd"], 1e-6))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def samples_figure(run, record: dict, budget: int, path) -> None:
    """2-D data: held-out points and 1000 samples of each setting at ``budget`` network calls, on the
    record's kept steps (the first replicate's seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held_out = run.dataset.to_model(run.dataset.test).numpy()[:1000]
    fig, axes = plt.subplots(1, 1 + len(SETTINGS), figsize=(2.6 * (1 + len(SETTINGS)), 2.8), sharex=True, sharey=True)
    axes[0].scatter(*held_out.T, s=1, c="k")
    axes[0].set_title("held out", fontsize=9)
    for ax, name in zip(axes[1:], SETTINGS):
        [row] = [r for r in record["samplers"][name] if r["budget"] == budget]
        x, calls = draw(run, row["kept_steps"], name, 1000, seed=1000)
        ax.scatter(*x.T, s=1)
        ax.set_title(f"{name}: {row['steps']} steps, {calls} calls", fontsize=9)
    lim = 1.5 * np.abs(held_out).max()
    axes[0].set(xlim=(-lim, lim), ylim=(-lim, lim))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown_tables(record: dict, bandwidth: str) -> str:
    """The record's MMD^2 (x 10^3) per sampler and budget at ``bandwidth``, and the respaced
    ancestral chains' bounds, as docs/samplers.md shows them (every figure linked to the record)."""
    name = f"samplers_{record['name']}"

    def mmd(where: str, value: dict) -> str:
        return cited(f"{1000 * value['mmd2']:.2f} ± {1000 * value['stderr']:.2f}", name,
                     f"{where}.mmd2.{bandwidth}.mmd2*1000", f"{where}.mmd2.{bandwidth}.stderr*1000")

    budgets = [row["budget"] for row in record["samplers"]["ancestral"]]
    lines = ["| sampler | " + " | ".join(f"{b} calls" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for sampler, rows in record["samplers"].items():
        cells = [mmd(f"samplers.{sampler}.budget={row['budget']}", row["mmd2"][bandwidth]) + f" ({row['network_calls']})"
                 for row in rows]
        lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    null_sd = cited(f"{1000 * record['null'][bandwidth]['null_sd']:.2f}", name, f"null.{bandwidth}.null_sd*1000")
    lines.append(f"\nAll {record['full_chain']['steps']} steps, ancestral: "
                 f"{mmd('full_chain', record['full_chain']['mmd2'][bandwidth])}; the permutation null's standard "
                 f"deviation: {null_sd}.")
    bounds = [f"{steps} steps " + cited(f"{b['K_bits']:.3f} ± {b['stderr_bits']:.3f}", name,
                                        f"respaced_bounds.{steps}.K_bits", f"respaced_bounds.{steps}.stderr_bits")
              for steps, b in record["respaced_bounds"].items()]
    return "\n".join(lines) + "\n\nBound K of the respaced ancestral chains, bits per point in the model's units: " + "; ".join(bounds) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="the run to measure (none with --table)")
    parser.add_argument("--name", required=True, help="results file: samplers_NAME.json")
    parser.add_argument("--table", choices=BANDWIDTH_FACTORS, help="print the record's tables at this bandwidth "
                                                                   "(Markdown, for docs/samplers.md) and stop")
    parser.add_argument("--data", help="held-out data (original units, .npy) instead of the run's test split")
    parser.add_argument("--calls", default="5,10,20,50,100")
    parser.add_argument("--n", type=int, default=1000, help="samples and held-out points per replicate")
    parser.add_argument("--replicates", type=int, default=4)
    parser.add_argument("--permutations", type=int, default=100)
    parser.add_argument("--bound-examples", type=int, default=1000)
    parser.add_argument("--figure-calls", type=int, default=10, help="2-D data: the budget whose samples are drawn "
                                                                     "in samplers_NAME_samples.png")
    parser.add_argument("--samples-figure", action="store_true", help="only draw samplers_NAME_samples.png from the "
                                                                      "record's kept steps")
    args = parser.parse_args()
    if args.table:
        print(markdown_tables(json.loads((RESULTS / f"samplers_{args.name}.json").read_text()), args.table))
        return
    torch.set_grad_enabled(False)
    started, wall = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    run = load_run(args.run, data_path=args.data, split=args.data is None)
    run.model.eval()
    if args.samples_figure:
        record = json.loads((RESULTS / f"samplers_{args.name}.json").read_text())
        samples_figure(run, record, args.figure_calls, RESULTS / f"samplers_{args.name}_samples.png")
        return
    held_out = run.dataset.to_model(run.dataset.test).double().numpy()
    if len(held_out) < args.n * args.replicates:
        raise SystemExit(f"{len(held_out)} held-out points: fewer than --n x --replicates")
    h = math.sqrt(float(np.median(squared_distances(held_out[:1000], held_out[:1000])[np.triu_indices(1000, 1)])))
    bandwidths = {b: h * f for b, f in BANDWIDTH_FACTORS.items()}
    null = {b: permutation_null(held_out[:args.n], held_out[args.n:2 * args.n], bh, args.permutations, 0)
            for b, bh in bandwidths.items()}
    record = {"name": args.name, "run": args.run, "command": "OMP_NUM_THREADS=1 python benchmarks/samplers.py "
              + " ".join(sys.argv[1:]), "date": started.isoformat(timespec="seconds"),
              "split": "test" if args.data is None else args.data, "n_held_out": len(held_out),
              "experiment": run.config.name, "T": run.diffusion.T, "parameterization": run.config.diffusion.parameterization,
              "decoder": run.config.diffusion.decoder, "train_steps": run.step,
              "statistic": "unbiased MMD^2 (Gretton et al. 2012), Gaussian kernel in model units, h = median pairwise "
                           "distance of 1000 held-out points (and h / 4, h / 16); mean +- standard error over replicates, each "
                           "with its own samples and its own disjoint held-out points",
              "n_per_replicate": args.n, "replicates": args.replicates, "bandwidths": bandwidths, "null": null,
              "samplers": {}, "respaced_bounds": {}}
    every_step = list(range(1, run.diffusion.T + 1))
    record["full_chain"] = measure(run, held_out, "ancestral", every_step, args.n, args.replicates, bandwidths)
    del record["full_chain"]["kept_steps"]
    for name in SETTINGS:
        record["samplers"][name] = []
        for calls in (int(c) for c in args.calls.split(",")):
            steps = steps_for(run, name, calls)
            row = measure(run, held_out, name, steps, args.n, args.replicates, bandwidths) | {"budget": calls}
            if name == "ancestral":
                record["respaced_bounds"][str(len(steps))] = row["bound"] = bound(args.run, len(steps), args.data,
                                                                                  args.bound_examples)
            record["samplers"][name].append(row)
            print(f"{name:12} {calls:4d} calls: {len(steps):4d} steps ({row['network_calls']} calls)  MMD^2 "
                  + "  ".join(f"{b} {row['mmd2'][b]['mmd2']:.2e} +- {row['mmd2'][b]['stderr']:.1e}" for b in bandwidths),
                  flush=True)
    record["wall_s"], record["cpu_s"] = round(time.perf_counter() - wall, 1), round(time.process_time(), 1)
    path = write_result(f"samplers_{args.name}", record)
    plot(record, RESULTS / f"samplers_{args.name}.png")
    if run.dataset.event_shape == (2,):
        samples_figure(run, record, args.figure_calls, RESULTS / f"samplers_{args.name}_samples.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
