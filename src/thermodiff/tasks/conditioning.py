"""Denoising and inpainting with a trained run: the posterior samplers of
:mod:`thermodiff.process.posterior` applied in the run's own units (paper section 4, Figs. 3 and 5)."""

import math
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from thermodiff.errors import UserError
from thermodiff.nets.vector import check_image_shape
from thermodiff.process.posterior import Clamp, GaussianObservation
from thermodiff.process.sampling import ancestral_sample
from thermodiff.run.experiment import Run
from thermodiff.tasks.options import DENOISE_METHODS, KNOWN_VALUES


def as_examples(x: np.ndarray, run: Run, name: str) -> np.ndarray:
    """One example of the run's shape, or a stack of them -> (N, *shape) float64. A fully
    convolutional image network (its ``size_multiple``) with one global scaling also takes images
    of other sizes, with the same channels and sides divisible by that multiple (paper Fig. 5)."""
    shape = run.dataset.event_shape
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == len(shape):
        x = x[None]
    if tuple(x.shape[1:]) != shape:
        try:
            if not run.dataset.is_image or len(run.dataset.scaling.shift) != 1:
                raise ValueError(f"expected examples of shape {shape}")
            check_image_shape(x.shape[1:], shape[0], shape[1], getattr(run.model, "size_multiple", None))
        except ValueError as e:
            raise UserError(f"{name}: shape {tuple(x.shape)} does not fit run {run.path} ({e})") from None
    if not np.isfinite(x).all():
        raise UserError(f"{name}: contains NaN or infinite values")
    return x


def sample_with_factor(run: Run, inputs_shape: tuple[int, ...], n_samples: int, factor=None, seed: int = 0,
                       progress: bool = True, start: Callable[[torch.Generator], tuple[int, torch.Tensor]] | None = None,
                       ) -> np.ndarray:
    """``n_samples`` posterior draws for each input of ``inputs_shape`` (the factor's batch, N x
    example shape), in original units: (n_samples, *inputs_shape). ``start(generator) -> (t, x_t)``
    begins each chain part-way instead of at the prior. The chains run on the run's device."""
    generator = torch.Generator(run.device).manual_seed(seed)
    n_inputs, *shape = inputs_shape
    chains = [None if start is None else start(generator) for _ in range(n_samples)]
    steps = sum(run.diffusion.T if c is None else c[0] for c in chains)
    draws = []
    with tqdm(total=steps, desc="posterior", unit="t", disable=not progress, mininterval=1.0) as bar:
        for chain in chains:
            x = ancestral_sample(run.diffusion, run.model, (n_inputs, *shape), generator, run.device, factor=factor,
                                 start=chain, callback=lambda t, x: bar.update(1) if t > 0 else None)
            draws.append(run.dataset.from_model(x))
    return np.stack(draws)


def require_diffusion(run: Run) -> None:
    """Posteriors multiply a diffusion's reverse kernels by a factor (paper section 4); a baseline has none."""
    if run.config.baseline.kind:
        raise UserError(f"run {run.path} is a {run.config.baseline.kind} baseline; denoising and inpainting multiply "
                        "the kernels of a diffusion run, so they need one")


