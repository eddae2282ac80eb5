"""Networks trained by other codebases behind thermodiff's network contract, so that the bound
of :mod:`thermodiff.process.bound` scores them unchanged.

Those codebases (huggingface diffusers, improved-diffusion, denoising-diffusion-pytorch) call
their network ``net(x_t, t)`` with 0-based steps t = 0..T-1 and read its output as the noise, x_0
or v (:class:`thermodiff.process.gaussian.Prediction`); with a learned variance (improved-diffusion's
and diffusers' ``learned_range``) the second half of its channels holds v in [-1, 1], which
interpolates log beta_t and log beta-tilde_t exactly as thermodiff's EPS_LEARNED_VAR
parameterisation does. :class:`ForeignNoiseNet` turns such a network into a thermodiff network
``model(x_t, t) -> z``, t = 1..T, z = (eps, v) of shape (N, 2, *x_t.shape[1:]).

:func:`load_diffusers` reads a diffusers UNet2DModel and the settings of its scheduler from a
folder saved with ``save_pretrained``: safetensors only, offline, diffusers imported lazily.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from thermodiff.errors import UserError, first_line
from thermodiff.process.gaussian import GaussianDiffusion, Prediction

INSTALL_DIFFUSERS = "pip install thermodiff[diffusers]"


class ForeignNoiseNet(nn.Module):
    """``net(x_t, t - 1)`` read as a :class:`Prediction` under ``diffusion``'s schedule and returned
    as thermodiff's (eps, v): v the second half of the output's channels when ``learned_range``, else
    zeros (unused by fixed variances). A sampler's clip of x_0 is the process's (GaussianDiffusion.clipped)."""

    def __init__(self, net, diffusion: GaussianDiffusion, prediction: Prediction | str, learned_range: bool):
        super().__init__()
        self.net, self.diffusion = net, diffusion
        self.prediction, self.learned_range = Prediction(prediction), learned_range

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        out = torch.as_tensor(self.net(x_t, t - 1)).double()
        channels = x_t.shape[1] * (2 if self.learned_range else 1)
        if out.shape != (x_t.shape[0], channels, *x_t.shape[2:]):
            raise UserError(f"the model returned shape {tuple(out.shape)} for x_t of shape {tuple(x_t.shape)}; "
                            f"expected {channels} channels ({'the prediction and the variance' if self.learned_range else 'the prediction'})")
        out, v = out.chunk(2, 1) if self.learned_range else (out, torch.zeros_like(out))
        eps = self.diffusion.eps_from_prediction(x_t.double(), t, out, self.prediction)
        return torch.stack([eps, v], 1)


@dataclass
class DiffusersModel:
    """A diffusers UNet2DModel as a ``net(x_t, t)`` of 0-based steps, and its scheduler's settings."""

    net: object
    betas: Tensor  # float64, the scheduler's own table
    prediction: Prediction
    variance_type: str
    clip_x0: float | None  # the sampler's clip of x_0 (clip_sample), None when off
    config: dict  # what the report states of the model and its scheduler


def import_diffusers():
    """The diffusers package, or a one-line UserError saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise UserError(f"evaluating a diffusers model needs the diffusers package: {INSTALL_DIFFUSERS}") from None
    return diffusers


def _model_folders(path: Path) -> tuple[Path, Path]:
    """``path``'s unet/ and scheduler/ folders, with a safetensors file and a config; UserError naming what is missing."""
    if not path.is_dir():
        raise UserError(f"--diffusers {path}: {'no such folder' if not path.exists() else 'is a file'}; give the "
                        "folder a diffusers pipeline was saved to (save_pretrained), with unet/ and scheduler/")
    unet, scheduler = path / "unet", path / "scheduler"
    for folder, config in ((unet, "config.json"), (scheduler, "scheduler_config.json")):
        if not (folder / config).is_file():
            raise UserError(f"--diffusers {path}: no {folder.name}/{config}; the folder must hold a UNet2DModel in unet/ "
                            "and a DDPMScheduler in scheduler/, as DDPMPipeline.save_pretrained writes them")
    if not any(unet.glob("*.safetensors")):
        pickled = [p.name for p in unet.glob("*.bin")]
        what = f"only {', '.join(pickled)} (pickled weights, which thermodiff never loads)" if pickled else "no weights"
        raise UserError(f"--diffusers {unet}: holds {what}; save the model with safetensors "
                        "(save_pretrained(..., safe_serialization=True), the default)")
    return unet, scheduler


def _scheduler_settings(scheduler, path: Path) -> tuple[Prediction, str, float | None]:
    """The prediction type, variance type and clip of x_0 of a DDPMScheduler, checked."""
    c = scheduler.config
    if c.get("prediction_type") not in {p.value for p in Prediction}:
        raise UserError(f"{path}: prediction_type {c.get('prediction_type')!r} is not one of "
                        f"{', '.join(p.value for p in Prediction)}")
    if c.get("thresholding"):
        raise UserError(f"{path}: dynamic thresholding (thresholding = true) has no fixed reverse kernel to bound; set "
                        "it false in scheduler_config.json to evaluate the model without it")
    if c.get("rescale_betas_zero_snr"):
        raise UserError(f"{path}: rescale_betas_zero_snr gives beta_T = 1, where the noise prediction leaves x_0 "
                        "undetermined; the bound needs every beta_t < 1")
    clip = float(c.get("clip_sample_range", 1.0)) if c.get("clip_sample") else None
    return Prediction(c["prediction_type"]), str(c.get("variance_type")), clip


def load_diffusers(path: str | Path, device=None) -> DiffusersModel:
    """The UNet2DModel in ``path``/unet (safetensors, offline) and the DDPMScheduler settings in
    ``path``/scheduler: its betas (float64 copies of its own table), prediction type, variance
    type and clip_sample. Bad folders and unsupported settings are one-line UserErrors."""
    path = Path(path)
    unet_dir, scheduler_dir = _model_folders(path)
    diffusers = import_diffusers()
    try:
        raw = json.loads((scheduler_dir / "scheduler_config.json").read_text())
        scheduler = diffusers.DDPMScheduler.from_config(raw)
        unet = diffusers.UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, local_files_only=True,
                                                      low_cpu_mem_usage=False)  # no accelerate needed
    except (OSError, ValueError, TypeError, KeyError, NotImplementedError, RuntimeError) as e:
        raise UserError(f"--diffusers {path}: cannot load the UNet2DModel and DDPMScheduler: {first_line(e)}") from None
    prediction, variance_type, clip = _scheduler_settings(scheduler, scheduler_dir)
    unet = unet.to(device).eval()
    dtype = unet.dtype

    def net(x_t: Tensor, t: Tensor) -> Tensor:
        return unet(x_t.to(dtype), t).sample

    config = {"unet": {k: unet.config[k] for k in ("sample_size", "in_channels", "out_channels", "block_out_channels")},
              "scheduler": {k: scheduler.config.get(k) for k in ("num_train_timesteps", "beta_schedule", "beta_start",
                                                                  "beta_end", "variance_type", "prediction_type",
                                                                  "clip_sample", "clip_sample_range")},
              "scheduler_class": raw.get("_class_name"),
              "parameters": sum(p.numel() for p in unet.parameters())}
    return DiffusersModel(net, scheduler.betas.double(), prediction, variance_type, clip, config)
