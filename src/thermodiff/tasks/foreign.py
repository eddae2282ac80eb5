"""The exact variational bound, in bits/dim of 8-bit images, of diffusion models trained by other
codebases: a diffusers pipeline saved on disk (:func:`evaluate_diffusers`, ``thermodiff evaluate
--diffusers``), or any noise-predicting network with its beta table (:func:`eps_model_bound`).

Nothing of the bound is computed here: the model is wrapped to thermodiff's network contract
(:class:`thermodiff.nets.foreign.ForeignNoiseNet`), the process is thermodiff's Gaussian diffusion
on the model's own betas with the discretized decoder on the 256 levels of [-1, 1], and the bound
is :func:`thermodiff.process.bound.exact_bound`, as for a model thermodiff trained.
"""

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from thermodiff.data import dataset as datasets
from thermodiff.errors import UserError
from thermodiff.nets.foreign import ForeignNoiseNet, load_diffusers
from thermodiff.process.contract import Decoder
from thermodiff.process.gaussian import FixedVariance, GaussianDiffusion, GaussianParameterization, Prediction
from thermodiff.process.schedules import Schedule
from thermodiff.process.tensors import LN2
from thermodiff.run.autoconfig import IMAGE_T_SAMPLES
from thermodiff.run.config import EvalConfig
from thermodiff.run.experiment import data_bins, images_or_array, official_images
from thermodiff.run.machine import hardware
from thermodiff.tasks.evaluation import estimator_name, measure_bound

#: diffusers' variance types that have a fixed reverse kernel (its "learned" has none, fixed_*_log
#: are the same variances computed in logs), as thermodiff's EPS parameterisations
VarianceType = Literal["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned_range"]
_VARIANCES = {"fixed_small": FixedVariance.BETA_TILDE, "fixed_small_log": FixedVariance.BETA_TILDE,
              "fixed_large": FixedVariance.BETA, "fixed_large_log": FixedVariance.BETA, "learned_range": None}
#: 8-bit images in [-1, 1] as diffusers, improved-diffusion and denoising-diffusion-pytorch train:
#: x = 2 v / 255 - 1 = (v / 255 - 0.5) / 0.5 for pixel values v = 0..255
MINUS_ONE_TO_ONE = datasets.Scaling([0.5], [0.5])


def foreign_process(betas, variance_type: VarianceType, dataset: datasets.Dataset) -> GaussianDiffusion:
    """thermodiff's Gaussian diffusion on ``betas`` (t = 1..T, float64) with the reverse variance
    of ``variance_type`` and the discretized decoder on ``dataset``'s 8-bit levels."""
    if variance_type not in _VARIANCES:
        raise UserError(f"variance type {variance_type!r} is not supported; use one of {', '.join(get_args(VarianceType))}")
    betas = torch.as_tensor(np.asarray(betas, dtype=np.float64))
    if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
        raise UserError(f"betas must be a table of at least 2 values in (0, 1), got shape {tuple(betas.shape)} in "
                        f"[{float(betas.min()):g}, {float(betas.max()):g}]")
    fixed = _VARIANCES[variance_type]
    parameterization = GaussianParameterization.EPS if fixed else GaussianParameterization.EPS_LEARNED_VAR
    return GaussianDiffusion(Schedule(betas), parameterization, Decoder.DISCRETIZED, fixed, data_bins(dataset))


def image_dataset(images: np.ndarray, source: str) -> datasets.Dataset:
    """uint8 images (N, C, H, W) as the test split of a data set seen in [-1, 1]."""
    return datasets.Dataset(images[:0], images, MINUS_ONE_TO_ONE, binary=False, source=source, dequantize=True)


