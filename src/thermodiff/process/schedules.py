"""Forward noise schedules beta_1..beta_T, held in float64.

A :class:`Schedule` is an ``nn.Module`` so that the learned schedule of the paper
(section 2.4.1) trains jointly with the network; fixed schedules are buffers.
"""

import math
from enum import Enum

import numpy as np
import torch
from torch import Tensor, nn


class ScheduleKind(str, Enum):
    REFERENCE = "reference"  # the reference code's 1/linspace(T, 2, T), beta_1 += 1e-3
    LEARNED = "learned"  # reference initialisation, beta_2..beta_T trained on K (paper 2.4.1)
    LINEAR = "linear"  # Ho et al. (2020), rescaled to T
    COSINE = "cosine"  # Nichol & Dhariwal (2021)
    ERASE = "erase"  # 1/(T - t + 1): erase a fraction 1/T of the signal per step (binomial, paper App. D.1.2)
    LOG_SNR = "log_snr"  # log SNR falling linearly in t from the resolution beta_1 to LOG_SNR_END (VDM's linear gamma)


#: The last step's log signal-to-noise ratio, log(abar_T / (1 - abar_T)), of the LOG_SNR schedule:
#: abar_T = 1.2e-4, so the prior term KL(q(x_T|x_0) || N(0, I)) is ~1e-8 nats per unit-variance dimension.
LOG_SNR_END = -9.0
#: beta_1 of the LOG_SNR schedule when none is given (VDM's gamma_min = -13.3 is 1.7e-6).
LOG_SNR_BETA_1 = 1e-4


def reference_betas(T: int, step1_beta: float = 1e-3) -> np.ndarray:
    """The reference code's schedule: beta_t = 1/linspace(T, 2, T), kept in [1e-6, 1 - 1e-5],
    with ``step1_beta`` added to the floor of the first step (so beta_1 ~ 1/T + 1e-3)."""
    floor = np.full(T, 1e-6)
    floor[0] += step1_beta
    return floor + 1.0 / np.linspace(T, 2.0, T) * (1.0 - floor - 1e-5)


def linear_betas(T: int) -> np.ndarray:
    """DDPM's linear schedule 1e-4..0.02 at T = 1000, rescaled so other T destroy as much."""
    scale = 1000.0 / T
    return np.linspace(1e-4 * scale, min(0.02 * scale, 0.999), T)


