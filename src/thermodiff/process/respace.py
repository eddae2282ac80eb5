"""Respaced reverse chains: fewer steps than the network was trained with, for sampling and for
the bound (Nichol & Dhariwal 2021, section 4; improved-diffusion's respace.py).

A subsequence S = (s_1 = 1 < s_2 < ... < s_K = T) of the trained steps is itself a Gaussian
diffusion with K steps: abar'_k = abar_{s_k}, so beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}}, and
:func:`thermodiff.process.bound.exact_bound` evaluates its bound like any other's. The network is called
with the original t = s_k; its kernel there is turned into one for the longer step to s_{k-1}.

Every reparameterisation reads the same way. The true reverse kernel is the forward posterior
averaged over what x_t says about x_0: p(x_{t-1} | x_t) = E_{p(x_0|x_t)} q(x_{t-1} | x_t, x_0),
whose mean is c0_t E[x_0|x_t] + c_t x_t and whose variance is beta-tilde_t + c0_t^2 Var[x_0|x_t]
(:meth:`GaussianDiffusion.posterior_tables`), for any data. So the network's mean gives an x_0
estimate and its variance an x_0 variance (zero when the kernel is narrower than beta-tilde_t),
and the respaced kernel is the respaced posterior averaged over the same belief: mean
c0'_k x0 + c'_k x_t, variance beta-tilde'_k + c0'_k^2 Var x_0 (``VarianceRule.MOMENTS``). A kernel
with the true reverse moments at t gives the true reverse moments at every respaced step, and a
kernel trained on the bound learns exactly those moments. For the eps parameterisations the mean
is improved-diffusion's respacing (the x_0 of the predicted noise), and so is the variance for
beta-tilde; improved-diffusion instead keeps a variance's place v between log beta-tilde and log
beta (Nichol & Dhariwal's Eq. 15), beta_t going to beta'_k: ``VarianceRule.INTERPOLATE``, for
comparison.

A kept step whose predecessor is kept as well (always the first: beta'_1 = beta_1) skips nothing
and keeps the network's own kernel, the decoder included; the last (s_K = T) keeps the prior term.
With S = 1..T the chain is the original one.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from thermodiff.errors import UserError
from thermodiff.process.contract import Process
from thermodiff.process.gaussian import GaussianDiffusion, GaussianParameterization
from thermodiff.process.schedules import Schedule
from thermodiff.process.tensors import gather, per_example


class VarianceRule(str, Enum):
    """How a kernel's variance at t becomes one for a longer step (see the module's docstring)."""

    MOMENTS = "moments"  # the same belief about x_0 in the respaced posterior
    INTERPOLATE = "interpolate"  # improved-diffusion's: the same v between log beta-tilde and log beta
    FITTED = "fitted"  # per step, the constant variance that maximises the bound for the network's mean


@dataclass(frozen=True)
class VarianceFit:
    """What the FITTED rule is fitted on: the network, training data in model units (batches), the
    generator of the forward draws, and ``callback(done, total)`` for progress in network calls."""

    model: Callable
    batches: Sequence[Tensor]
    generator: torch.Generator | None = None
    callback: Callable[[int, int], None] | None = None


@torch.no_grad()
def fitted_x0_errors(diffusion: GaussianDiffusion, fit: VarianceFit, timesteps: Sequence[int]) -> Tensor:
    """E_q (x_0 - x0_hat(x_t))^2 per dimension at every step t of ``timesteps`` but the first (0
    there: the decoder keeps its own kernel), x_t ~ q(x_t | x_0) drawn once per example of
    ``fit.batches`` and x0_hat the network's E[x_0 | x_t] (float64, shape (len(timesteps),))."""
    errors = torch.zeros(len(timesteps), dtype=torch.float64)
    total, done = (len(timesteps) - 1) * len(fit.batches), 0
    for k, step in enumerate(timesteps[1:], start=1):
        squared, count = 0.0, 0
        for x0 in fit.batches:
            x_t = diffusion.q_sample(x0, torch.full((len(x0),), step, device=x0.device), fit.generator)
            squared += float(((x0.double() - diffusion.expected_x0(fit.model, x_t, step)) ** 2).sum())
            count += x0.numel()
            done += 1
            if fit.callback:
                fit.callback(done, total)
        errors[k] = squared / count
    return errors


def evenly_spaced(T: int, count: int) -> list[int]:
    """``count`` of the steps 1..T, evenly strided: exactly the steps of improved-diffusion's
    ``space_timesteps(T, [count])`` (one section), shifted to 1-based. Its fractional stride
    (T - 1) / (count - 1) is accumulated in floating point and rounded half to even, so this is
    not 1 + round(k (T - 1) / (count - 1)), which differs at a tie for some counts."""
    stride, position, steps = (T - 1) / (count - 1), 0.0, []
    for _ in range(count):
        steps.append(1 + round(position))
        position += stride
    return steps