def levels_of(images, max_examples: int | None) -> np.ndarray:
    """The first ``max_examples`` (None: all) of ``images`` (a tensor or array (N, C, H, W) in
    [-1, 1], or an iterable of them or of (images, labels) batches) as uint8 pixel values."""
    batches, kept, n = [images] if isinstance(images, (torch.Tensor, np.ndarray)) else images, [], 0
    for batch in batches:
        batch = batch[0] if isinstance(batch, (tuple, list)) else batch
        kept.append(torch.as_tensor(batch).detach().to("cpu", torch.float64))
        n += len(kept[-1])
        if max_examples and n >= max_examples:
            break
    if not kept:
        raise UserError("no images were given")
    x = torch.cat(kept)[:max_examples or None]
    v = (x + 1) * 127.5
    if x.ndim != 4 or not bool(((v - v.round()).abs() <= 1e-3).all() & (v.round() >= 0).all() & (v.round() <= 255).all()):
        raise UserError(f"images must be 8-bit images of shape (N, C, H, W) mapped to [-1, 1] as 2 v / 255 - 1 (v = "
                        f"0..255); got shape {tuple(x.shape)} in [{float(x.min()):g}, {float(x.max()):g}]")
    return v.round().to(torch.uint8).numpy()


def foreign_bound(net, betas, dataset: datasets.Dataset, prediction_type: str, variance_type: VarianceType,
                  clip_x0: float | None, t_samples: int, n_draws: int, batch_size: int, seed: int, device,
                  progress: bool, origin: str, t_sampling: str = EvalConfig.t_sampling) -> dict:
    """The bound report of a 0-based ``net`` on ``dataset``'s test images (see :func:`eps_model_bound`)."""
    if prediction_type not in {p.value for p in Prediction}:
        raise UserError(f"prediction type {prediction_type!r} is not one of {', '.join(p.value for p in Prediction)}")
    diffusion = foreign_process(betas, variance_type, dataset)
    model = ForeignNoiseNet(net, diffusion, prediction_type,
                            diffusion.parameterization is GaussianParameterization.EPS_LEARNED_VAR).to(device)
    if clip_x0 is not None:  # the kernels the sampler draws from: x_0 clipped to [-clip_x0, clip_x0]
        diffusion = diffusion.clipped(-clip_x0, clip_x0)
    m = measure_bound(diffusion, model, dataset, dataset.test, n_draws, t_samples, seed, batch_size, progress, origin,
                      device, t_sampling)
    where = torch.device(device or "cpu")
    return {"n_examples": len(dataset.test), "T": diffusion.T, "estimator": estimator_name(m.estimate),
            "t_samples": m.estimate.t_samples, "t_sampling": m.estimate.t_sampling and m.estimate.t_sampling.value, "n_draws": n_draws,
            "prediction_type": prediction_type,
            "variance_type": variance_type, "parameterization": diffusion.parameterization.value,
            "eps_variance": diffusion.eps_variance.value if variance_type != "learned_range" else None,
            "clip_x0": clip_x0, "decoder": diffusion.decoder.value, "beta_1": float(diffusion.schedule.betas()[0]),
            "beta_T": float(diffusion.schedule.betas()[-1]), **m.report,
            "per_timestep_bits": (m.estimate.terms / LN2).tolist(), "hardware": hardware(where),
            "device": str(where)}