def cosine_betas(T: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's cosine schedule: abar(t) = cos^2((t/T + s)/(1 + s) * pi/2)."""
    steps = np.arange(T + 1) / T
    abar = np.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    return np.clip(1.0 - abar[1:] / abar[:-1], 0.0, max_beta)


def erase_betas(T: int) -> np.ndarray:
    """beta_t = 1/(T - t + 1), t = 1..T: each step erases a constant fraction 1/T of the signal,
    and the last step (beta_T = 1) reaches the stationary distribution exactly."""
    t = np.arange(1, T + 1)
    return 1.0 / (T - t + 1.0)


def log_snr_betas(T: int, beta_1: float = LOG_SNR_BETA_1, log_snr_end: float = LOG_SNR_END) -> np.ndarray:
    """The betas whose log SNR_t = log(abar_t / (1 - abar_t)) falls linearly in t from
    log((1 - beta_1) / beta_1) at t = 1 to ``log_snr_end`` at t = T: equal steps in log SNR, the
    discrete chain of VDM's linear gamma (Kingma et al. 2021, sec. 3.2), with beta_1 = 1 - abar_1."""
    log_snr = np.linspace(math.log1p(-beta_1) - math.log(beta_1), log_snr_end, T)
    if not log_snr[0] > log_snr_end:
        raise ValueError(f"beta_1 = {beta_1} leaves no signal to destroy (log SNR {log_snr[0]:.3g} <= {log_snr_end})")
    log_abar = -np.logaddexp(0.0, -log_snr)  # log sigmoid(log SNR)
    return -np.expm1(np.diff(log_abar, prepend=0.0))


class Schedule(nn.Module):
    """beta_1..beta_T in float64. With ``learn=True`` beta_2..beta_T are parameters (in logit
    space, so they stay in (0, 1)) and beta_1 stays fixed: the paper keeps the first step a
    small constant to prevent overfitting (section 2.4.1)."""

    def __init__(self, betas: Tensor | np.ndarray, learn: bool = False):
        super().__init__()
        betas = torch.as_tensor(np.asarray(betas), dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError("a schedule needs at least 2 steps")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("every beta_t must lie in (0, 1]")
        self.learn = learn
        if learn:
            self.register_buffer("beta_1", betas[:1].clone())
            self.logit_rest = nn.Parameter(torch.logit(betas[1:]))
        else:
            self.register_buffer("fixed_betas", betas.clone())

    @property
    def T(self) -> int:
        return len(self.fixed_betas) if not self.learn else 1 + len(self.logit_rest)

    def betas(self) -> Tensor:
        """beta_t for t = 1..T as a float64 tensor of length T (index t - 1)."""
        if self.learn:
            return torch.cat([self.beta_1, torch.sigmoid(self.logit_rest)])
        return self.fixed_betas


def make_schedule(kind: str | ScheduleKind, T: int, beta_1: float | None = None) -> Schedule:
    """Build a schedule by name; ``beta_1`` overrides the first step (the bound's resolution)."""
    kind = ScheduleKind(kind)
    if T < 2:
        raise ValueError(f"T must be at least 2, got {T}")
    table = {
        ScheduleKind.REFERENCE: reference_betas,
        ScheduleKind.LEARNED: reference_betas,
        ScheduleKind.LINEAR: linear_betas,
        ScheduleKind.COSINE: cosine_betas,
        ScheduleKind.ERASE: erase_betas,
    }
    if beta_1 is not None and not 0 < beta_1 < 1:
        raise ValueError(f"beta_1 must lie in (0, 1), got {beta_1}")
    if kind is ScheduleKind.LOG_SNR:  # beta_1 sets where the whole table starts
        betas = log_snr_betas(T, LOG_SNR_BETA_1 if beta_1 is None else beta_1)
    else:
        betas = table[kind](T)
        if beta_1 is not None:
            betas[0] = beta_1
    return Schedule(betas, learn=kind is ScheduleKind.LEARNED)


def monotone_cubic(knots: Tensor, u: Tensor) -> Tensor:
    """The monotone piecewise-cubic Hermite interpolant of ``knots`` (values at u = 0, 1, ..., n - 1)
    at ``u`` (float64): Fritsch and Butland's slopes, the harmonic mean of the neighbouring secants
    where they agree in sign and 0 where they do not (Fritsch and Carlson 1980, SIAM J. Numer. Anal.
    17), so the curve passes through every knot, has a continuous derivative, and never turns back
    between monotone knots. It gives a discrete table a continuous time (see
    GaussianDiffusion.continuous_log_alpha_bar)."""
    secants = torch.diff(knots)
    left, right = secants[:-1], secants[1:]
    agree = left * right > 0
    inner = torch.where(agree, 2 * left * right / torch.where(agree, left + right, torch.ones_like(left)), 0.0)
    slopes = torch.cat([secants[:1], inner, secants[-1:]])
    k = u.double().floor().clamp(0, len(knots) - 2).long()
    h = u.double() - k
    return ((2 * h**3 - 3 * h**2 + 1) * knots[k] + (h**3 - 2 * h**2 + h) * slopes[k]
            + (3 * h**2 - 2 * h**3) * knots[k + 1] + (h**3 - h**2) * slopes[k + 1])


def invert_increasing(f, y: Tensor, low: float, high: float, rounds: int = 5, points: int = 256) -> Tensor:
    """The u in [low, high] at which the increasing function ``f`` (vectorised over float64 u)
    equals ``y`` (0-d): ``rounds`` times, the bracket split into ``points`` intervals and the one
    holding y kept (to 256^-5 ~ 1e-12 of the interval by default, in 5 calls of f): a continuous
    time for a noise level."""
    for _ in range(rounds):
        grid = torch.linspace(low, high, points + 1, dtype=torch.float64, device=y.device)
        k = int(torch.searchsorted(f(grid), y.reshape(1)).clamp(1, points))
        low, high = float(grid[k - 1]), float(grid[k])
    return torch.tensor((low + high) / 2, dtype=torch.float64, device=y.device)
