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

Which steps to keep: ``N`` evenly strided, ``quadN`` quadratically spaced (dense near the data, as
DDIM's "quad" steps), or ``optimalN``, the N steps whose chain with fitted variances has the
highest expected bound. With fitted variances each step's expected KL has a closed
form in the step's two noise levels and the network's x_0 error (:func:`fitted_transition_kl`), so
the best subsequence of a grid of candidate steps is a shortest path, found exactly by dynamic
programming (:func:`cheapest_path`; Watson, Ho, Norouzi & Chan 2021, "Learning to Efficiently
Sample from Diffusion Probabilistic Models").
"""

import math
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


def quadratically_spaced(T: int, count: int) -> list[int]:
    """``count`` of the steps 1..T at 1 + (T - 1) (k / (count - 1))^2, k = 0 .. count - 1, rounded:
    dense near the data, as DDIM's "quad" steps (Song, Meng & Ermon 2021; theirs stop at 0.8 T, these
    reach T, the prior's step). Where rounding would repeat a step near t = 1, the next one up is
    kept instead (so ``count`` = T keeps every step)."""
    steps = []
    for k in range(count):
        step = 1 + round((T - 1) * (k / (count - 1)) ** 2)
        steps.append(max(step, steps[-1] + 1) if steps else step)
    return steps


#: the prefix of a respacing spec that asks for the bound-optimal steps ("optimal20")
OPTIMAL = "optimal"
#: the prefix of a respacing spec that asks for quadratically spaced steps ("quad20")
QUAD = "quad"
#: candidate steps that optimal spacing fits the x_0 error at and chooses among (T of them when T is smaller)
CANDIDATES = 128


def spacing_of(spec: int | str | Sequence[int] | None) -> str:
    """How a spec chooses its steps, for reports: "optimal" (``optimalN``), "quadratic"
    (``quadN``), "even" (N; None, all T) or "listed"."""
    if isinstance(spec, str) and spec.startswith(OPTIMAL):
        return "optimal"
    if isinstance(spec, str) and spec.startswith(QUAD):
        return "quadratic"
    listed = (isinstance(spec, Sequence) and not isinstance(spec, str)) or "," in str(spec)
    return "listed" if listed else "even"


def optimal_count(spec: int | str | Sequence[int]) -> int | None:
    """N of an ``optimalN`` spec, None for any other spec."""
    return _prefixed_count(spec, OPTIMAL) if spacing_of(spec) == "optimal" else None


def _prefixed_count(spec: str, prefix: str) -> int:
    """N of a spec ``prefix``N, such as "optimal20"."""
    try:
        return int(spec[len(prefix):])
    except ValueError:
        raise ValueError(f"respacing {spec!r}: expected {prefix}N, N the number of steps (e.g. {prefix}20)") from None


def candidate_steps(T: int, count: int) -> list[int]:
    """The steps optimal spacing chooses ``count`` of: all T when T <= :data:`CANDIDATES`, else
    half that many evenly strided, as many geometrically spaced (1, 2, 3, ... near the data,
    where each step's noise level changes fastest relative to itself) and the ``count`` evenly
    strided ones, so that the chosen chain is never worse than the even one on the fit's data."""
    even = respaced_timesteps(T, count)  # checks count
    if T <= CANDIDATES:
        return list(range(1, T + 1))
    geometric = torch.logspace(0, math.log10(T), CANDIDATES // 2, dtype=torch.float64).round().long().tolist()
    return sorted({*evenly_spaced(T, CANDIDATES // 2), *geometric, *even})


def fitted_transition_kl(log_abar_s: Tensor, log_abar_t: Tensor, x0_error: Tensor) -> Tensor:
    """E_q KL(q(x_s | x_t, x_0) || p(x_s | x_t)) per dimension (nats) of one step from t down to
    s < t, with the FITTED kernel: mean c0 x0_hat + c x_t, variance beta-tilde + c0^2 e, where e =
    E (x_0 - x0_hat)^2. Per dimension and residual r = x_0 - x0_hat the KL of the two Gaussians is
    (1/2)[log(v / beta-tilde) + (beta-tilde + c0^2 r^2) / v - 1]; its mean over r with v = beta-tilde
    + c0^2 e is (1/2) log(1 + c0^2 e / beta-tilde), and c0^2 / beta-tilde = SNR_s - SNR_t with SNR =
    abar / (1 - abar) (from posterior_tables' c0 and beta-tilde of the step abar_t / abar_s):
    (1/2) log(1 + (SNR_s - SNR_t) e). With beta-tilde for the variance it is (1/2)(SNR_s - SNR_t) e,
    VDM's discrete-time loss (Kingma et al. 2021, Eq. 13), never less: log(1 + u) <= u."""
    snr = lambda log_abar: torch.exp(log_abar) / -torch.expm1(log_abar)  # noqa: E731
    return 0.5 * torch.log1p((snr(log_abar_s) - snr(log_abar_t)) * x0_error)


def cheapest_path(costs: Tensor, count: int) -> list[int]:
    """The indices 0 = i_1 < i_2 < ... < i_count = M - 1 that minimise sum_k costs[i_k, i_{k+1}]
    (``costs[i, j]``: of the step from candidate j down to candidate i, M x M, infinite unless i < j),
    by dynamic programming over the number of steps taken: O(count M^2) (Watson et al. 2021)."""
    M = len(costs)
    if not 2 <= count <= M:
        raise ValueError(f"a path of {count} of {M} candidates: the count must lie in 2..{M}")
    best = torch.full((M,), math.inf, dtype=costs.dtype)
    best[0] = 0.0  # best[j]: the cheapest way from candidate 0 to j in the steps taken so far
    came_from = []
    for _ in range(count - 1):
        best, previous = (best[:, None] + costs).min(0)
        came_from.append(previous)
    path = [M - 1]
    for previous in reversed(came_from):
        path.append(int(previous[path[-1]]))
    return path[::-1]


def respaced_timesteps(T: int, spec: int | str | Sequence[int]) -> list[int]:
    """The kept steps (1-based, increasing, from 1 to T): ``N`` (or "N") for N steps evenly spaced
    (:func:`evenly_spaced`), "quadN" for N quadratically spaced (:func:`quadratically_spaced`), or
    the steps themselves as a list or comma-separated ("1,10,20,40"; unlike ``space_timesteps``,
    whose lists count steps per section)."""
    if spacing_of(spec) == "quadratic":
        return quadratically_spaced(T, _step_count(T, _prefixed_count(spec, QUAD)))
    if isinstance(spec, str):
        try:
            spec = [int(s) for s in spec.split(",")] if "," in spec else int(spec)
        except ValueError:
            raise ValueError(f"respacing {spec!r}: expected a number of steps or a comma-separated list of steps") from None
    if isinstance(spec, int):
        return evenly_spaced(T, _step_count(T, spec))
    steps = [int(s) for s in spec]
    if len(steps) < 2 or steps[0] != 1 or steps[-1] != T or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"respaced steps {steps}: must increase from 1 to T = {T} (the decoder's and the prior's steps)")
    return steps


def _step_count(T: int, count: int) -> int:
    if not 2 <= count <= T:
        raise ValueError(f"respacing to {count} steps: the number of steps must lie in 2..{T}")
    return count


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


def optimally_respaced(diffusion: Process, count: int, fit: VarianceFit | None) -> Process:
    """The chain of ``count`` steps with fitted variances whose expected bound on ``fit``'s data is
    the highest among :func:`candidate_steps`: the x_0 error fitted at every candidate, each
    step's expected KL (:func:`fitted_transition_kl`; the decoder's and the prior's terms are the
    same for every chain), and the cheapest path through them (:func:`cheapest_path`)."""
    candidates = candidate_steps(diffusion.T, count)
    grid = diffusion.respaced(candidates, VarianceRule.FITTED, fit)  # the fit; a VDM refuses here
    log_abar = diffusion.log_alphas_cumprod().detach().cpu()[torch.as_tensor(candidates) - 1]
    errors = grid.x0_errors.cpu()
    costs = fitted_transition_kl(log_abar[:, None], log_abar[None, :], errors[None, :])
    costs = costs.masked_fill(~torch.ones_like(costs, dtype=torch.bool).triu(1), math.inf)
    chosen = cheapest_path(costs, count)
    return RespacedDiffusion(diffusion, [candidates[i] for i in chosen], VarianceRule.FITTED, grid.x0_errors[chosen])


def respace(diffusion: Process, spec: int | str | Sequence[int], variance_rule: VarianceRule | str = VarianceRule.MOMENTS,
            fit: VarianceFit | None = None) -> Process:
    """``diffusion`` on the steps that ``spec`` names (see :func:`respaced_timesteps`): the
    process's own :meth:`~thermodiff.process.contract.Trainable.respaced` chain (a
    :class:`RespacedDiffusion` for discrete-time Gaussian diffusion, a VDM's exact chain on those
    times; a ValueError for the others), its variances fitted on ``fit`` for the FITTED rule.
    ``optimalN``: the N steps of :func:`optimally_respaced`, for the FITTED rule only."""
    rule, count = VarianceRule(variance_rule), optimal_count(spec)
    if count is None:
        return diffusion.respaced(respaced_timesteps(diffusion.T, spec), rule, fit)
    if rule is not VarianceRule.FITTED:
        raise ValueError(f"respacing {spec!r}: the optimal steps are those of the chain with fitted variances; "
                         f"use the fitted variance rule (--variance fitted) or N evenly spaced steps")
    return optimally_respaced(diffusion, count, fit)


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