def eps_model_bound(model: Callable, betas, images: torch.Tensor | np.ndarray | Iterable, *,
                    prediction_type: str = "epsilon", variance_type: VarianceType = "fixed_small",
                    clip_x0: float | None = None, max_examples: int | None = None, t_samples: int = IMAGE_T_SAMPLES,
                    n_draws: int = 1, batch_size: int = 50, seed: int = 0, device=None, progress: bool = False,
                    t_sampling: str = EvalConfig.t_sampling) -> dict:
    """The exact variational bound on -log p(x) of 8-bit images, in bits/dim, of a DDPM-style model
    trained elsewhere (denoising-diffusion-pytorch, improved-diffusion, diffusers, your own).

    ``model(x_t, t)``: the network, called with x_t (N, C, H, W) float32 and t (N,) int64 steps
    0..T-1 (0-based, as those codebases number them); returns the noise (``prediction_type``
    "epsilon"), x_0 ("sample") or v ("v_prediction"), of x_t's shape, or with ``variance_type``
    "learned_range" twice its channels, the second half v in [-1, 1] interpolating log beta_t and
    log beta-tilde_t (improved-diffusion's learn_sigma). ``betas``: the training schedule's
    beta_0..beta_{T-1} (any sequence; used in float64). ``images``: (N, C, H, W) in [-1, 1], 8-bit
    levels 2 v / 255 - 1, as a tensor or array or an iterable of them (or of (images, labels)
    batches, e.g. a DataLoader); the first ``max_examples`` are used. ``variance_type``:
    fixed_small (beta-tilde_t), fixed_large (beta_t), learned_range. ``clip_x0``: clip the implied
    x_0 to [-clip_x0, clip_x0] as the sampler does (diffusers' clip_sample, improved-diffusion's
    clip_denoised), None not to. ``t_samples``: stratified steps per image of an unbiased estimate
    (0: every step, exact and T / t_samples times slower), drawn in strata of equal mass of a pilot's
    terms (``t_sampling`` "importance") or uniformly in equal strata ("uniform").

    Returns a dict: ``nll_bits_per_dim`` (the bound, with the discretized Gaussian decoder of Ho et
    al. 2020, on the 8-bit values) and ``nll_stderr_bits_per_dim``, ``per_timestep_bits`` (index 0:
    -log p(x_0|x_1), t - 1: the KL at step t, T: the prior's), ``n_examples``, ``T`` and how it was
    computed. Wrap a model's call in ``torch.autocast`` yourself if you want one."""
    dataset = image_dataset(levels_of(images, max_examples), "images")
    return foreign_bound(model, betas, dataset, prediction_type, variance_type, clip_x0, t_samples, n_draws,
                         batch_size, seed, device, progress, "the model", t_sampling)


def held_out_images(source: str, data_dir: str | None, max_examples: int | None) -> np.ndarray:
    """The first ``max_examples`` test images (uint8) of MNIST or CIFAR-10 (``source`` a name, in
    ``data_dir``), or of a folder of images or an image array file."""
    if source in ("mnist", "cifar10"):
        if not data_dir:
            raise UserError(f"--data {source}: pass --data-dir DIR, a folder holding the {source} files")
        images = official_images(source, Path(data_dir), False, "test")
    else:
        images = images_or_array(Path(source))
        if images.ndim != 4:
            raise UserError(f"--data {source}: holds vectors of shape {images.shape[1:]}, not images")
    return images[:max_examples or None]


def evaluate_diffusers(path: str, data: str, data_dir: str | None = None, max_examples: int | None = None,
                       t_samples: int = IMAGE_T_SAMPLES, n_draws: int = 1, batch_size: int = 50, seed: int = 0,
                       device=None, progress: bool = True, t_sampling: str = EvalConfig.t_sampling) -> dict:
    """The bound of the diffusers UNet2DModel and DDPMScheduler saved in ``path`` on the first
    ``max_examples`` test images of ``data`` (see :func:`held_out_images`), mapped to [-1, 1]; the
    scheduler's betas, prediction type, variance type and clip_sample (see :func:`eps_model_bound`)."""
    model = load_diffusers(path, device)
    images = held_out_images(data, data_dir, max_examples)
    unet = model.config["unet"]
    size = unet["sample_size"] if isinstance(unet["sample_size"], (list, tuple)) else [unet["sample_size"]] * 2
    if images.shape[1] != unet["in_channels"] or list(images.shape[2:]) != list(size):
        raise UserError(f"--data {data}: images of shape {images.shape[1:]}, but the UNet in {path} takes "
                        f"{unet['in_channels']} x {size[0]} x {size[1]}")
    report = foreign_bound(model.net, model.betas, image_dataset(images, data), model.prediction.value,
                           model.variance_type, model.clip_x0, t_samples, n_draws, batch_size, seed, device, progress,
                           f"--diffusers {path}", t_sampling)
    return {"model_dir": str(path), "data": data, "split": "test", **model.config, **report}
