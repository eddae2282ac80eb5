"""Denoising and inpainting with a trained run: the posterior samplers of
:mod:`thermodiff.posterior` applied in the run's own units (paper section 4, Figs. 3 and 5)."""

import numpy as np
import torch
from tqdm import tqdm

from thermodiff.binomial import BinomialDiffusion
from thermodiff.errors import UserError
from thermodiff.experiment import Run
from thermodiff.posterior import Clamp, GaussianObservation
from thermodiff.sampling import ancestral_sample


def as_examples(x: np.ndarray, run: Run, name: str) -> np.ndarray:
    """One example of the run's shape, or a stack of them -> (N, *shape) float64."""
    shape = run.dataset.event_shape
    x = np.asarray(x, dtype=np.float64)
    if tuple(x.shape) == shape:
        x = x[None]
    if tuple(x.shape[1:]) != shape:
        raise UserError(f"{name}: shape {tuple(x.shape)} does not fit run {run.path}, which models examples of shape {shape}")
    if not np.isfinite(x).all():
        raise UserError(f"{name}: contains NaN or infinite values")
    return x


def sample_with_factor(run: Run, n_inputs: int, n_samples: int, factor, seed: int = 0,
                       progress: bool = True) -> np.ndarray:
    """``n_samples`` posterior draws for each of ``n_inputs`` inputs (the factor's batch), in
    original units: (n_samples, n_inputs, *shape)."""
    generator = torch.Generator().manual_seed(seed)
    shape = run.dataset.event_shape
    draws = []
    with tqdm(total=n_samples * run.diffusion.T, desc="posterior", unit="t", disable=not progress, mininterval=1.0) as bar:
        for _ in range(n_samples):
            x = ancestral_sample(run.diffusion, run.model, (n_inputs, *shape), generator, factor=factor,
                                 callback=lambda t, x: bar.update(1) if t > 0 else None)
            draws.append(run.dataset.from_model(x))
    return np.stack(draws)


def denoise(run: Run, noisy: np.ndarray, sigma: float, n_samples: int, seed: int = 0, progress: bool = True) -> np.ndarray:
    """Samples of p(x | y) for y = x + N(0, sigma^2) per entry, sigma in original units (pixel
    values 0..255 for images): every reverse kernel times N(y; x, sigma^2), as in paper Fig. 3."""
    if not sigma > 0:
        raise UserError(f"--sigma must be positive, got {sigma}")
    if isinstance(run.diffusion, BinomialDiffusion):
        raise UserError(f"run {run.path} is a binomial diffusion; Gaussian denoising needs a Gaussian one (use inpaint)")
    y = run.dataset.to_model(noisy, dequantize=False).double()
    noise_var = (sigma * run.dataset.model_scale()) ** 2
    return sample_with_factor(run, len(noisy), n_samples, GaussianObservation(y, noise_var), seed, progress)


def inpaint(run: Run, values: np.ndarray, mask: np.ndarray, n_samples: int, seed: int = 0, progress: bool = True,
            known: str = "clamp") -> np.ndarray:
    """Samples with the entries where ``mask`` is true fixed to ``values`` and the rest drawn.
    ``known = "clamp"`` holds them at their values at every step (paper Fig. 5); "forward" lets
    them follow a forward trajectory to their values (see :class:`~thermodiff.posterior.Clamp`).
    Known entries come back exactly as given."""
    if known not in ("clamp", "forward"):
        raise UserError(f"--known must be 'clamp' or 'forward', got {known!r}")
    keep = torch.as_tensor(mask.astype(bool))
    if bool(keep.all()):
        raise UserError("the mask marks every value as known; nothing to fill in")
    clamp = Clamp(run.dataset.to_model(values, dequantize=False).double(), keep,
                  forward=run.diffusion if known == "forward" else None)
    samples = sample_with_factor(run, len(values), n_samples, clamp, seed, progress)
    samples[:, mask.astype(bool)] = np.broadcast_to(values, samples.shape)[:, mask.astype(bool)]  # exact, not rounded
    return samples
