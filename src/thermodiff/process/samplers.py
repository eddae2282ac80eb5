"""Deterministic and fast samplers for chains of Gaussian kernels, k-diffusion style: small pure
functions of one signature, ``sampler(denoiser, x, log_abar, generator, callback)``.

- ``denoiser(x_k, k) -> x0_hat``: E[x_0 | x_k] at the chain's step k = 1..K (float64), one network
  call (a process's :meth:`~thermodiff.process.contract.Trainable.expected_x0`, see :func:`denoiser_of`).
- ``log_abar``: log abar_k, k = 1..K (float64), the chain's noise levels, x_k = sqrt(abar_k) x_0 +
  sqrt(1 - abar_k) eps. Any subsequence of a trained chain's steps is a chain of its own
  (respace.py), so the samplers run on fewer steps by running on a respaced process.
- ``x``: the state at step K (a draw of the prior N(0, I)); each returns x_0.
- ``callback(k, x_k)``: every state, k = K..0, as :func:`~thermodiff.process.sampling.ancestral_sample`'s.

Every sampler ends at the model's mean of x_0 given x_1, x_0 = x0_hat(x_1, 1): DDIM's last step
(Song et al. 2021, sigma_1 = 0 as abar_0 = 1) and the ODE's last Euler step to noise level zero
(Karras et al. 2022, Alg. 1) alike. The ancestral sampler instead draws x_0 from the decoder
p(x_0 | x_1) around that mean.
"""

from collections.abc import Callable
from enum import Enum

import torch
from torch import Tensor

from thermodiff.errors import UserError
from thermodiff.process.contract import Process
from thermodiff.process.sampling import ancestral_sample

Denoiser = Callable[[Tensor, int], Tensor]


class Sampler(str, Enum):
    """How ``thermodiff sample --sampler`` draws (every one on the run's chain or a respaced one)."""

    ANCESTRAL = "ancestral"  # the reverse chain's kernels (sampling.ancestral_sample), K network calls
    DDIM = "ddim"  # sample_ddim, K network calls
    HEUN = "heun"  # sample_heun, 2 K - 1 network calls
    DPM_SOLVER_2M = "dpm2m"  # sample_dpm_solver_2m, K network calls


def ddim_step(x: Tensor, x0: Tensor, log_abar_t: Tensor, log_abar_s: Tensor, eta: float,
              generator: torch.Generator | None) -> Tensor:
    """x_s from x_t for s < t given x0_hat (Song et al. 2021, Eq. 12): with eps_hat = (x_t -
    sqrt(abar_t) x0_hat) / sqrt(1 - abar_t), x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2)
    eps_hat + sigma z, sigma^2 = eta^2 (1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s) (Eq. 16):
    eta = 0 is deterministic, eta = 1 draws from q(x_s | x_t, x_0 = x0_hat), the posterior of the
    step from s to t. Float64."""
    one_minus_t, one_minus_s = -torch.expm1(log_abar_t), -torch.expm1(log_abar_s)
    eps = (x - (0.5 * log_abar_t).exp() * x0) / one_minus_t.sqrt()
    var = eta**2 * one_minus_s / one_minus_t * -torch.expm1(log_abar_t - log_abar_s)
    x_s = (0.5 * log_abar_s).exp() * x0 + (one_minus_s - var).sqrt() * eps
    if eta > 0:
        x_s = x_s + var.sqrt() * torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)
    return x_s


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: Tensor, log_abar: Tensor, generator: torch.Generator | None = None,
                callback: Callable[[int, Tensor], None] | None = None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021) from x_K to x_0 over the chain's K steps (:func:`ddim_step`), then
    x_0 = x0_hat(x_1). One network call per step. eta = 0 is Euler's method on the probability-flow
    ODE in x / sqrt(abar) against sigma = sqrt((1 - abar) / abar) (Karras et al. 2022, sec. 4); with
    eta = 1 and a kernel variance of beta-tilde the states x_K..x_1 are the ancestral sampler's
    (the noise drawn in the same order). Every state in x's dtype, as the ancestral sampler's."""
    for k in range(len(log_abar), 1, -1):
        if callback is not None:
            callback(k, x)
        x = ddim_step(x.double(), denoiser(x, k), log_abar[k - 1], log_abar[k - 2], eta, generator).to(x.dtype)
    if callback is not None:
        callback(1, x)
    x = denoiser(x, 1).to(x.dtype)
    if callback is not None:
        callback(0, x)
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: Tensor, log_abar: Tensor, generator: torch.Generator | None = None,
                callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1, no churn):
    in y = x / sqrt(abar) and sigma = sqrt((1 - abar) / abar) the ODE is dy/dsigma = (y - x0_hat) /
    sigma; each step from sigma_k to sigma_{k-1} averages its slope at both ends, the end's taken at
    an Euler step; the last, to sigma_0 = 0, is Euler's, y_0 = x0_hat(x_1). 2 K - 1 network calls.
    Deterministic (``generator`` unused); states in x's dtype, the ODE carried in float64."""
    sigma = torch.expm1(-log_abar).sqrt()
    scale = (0.5 * log_abar).exp()

    def slope(y: Tensor, k: int) -> Tensor:
        return (y - denoiser((scale[k - 1] * y).to(x.dtype), k)) / sigma[k - 1]

    y = x.double() / scale[-1]
    for k in range(len(log_abar), 1, -1):
        if callback is not None:
            callback(k, (scale[k - 1] * y).to(x.dtype))
        h = sigma[k - 2] - sigma[k - 1]
        d = slope(y, k)
        y = y + h * (d + slope(y + h * d, k - 1)) / 2
    # the last step, Euler's to sigma = 0, is DDIM's last: x_0 = x0_hat(x_1)
    return sample_ddim(denoiser, (scale[0] * y).to(x.dtype), log_abar[:1], generator, callback)


