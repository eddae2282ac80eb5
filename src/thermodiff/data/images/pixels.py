"""Dequantisation: uint8 pixels to and from the unit scale the models see, the log-Jacobian of
that map (which turns a log-density on the unit scale into one per grey level), and PSNR."""

import math

import numpy as np
import torch

from thermodiff.errors import UserError


def to_unit_float(x, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniformly dequantised pixels: y = (v + u - 0.5) / 255 with v the integer pixel value
    (0..255) and u ~ U(0, 1) drawn afresh on every call, so y spreads v / 255 over one grey
    level, [(v - 0.5) / 255, (v + 0.5) / 255), and the data fill [-0.5/255, 255.5/255).

    The map from pixel units w = v + u - 0.5 (equivalently v + u on [0, 256): a shift has no
    Jacobian) to y is y = w / 255, so for a D-pixel image log p_w(w) = log p_y(y) - D log 255:
    add :func:`pixel_log_jacobian` (D) to a log-density of y to get one per unit grey level, and
    E_u log p_w(v + u - 0.5) is a lower bound on the log-probability of the discrete image v."""
    v = torch.as_tensor(x)
    if v.dtype != torch.uint8:
        if v.dtype.is_floating_point or v.dtype.is_complex or v.numel() and (int(v.min()) < 0 or int(v.max()) > 255):
            raise UserError(f"to_unit_float expects integer pixel values in 0..255, got {v.dtype}")
    u = torch.rand(v.shape, generator=generator, dtype=dtype, device=v.device)
    return (v.to(dtype) + u - 0.5) / 255


def from_unit_float(y) -> np.ndarray:
    """The inverse of :func:`to_unit_float` up to the noise: round(255 y) clipped to 0..255, uint8."""
    y = torch.as_tensor(y).detach().to("cpu", torch.float64)
    return torch.clamp(torch.round(y * 255), 0, 255).to(torch.uint8).numpy()


def pixel_log_jacobian(num_pixels: int) -> float:
    """-D log 255: added to log p(y) for y on the :func:`to_unit_float` scale (D values per image)
    it gives the log-density in pixel units (one unit per grey level)."""
    return -num_pixels * math.log(255)


def psnr_db(mse: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of 8-bit images from their mean squared errors (grey levels^2)."""
    return 10 * torch.log10(255.0**2 / mse)
