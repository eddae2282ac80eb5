"""Evaluate a trained run: the exact bound K on held-out data, in the units the paper reports,
with how it was measured."""

import math
import os
import platform

import torch
from tqdm import tqdm

from thermodiff.bound import exact_bound, standard_error
from thermodiff.errors import UserError
from thermodiff.experiment import Run, dequantizes, paper_row
from thermodiff.gaussian import GaussianParameterization
from thermodiff.image_data import bits_per_dim
from thermodiff.respace import respace

LN2 = math.log(2.0)


def hardware() -> str:
    return f"{platform.machine()} CPU ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)"


def evaluate(run: Run, n_draws: int | None = None, max_examples: int | None = None, seed: int = 0,
             progress: bool = True, split_name: str = "test", respace_to: int | str | None = None) -> dict:
    """K, K - L_null (bits per sample and per dimension), K in the data's original units, and
    the per-timestep terms, on the run's test split (or the data that replaced it). With
    ``respace_to`` (see :func:`thermodiff.respace.respaced_timesteps`), of the respaced chain."""
    cfg = run.config
    n_draws = n_draws or cfg.eval.n_draws
    max_examples = max_examples if max_examples is not None else cfg.eval.max_examples
    try:
        diffusion = run.diffusion if respace_to is None else respace(run.diffusion, respace_to)
    except ValueError as e:
        raise UserError(f"--respace: {e}") from None
    generator = torch.Generator().manual_seed(seed)
    test = run.dataset.test[:max_examples] if max_examples else run.dataset.test
    # fresh dequantisation noise for images; the bins' centres for the discretized decoder
    discrete = run.dataset.dequantize and not dequantizes(diffusion)
    x = run.dataset.to_model(test, generator, dequantize=not discrete)
    batches = torch.split(x, cfg.eval.batch_size)
    with tqdm(total=len(batches) * diffusion.T, desc="bound", unit="t", disable=not progress, leave=False, mininterval=1.0) as bar:
        estimate = exact_bound(diffusion, run.model, batches, n_draws, generator,
                               callback=lambda done, total: bar.update(done - bar.n))
    null = diffusion.null_log_likelihood(x.double())
    gain = estimate.per_example - null
    dim = run.dataset.dim
    log_det_bits = 0.0 if discrete else run.dataset.log_det() / LN2  # a probability has no units
    result = {
        "experiment": cfg.name,
        "run_dir": str(run.path),
        "train_steps": run.step,
        "split": split_name,
        "n_examples": len(x),
        "n_draws": n_draws,
        "T": diffusion.T,
        "diffusion": type(run.diffusion).__name__,
        "parameterization": run.diffusion.parameterization.value,
        "decoder": run.diffusion.decoder.value,
        "schedule": cfg.diffusion.schedule,
        "beta_1": float(run.diffusion.schedule.betas()[0].detach()),
        "train_loss": cfg.train.loss,
        "t_sampler": cfg.train.t_sampler,
        "unit": "bits/image" if run.dataset.is_image else "bits/sample",
        "dim": dim,
        "K_bits": estimate.mean / LN2,
        "stderr_bits": estimate.stderr / LN2,
        "K_minus_L_null_bits": float(gain.mean()) / LN2,
        "K_minus_L_null_stderr_bits": standard_error(gain) / LN2,
        "L_null_bits": float(null.mean()) / LN2,
        "K_bits_per_dim": estimate.mean / LN2 / dim,
        "K_original_units_bits": estimate.mean / LN2 + log_det_bits,
        "log_det_scaling_bits": log_det_bits,
        "per_timestep_bits": (estimate.terms / LN2).tolist(),
        "hardware": hardware(),
    }
    if run.dataset.is_image:
        pixels = dim // run.dataset.event_shape[0]  # all colour channels of a pixel together
        # the bound as a negative log-likelihood of the 8-bit data: of the discrete values
        # themselves (discretized decoder), or of the dequantised density in pixel units
        nll_kind, nll = None, None
        if discrete:
            nll_kind, nll = "discrete", -result["K_bits"] / dim
        elif run.dataset.dequantize:
            nll_kind, nll = "dequantized", bits_per_dim(estimate.mean + run.dataset.scaling.log_det(dim), dim)
        result |= {
            "K_bits_per_pixel": result["K_bits"] / pixels,
            "stderr_bits_per_pixel": result["stderr_bits"] / pixels,
            "K_minus_L_null_bits_per_pixel": result["K_minus_L_null_bits"] / pixels,
            "K_minus_L_null_stderr_bits_per_pixel": result["K_minus_L_null_stderr_bits"] / pixels,
            "nll_bits_per_dim": nll,
            "nll_stderr_bits_per_dim": result["stderr_bits"] / dim,
            "nll_bound": nll_kind,
        }
    if run.diffusion.parameterization is GaussianParameterization.EPS:
        result["eps_variance"] = run.diffusion.eps_variance.value
    if respace_to is not None:
        result |= {"T_trained": run.diffusion.T, "respaced_timesteps": diffusion.timesteps.tolist()}
    if paper_row(cfg) is not None and split_name == "test":
        result["paper"] = paper_row(cfg)
    return result