@torch.no_grad()
def sample_dpm_solver_2m(denoiser: Denoiser, x: Tensor, log_abar: Tensor, generator: torch.Generator | None = None,
                         callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2; k-diffusion's ``sample_dpmpp_2m``):
    the probability-flow ODE solved exactly in its linear part, in y = x / sqrt(abar) and the
    half-log-SNR lambda = -log sigma, y_{k-1} = (sigma_{k-1} / sigma_k) y_k - expm1(-h) D with
    h = lambda_{k-1} - lambda_k, and D the network's x0_hat extrapolated linearly in lambda from this
    step and the one before (D = (1 + 1 / 2r) x0_hat_k - x0_hat_{k+1} / 2r, r = h_previous / h): second
    order at one network call per step. The first step, with no previous x0_hat, is DDIM's (to which
    the update reduces with D = x0_hat_k); the last, to sigma_0 = 0, is x_0 = x0_hat(x_1) as every
    sampler's. K network calls; deterministic (``generator`` unused)."""
    sigma = torch.expm1(-log_abar).sqrt()
    scale = (0.5 * log_abar).exp()
    y, previous = x.double() / scale[-1], None
    for k in range(len(log_abar), 1, -1):
        if callback is not None:
            callback(k, (scale[k - 1] * y).to(x.dtype))
        x0 = denoiser((scale[k - 1] * y).to(x.dtype), k).double()
        h = torch.log(sigma[k - 1] / sigma[k - 2])
        d = x0
        if previous is not None:
            r = torch.log(sigma[k] / sigma[k - 1]) / h
            d = (1 + 1 / (2 * r)) * x0 - previous / (2 * r)
        y = sigma[k - 2] / sigma[k - 1] * y - torch.expm1(-h) * d
        previous = x0
    return sample_ddim(denoiser, (scale[0] * y).to(x.dtype), log_abar[:1], generator, callback)


def karras_timesteps(log_abar: Tensor, count: int, rho: float = 7.0) -> list[int]:
    """The steps (1-based, from 1 to T) of a chain with levels ``log_abar`` nearest, in log sigma, to
    Karras et al.'s ``count`` noise levels (2022, Eq. 5) sigma_i = (sigma_T^(1/rho) + i / (count - 1)
    (sigma_1^(1/rho) - sigma_T^(1/rho)))^rho, sigma = sqrt((1 - abar) / abar): steps fine where the
    noise is low, which second-order ODE solvers need (a step that coincides with its neighbour's is
    kept once, so there may be fewer than ``count``)."""
    log_sigma = 0.5 * torch.log(torch.expm1(-log_abar.double()))
    ramp = torch.linspace(0, 1, count, dtype=torch.float64)
    ends = (log_sigma[-1] / rho).exp(), (log_sigma[0] / rho).exp()
    target = rho * torch.log(ends[0] + ramp * (ends[1] - ends[0]))
    nearest = (log_sigma[None, :] - target[:, None]).abs().argmin(1) + 1
    return sorted({1, len(log_abar), *nearest.tolist()})


class CountingModel:
    """A network that counts its calls (``calls``), for comparing samplers at equal network calls;
    its other attributes are the network's (a VAE's ``decode``, not counted)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.model(x_t, t)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def checked_sampler(diffusion: Process, sampler: Sampler | str, eta: float | None) -> tuple[Sampler, float]:
    """A user's ``--sampler`` and ``--eta`` checked against the chain they sample (a one-line
    :class:`UserError` otherwise): the sampler and DDIM's eta (0 unless given)."""
    sampler = Sampler(sampler)
    if eta is not None and sampler is not Sampler.DDIM:
        raise UserError(f"--eta is DDIM's noise; pass --sampler ddim with it, not --sampler {sampler.value}")
    if sampler is not Sampler.ANCESTRAL:
        try:
            diffusion.log_alphas_cumprod()  # what the other samplers need: Gaussian kernels
        except ValueError as e:
            raise UserError(f"--sampler {sampler.value}: {e}") from None
    return sampler, 0.0 if eta is None else eta


def denoiser_of(diffusion: Process, model) -> Denoiser:
    """The process's network as a denoiser: its E[x_0 | x_k] (contract ``expected_x0``)."""
    return lambda x, k: diffusion.expected_x0(model, x, k)


@torch.no_grad()
def sample(diffusion: Process, model, shape: tuple[int, ...], generator: torch.Generator | None = None,
           device: torch.device | str | None = None, callback: Callable[[int, Tensor], None] | None = None,
           sampler: Sampler | str = Sampler.ANCESTRAL, eta: float = 0.0) -> Tensor:
    """Draws of ``shape`` from the chain ``diffusion`` (a respaced one for fewer steps) by ``sampler``,
    from x_K ~ p(x_K) drawn from ``generator`` (as :func:`ancestral_sample`, whose signature this
    extends); ``eta`` is DDIM's. A ValueError for a process without Gaussian kernels (but ancestral)."""
    sampler = Sampler(sampler)
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: the ancestral chain's noise), got {eta}")
    if sampler is Sampler.ANCESTRAL:
        return ancestral_sample(diffusion, model, shape, generator, device, callback)
    log_abar = diffusion.log_alphas_cumprod().detach()
    x = diffusion.sample_prior(shape, generator, device)
    if sampler is Sampler.DDIM:
        return sample_ddim(denoiser_of(diffusion, model), x, log_abar, generator, callback, eta)
    solver = sample_heun if sampler is Sampler.HEUN else sample_dpm_solver_2m
    return solver(denoiser_of(diffusion, model), x, log_abar, generator, callback)