def respaced_timesteps(T: int, spec: int | str | Sequence[int]) -> list[int]:
    """The kept steps (1-based, increasing, from 1 to T): ``N`` (or "N") for N steps evenly spaced
    (:func:`evenly_spaced`), or the steps themselves as a list or comma-separated ("1,10,20,40";
    unlike ``space_timesteps``, whose lists count steps per section)."""
    if isinstance(spec, str):
        try:
            spec = [int(s) for s in spec.split(",")] if "," in spec else int(spec)
        except ValueError:
            raise ValueError(f"respacing {spec!r}: expected a number of steps or a comma-separated list of steps") from None
    if isinstance(spec, int):
        if not 2 <= spec <= T:
            raise ValueError(f"respacing to {spec} steps: the number of steps must lie in 2..{T}")
        return evenly_spaced(T, spec)
    steps = [int(s) for s in spec]
    if len(steps) < 2 or steps[0] != 1 or steps[-1] != T or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"respaced steps {steps}: must increase from 1 to T = {T} (the decoder's and the prior's steps)")
    return steps


class RespacedDiffusion(GaussianDiffusion):
    """The chain on the trained steps ``timesteps`` of ``base``, with ``base``'s network."""

    def __init__(self, base: GaussianDiffusion, timesteps: Sequence[int],
                 variance_rule: VarianceRule | str = VarianceRule.MOMENTS, x0_errors: Tensor | None = None):
        """``x0_errors``: the FITTED rule's (:func:`fitted_x0_errors`), one per kept step."""
        steps = torch.as_tensor(respaced_timesteps(base.T, list(timesteps)))
        with torch.no_grad():
            log_abar = base.log_alphas_cumprod().cpu()[steps - 1]
        betas = -torch.expm1(torch.diff(log_abar, prepend=log_abar.new_zeros(1)))
        eps_variance = base.eps_variance if base.parameterization is GaussianParameterization.EPS else None
        super().__init__(Schedule(betas), base.parameterization, base.decoder, eps_variance, base.bins)
        self.base = base
        self.variance_rule = VarianceRule(variance_rule)
        if (self.variance_rule is VarianceRule.FITTED) != (x0_errors is not None):
            raise ValueError("the fitted variance rule, and only it, takes x0_errors (fitted_x0_errors)")
        if x0_errors is not None and x0_errors.shape != steps.shape:
            raise ValueError(f"x0_errors: one per kept step ({len(steps)}), got shape {tuple(x0_errors.shape)}")
        self.register_buffer("x0_errors", x0_errors)
        self.register_buffer("timesteps", steps)
        self.register_buffer("skips", torch.diff(steps, prepend=steps.new_zeros(1)) > 1)
        self.to(base.schedule.betas().device)

    def flow_gammas(self) -> tuple[float, float]:
        """None: the network's ODE is the full chain's (see GaussianDiffusion.flow_eps)."""
        raise ValueError("the probability-flow ODE is the trained chain's continuous-time limit; respacing does not apply")

    def p_mean_var(self, model, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The kernel that draws x_{s_{k-1}} from x_{s_k}, k = ``t`` (see the module's docstring)."""
        original = self.timesteps[t - 1]
        mean, var = self.base.p_mean_var(model, x_t, original)
        x_t = x_t.double()
        x0 = self.base.x0_from_posterior_mean(mean, x_t, original)
        respaced_mean, beta_tilde = self.q_posterior(x0, x_t, t)
        if self.variance_rule is VarianceRule.FITTED:
            fitted = beta_tilde + (gather(self.posterior_tables()[0], t, x_t) ** 2 * gather(self.x0_errors, t, x_t))
            decoder = per_example(t == 1, mean)
            return torch.where(decoder, mean, respaced_mean), torch.where(decoder, var, fitted)
        if self.variance_rule is VarianceRule.MOMENTS:
            c0, _, beta_tilde_t = (gather(table, original, x_t) for table in self.base.posterior_tables())
            x0_var = ((var - beta_tilde_t) / c0**2).clamp_min(0)
            respaced_var = beta_tilde + gather(self.posterior_tables()[0], t, x_t) ** 2 * x0_var
        else:
            respaced_var = self.interpolated_variance(self.base.variance_fraction(var, original), t)
        skips = gather(self.skips, t, mean)
        return torch.where(skips, respaced_mean, mean), torch.where(skips, respaced_var, var)


def respace(diffusion: Process, spec: int | str | Sequence[int], variance_rule: VarianceRule | str = VarianceRule.MOMENTS,
            fit: VarianceFit | None = None) -> Process:
    """``diffusion`` on the steps that ``spec`` names (see :func:`respaced_timesteps`): the
    process's own :meth:`~thermodiff.process.contract.Trainable.respaced` chain (a
    :class:`RespacedDiffusion` for discrete-time Gaussian diffusion, a VDM's exact chain on those
    times; a ValueError for the others), its variances fitted on ``fit`` for the FITTED rule."""
    return diffusion.respaced(respaced_timesteps(diffusion.T, spec), VarianceRule(variance_rule), fit)


def respaced_process(diffusion: Process, respace_to: int | str | Sequence[int] | None, flag: str = "--respace",
                     variance_rule: VarianceRule | str = VarianceRule.MOMENTS, fit: VarianceFit | None = None
                     ) -> Process:
    """The process a user's ``--respace`` (or ``flag``) and ``--variance`` ask for: ``diffusion``
    itself when None with the moments rule (for which all T steps are the chain itself), else its
    :func:`respace` (all T steps when None; a bad spec is a one-line :class:`UserError` naming ``flag``)."""
    rule = VarianceRule(variance_rule)
    if respace_to is None and rule is VarianceRule.MOMENTS:
        return diffusion
    try:
        return respace(diffusion, diffusion.T if respace_to is None else respace_to, rule, fit)
    except ValueError as e:
        raise UserError(f"{flag}: {e}") from None
