"""Reverse-model parameterisations and training losses on the Swiss roll at equal training time,
all scored by the same exact bound; and respaced chains (T, T/4, T/10 steps): their bound and
sampling speed.

    OMP_NUM_THREADS=1 python benchmarks/parameterizations.py [--budget-s 20] [--config swissroll_paper]

Each variant trains the config (default configs/swissroll_paper.toml: the paper's T = 40, learned
schedule, beta_1 = 1e-6) with the variant's overrides for the same wall time with the training
loop's own step (training.train_step), then the exact bound (all terms, float64) is measured on the held-out split for the full chain
and the respaced ones, and samples are timed. Writes benchmarks/results/parameterizations_<config>.json.
"""

import argparse
import datetime
import os
import time

import torch

from record import write_result  # a sibling module: benchmarks/ is on sys.path when run
from thermodiff.process.bound import exact_bound
from thermodiff.process.respace import respace
from thermodiff.process.sampling import ancestral_sample
from thermodiff.run.config import load_config
from thermodiff.run.experiment import assemble
from thermodiff.run.training import TrainState, draw_batch, train_step
from thermodiff.tasks.evaluation import bound_report

# (name, config overrides): the bound-trained parameterisations on the config's learned schedule;
# L_simple and the hybrid loss cannot learn a schedule, so they run on the cosine schedule next to
# the reference parameterisation on the same schedule
VARIANTS = [
    ("reference", []),
    ("paper", ["diffusion.parameterization=paper"]),
    ("eps (beta-tilde), bound", ["diffusion.parameterization=eps"]),
    ("eps_learned_var, bound", ["diffusion.parameterization=eps_learned_var"]),
    ("eps_learned_var, bound, loss-aware t", ["diffusion.parameterization=eps_learned_var", "train.t_sampler=loss_aware"]),
    ("reference, cosine", ["diffusion.schedule=cosine", "diffusion.beta_1=none"]),
    ("eps (beta-tilde), L_simple, cosine", ["diffusion.schedule=cosine", "diffusion.beta_1=none",
                                            "diffusion.parameterization=eps", "train.loss=simple"]),
    ("eps_learned_var, hybrid, cosine", ["diffusion.schedule=cosine", "diffusion.beta_1=none",
                                         "diffusion.parameterization=eps_learned_var", "train.loss=hybrid"]),
]


def train_for(cfg, budget_s: float) -> tuple:
    """Train for ``budget_s`` seconds of wall time with the library's training step (its loss,
    optimiser, lr schedule over the budget, gradient clipping and weight average; no
    checkpoints). Returns (dataset, diffusion, model, steps, wall_s), with the weights that
    evaluation uses (the average's, if any)."""
    parts = assemble(cfg)
    cfg.train.steps, cfg.train.max_minutes = 0, budget_s / 60  # the lr schedule's run is the budget
    state = TrainState.start(parts.model, parts.diffusion, cfg.train, cfg.seed)
    while state.elapsed_s < budget_s:
        train_step(state, draw_batch(state, parts.dataset, cfg.train.batch_size, torch.device("cpu")), cfg.train)
    wall = state.elapsed_s
    state.objective.load_state_dict(state.evaluated_weights(), strict=False)
    parts.model.eval()
    return parts.dataset, parts.diffusion, parts.model, state.step, wall


def measure(dataset, diffusion, model, steps: int, n_draws: int, n_samples: int, seed: int = 0) -> dict:
    """The exact bound on the held-out split and the sampling speed of the chain on ``steps``
    steps (respaced by the moments rule; the bound by improved-diffusion's rule next to it)."""
    x = dataset.to_model(dataset.test)

    def bound(chain) -> dict:
        """K, its standard error and K - L_null in bits, as ``thermodiff evaluate`` reports them."""
        estimate = exact_bound(chain, model, [x], n_draws, torch.Generator().manual_seed(seed))
        report = bound_report(dataset, estimate.per_example, chain.null_log_likelihood(x.double()))
        return {key: report[key] for key in ("K_bits", "stderr_bits", "K_minus_L_null_bits")}

    chain = diffusion if steps == diffusion.T else respace(diffusion, steps)
    result = {"steps": chain.T, **bound(chain)}
    start = time.perf_counter()
    ancestral_sample(chain, model, (n_samples, *dataset.event_shape), torch.Generator().manual_seed(seed))
    wall = time.perf_counter() - start
    result |= {"sample_wall_s": round(wall, 3), "samples_per_s": round(n_samples / wall, 1)}
    if steps != diffusion.T:
        interpolated = bound(respace(diffusion, steps, "interpolate"))
        result |= {"K_bits_interpolate_rule": interpolated["K_bits"], "stderr_bits_interpolate_rule": interpolated["stderr_bits"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="swissroll_paper")
    parser.add_argument("--budget-s", type=float, default=20.0, help="training wall time per variant")
    parser.add_argument("--draws", type=int, default=4, help="noise draws per example and t in the bound")
    parser.add_argument("--samples", type=int, default=4000, help="samples drawn to time sampling")
    args = parser.parse_args()
    records = []
    for name, overrides in VARIANTS:
        cfg = load_config(args.config, overrides)
        dataset, diffusion, model, steps, wall = train_for(cfg, args.budget_s)
        T = diffusion.T
        chains = [measure(dataset, diffusion, model, s, args.draws, args.samples) for s in (T, max(2, T // 4), max(2, T // 10))]
        d = cfg.diffusion
        records.append({
            "variant": name, "parameterization": d.parameterization,
            "eps_variance": diffusion.eps_variance.value if d.parameterization == "eps" else None,
            "schedule": d.schedule, "beta_1": float(diffusion.schedule.betas()[0].detach()), "train_loss": cfg.train.loss,
            "t_sampler": cfg.train.t_sampler, "T": T, "train_steps": steps, "train_wall_s": round(wall, 2),
            "load_avg_1min_after_training": round(os.getloadavg()[0], 2), "chains": chains})
        full = chains[0]
        print(f"{name:40} {steps:6d} steps  K = {full['K_bits']:7.3f} +- {full['stderr_bits']:.3f} bits  "
              + "  ".join(f"[{c['steps']} steps: K = {c['K_bits']:.3f}, {c['samples_per_s']:.0f} samples/s]" for c in chains),
              flush=True)
    record = {
        "command": f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/parameterizations.py "
                   f"--config {args.config} --budget-s {args.budget_s:g} --draws {args.draws} --samples {args.samples}",
        "date": datetime.date.today().isoformat(),
        "budget": {"train_wall_s_per_variant": args.budget_s, "note": "equal wall time per variant, far short of the "
                   "config's 60k steps: compares early training, not converged models; on a shared machine the "
                   "steps done in that time (train_steps) and the sampling speeds vary with the load"},
        "evaluation": {"split": "test (held-out, seeded split of the config)", "n_examples": len(dataset.test),
                       "n_draws": args.draws, "bound": "exact: all T - 1 KL terms, prior and decoder, float64",
                       "respaced_steps": [c["steps"] for c in records[0]["chains"]], "n_samples_timed": args.samples,
                       "respacing": "evenly spaced steps including 1 and T; kernels by the moments rule "
                                    "(K_bits), and by improved-diffusion's interpolation rule (K_bits_interpolate_rule)"},
        "variants": records,
    }
    print(f"-> {write_result(f'parameterizations_{args.config}', record)}")


if __name__ == "__main__":
    main()