def _observation(run: Run, noisy: np.ndarray, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y and the noise variance in the model's space, for a Gaussian run, on the run's device."""
    require_diffusion(run)
    if not 0 < sigma < math.inf:
        raise UserError(f"--sigma must be positive and finite (a noise std in original units), got {sigma}")
    if run.diffusion.binary:
        raise UserError(f"run {run.path} is a binomial diffusion; Gaussian denoising needs a Gaussian one (use inpaint)")
    return (run.dataset.to_model(noisy, device=run.device, dequantize=False),
            ((sigma * run.dataset.model_scale()) ** 2).to(run.device))


def _starter(run: Run, y: torch.Tensor, noise_var: torch.Tensor, sigma: float):
    """``generator -> (t, x_t)``: y as a state of the forward chain (see
    GaussianDiffusion.diffuse_observation), with its errors as one-line user errors."""
    if noise_var.numel() > 1 and not bool((noise_var == noise_var.flatten()[0]).all()):
        raise UserError("--method start needs one noise level for every dimension (a global data scaling)")
    level = float(noise_var.flatten()[0])

    def start(generator: torch.Generator) -> tuple[int, torch.Tensor]:
        try:
            return run.diffusion.diffuse_observation(y, level, generator)
        except ValueError as e:
            raise UserError(f"--sigma {sigma}: {e}; use --method product") from None

    return start


def denoise(run: Run, noisy: np.ndarray, sigma: float, n_samples: int, seed: int = 0, progress: bool = True,
            method: str = "start") -> np.ndarray:
    """Samples of p(x | y) for y = x + N(0, sigma^2) per entry, sigma in original units (pixel
    values 0..255 for images), by ``method`` (see :data:`DENOISE_METHODS`)."""
    if method not in DENOISE_METHODS:
        raise UserError(f"--method must be one of {', '.join(DENOISE_METHODS)}, got {method!r}")
    y, noise_var = _observation(run, noisy, sigma)
    if method == "product":
        return sample_with_factor(run, noisy.shape, n_samples, GaussianObservation(y.double(), noise_var), seed, progress)
    return sample_with_factor(run, noisy.shape, n_samples, None, seed, progress, start=_starter(run, y, noise_var, sigma))


@torch.no_grad()
def denoise_mean(run: Run, noisy: np.ndarray, sigma: float, draws: int = 4, seed: int = 0) -> np.ndarray:
    """The model's posterior mean E[x | y] in one network call per draw, with no chain: y as the
    forward state at its matching step (as ``method="start"``), then
    :meth:`~thermodiff.process.gaussian.GaussianDiffusion.expected_x0`, averaged over ``draws`` draws of
    the step's extra noise. Original units."""
    y, noise_var = _observation(run, noisy, sigma)
    start, generator = _starter(run, y, noise_var, sigma), torch.Generator(run.device).manual_seed(seed)
    total = torch.zeros(y.shape, dtype=torch.float64, device=run.device)
    for _ in range(draws):
        t, x_t = start(generator)
        total += run.diffusion.expected_x0(run.model, x_t, t)
    return run.dataset.from_model(total / draws)


def inpainting_mask(run: Run, values: np.ndarray, mask: np.ndarray, mask_name: str = "mask",
                    values_name: str = "values") -> np.ndarray:
    """``mask`` (1 = known, 0 = unknown; one example's shape or that of all ``values``) as booleans of
    the shape of ``values`` (examples of ``run``, :func:`as_examples`), after checking it and the
    known values: 8-bit pixels for an image run, 0 or 1 for a binomial one, its categories for a
    categorical one. Errors name the mask and the values by ``mask_name`` and ``values_name``."""
    if not np.isfinite(mask).all():
        raise UserError(f"{mask_name}: contains NaN or infinite values")
    other = mask[~np.isin(mask, (0, 1))]
    if other.size:  # a soft or signed mask has no meaning here: every value is known or not
        raise UserError(f"{mask_name}: a mask holds 1 (known) and 0 (unknown) only, or booleans; found "
                        f"{other.size} other value(s), e.g. {other.flat[0]:g}")
    if mask.shape != values.shape[1:] and mask.shape != values.shape:
        raise UserError(f"{mask_name}: shape {mask.shape} does not match the input's {values.shape[1:]}")
    mask = np.broadcast_to(mask, values.shape) != 0
    if not mask.any():
        raise UserError(f"{mask_name}: marks no known values (1 = known)")
    known = values[mask]
    if run.dataset.is_image and ((known < 0) | (known > 255) | (known != np.rint(known))).any():
        raise UserError(f"{values_name}: known pixels must be integers in 0..255")
    if run.diffusion.binary and not np.isin(known, (0, 1)).all():
        raise UserError(f"{values_name}: known values must be 0 or 1 for a binomial run")
    if run.diffusion.one_hot_states is not None and run.dataset.lattice.outside(values)[mask].any():
        raise UserError(f"{values_name}: known values must be among the categories of the run's training data")
    return mask


def inpaint(run: Run, values: np.ndarray, mask: np.ndarray, n_samples: int, seed: int = 0, progress: bool = True,
            known: str = "clamp") -> np.ndarray:
    """Samples with the entries where ``mask`` (as :func:`inpainting_mask` returns it) is true
    fixed to ``values`` and the rest drawn, the known ones treated as ``known`` says (see
    :data:`KNOWN_VALUES`). Known entries come back exactly as given."""
    if known not in KNOWN_VALUES:
        raise UserError(f"--known must be 'clamp' or 'forward', got {known!r}")
    require_diffusion(run)
    if run.dataset.scaling.rotation is not None:
        raise UserError(f"run {run.path} whitens its data with a rotation (data.scaling = 'pca'), which mixes the "
                        "coordinates a mask refers to; to inpaint, train with --set data.scaling=per_dimension")
    keep = torch.as_tensor(mask.astype(bool), device=run.device)
    if bool(keep.all()):
        raise UserError("the mask marks every value as known; nothing to fill in")
    clamp = Clamp(run.dataset.to_model(values, device=run.device, dequantize=False).double(), keep,
                  forward=run.diffusion if known == "forward" else None)
    samples = sample_with_factor(run, values.shape, n_samples, clamp, seed, progress)
    samples[:, mask.astype(bool)] = np.broadcast_to(values, samples.shape)[:, mask.astype(bool)]  # exact, not rounded
    return samples
