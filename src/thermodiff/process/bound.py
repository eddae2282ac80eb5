"""The variational lower bound K on log-likelihood (paper Eq. 14), assembled from the terms
that a diffusion process provides, VDM-style:

    K = - KL(q(x_T|x_0) || p(x_T))                                  prior term
        - sum_{t=2..T} E_q KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))  diffusion terms
        + E_q log p(x_0 | x_1)                                        decoder term

With the paper's decoder (the forward step reversed, App. B.2) this is Eq. 14 with H_p(X_T)
read as the cross-entropy E_q[-log p(x_T)], plus log pi(x_0) - E log pi(x_1); both corrections
vanish on average over unit-variance data, where Eq. 14 and this bound agree. Written this way
K is a true lower bound for every single example, held-out ones included.

The terms are those of the process contract (:class:`thermodiff.process.contract.Process`), each per
example in nats. :class:`DiscreteTimeProcess` is the contract's training side for processes of T
discrete steps (gaussian.py, binomial.py): a one-t estimate of the bound.

Training may instead minimise Ho et al.'s L_simple or Nichol & Dhariwal's hybrid loss
(:class:`TrainingLoss`), and draw t by importance (:class:`LossAwareSampler`); the evaluated K
is always :func:`exact_bound`, whatever the training loss.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor, nn

from thermodiff.process.contract import Decoder, Process
from thermodiff.process.tensors import LN2


def standard_error(x: Tensor, unit: float = 1.0) -> float | None:
    """Standard error of the mean of ``x``, in ``unit``s (LN2: nats to bits); None, undefined,
    for fewer than 2 values (reports say so rather than print NaN)."""
    return float(x.std(unbiased=True) / math.sqrt(len(x))) / unit if len(x) > 1 else None


class TSampling(str, Enum):
    """How a sampled estimate of the bound (``eval.t_sampling``) draws each stratum's step."""

    UNIFORM = "uniform"  # equal strata of 2..T, t uniform in each
    IMPORTANCE = "importance"  # strata of equal pilot mass, t in proportion to the pilot (:func:`importance_strata`)


@dataclass
class BoundEstimate:
    """K per example (nats) and the mean loss of each term over examples.

    ``terms[0]`` is -E log p(x_0|x_1), ``terms[t - 1]`` the KL at t = 2..T, ``terms[T]`` the
    prior KL; K = -sum(terms) on average. All float64.
    """

    per_example: Tensor
    terms: Tensor
    n_draws: int
    t_samples: int | None = None  # steps sampled per example (stratified), or None: every step summed
    t_sampling: TSampling | None = None  # how the sampled steps were drawn (None: none were)

    @property
    def mean(self) -> float:
        return float(self.per_example.mean())

    @property
    def stderr(self) -> float | None:
        """Standard error of the mean over examples (each example's value is itself an unbiased
        noisy estimate, so this covers both data and noise-draw variability)."""
        return standard_error(self.per_example)


#: lambda of the hybrid losses: Nichol & Dhariwal's L_simple + lambda L_vlb (their Eq. 16), and D3PM's
#: L_vb + lambda L_ce (Austin et al. 2021, Eq. 5; 0.001 is their CIFAR-10 value)
HYBRID_LAMBDA = 1e-3


class TrainingLoss(str, Enum):
    """What training minimises; K is what evaluation reports, whatever this is."""

    BOUND = "bound"  # -K (paper Eq. 14), one-t estimate
    SIMPLE = "simple"  # L_simple, noise-prediction error (Ho et al. 2020, Eq. 14); needs an eps parameterisation
    # the hybrid loss of the process's literature: for Gaussian diffusion L_simple + lambda L_vlb
    # (Nichol & Dhariwal 2021, Eq. 16; needs eps_learned_var), for categorical diffusion -K + lambda
    # times the cross-entropy of the network's x_0 prediction (Austin et al. 2021, D3PM, Eq. 5)
    HYBRID = "hybrid"


class LossAwareSampler(nn.Module):
    """Importance sampling of t for the bound (Nichol & Dhariwal 2021, section 3.3): p_t
    proportional to sqrt(E[L_t^2]), mixed with 0.1% of the uniform, and uniform until every t
    has been seen ``warmup`` times. E[L_t^2] is a moving average over batches (improved-diffusion
    keeps the last 10 values instead), so that data-parallel processes can pool it by a sum.
    Given to a process as its ``t_sampler`` it is a submodule, saved and restored with it."""

    def __init__(self, T: int, warmup: int = 10, decay: float = 0.9, uniform: float = 1e-3):
        super().__init__()
        self.warmup, self.decay, self.uniform = warmup, decay, uniform
        # float64 buffers (not integer counts), so weight averaging (EMA) keeps them
        self.register_buffer("second_moment", torch.zeros(T - 1, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(T - 1, dtype=torch.float64))

    def probs(self) -> Tensor:
        """p_t for t = 2..T."""
        uniform = torch.full_like(self.seen, 1 / len(self.seen))
        if bool((self.seen < self.warmup).any()):
            return uniform
        p = self.second_moment.sqrt()
        return (1 - self.uniform) * p / p.sum() + self.uniform * uniform

    @torch.no_grad()
    def update(self, t: Tensor, losses: Tensor) -> None:
        """Fold the per-example terms L_t of one batch (summed over data-parallel processes) into E[L_t^2]."""
        ok = torch.isfinite(losses)
        stats = torch.zeros(2, len(self.seen), dtype=torch.float64, device=self.seen.device)
        stats[0].index_add_(0, t[ok] - 2, losses[ok].double() ** 2)
        stats[1].index_add_(0, t[ok] - 2, torch.ones_like(losses[ok], dtype=torch.float64))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        hit = stats[1] > 0
        mean = stats[0] / stats[1].clamp_min(1)
        rate = torch.where(self.seen > 0, 1 - self.decay, 1.0)
        moved = self.second_moment + rate * (mean - self.second_moment)
        self.second_moment.copy_(torch.where(hit, moved, self.second_moment))
        self.seen.add_(stats[1])


@dataclass
class TrainingDraws:
    """The randomness of one training step: t in {2..T} per example with its importance weight
    1 / p_t (T - 1 for uniform t), and the noise that draws x_t and x_1. Drawn for a whole global
    batch and sliced per process, data-parallel training sees exactly the draws of a single process."""

    t: Tensor
    weight: Tensor
    noise_t: Tensor
    noise_1: Tensor

    def __getitem__(self, index) -> "TrainingDraws":
        return TrainingDraws(self.t[index], self.weight[index], self.noise_t[index], self.noise_1[index])


def training_draws(diffusion: "DiscreteTimeProcess", x0: Tensor, generator: torch.Generator | None = None
                   ) -> TrainingDraws:
    """t uniform on {2..T}, or from ``diffusion.t_sampler`` when it has one."""
    sampler = diffusion.t_sampler
    if sampler is None:
        t = torch.randint(2, diffusion.T + 1, (len(x0),), generator=generator, device=x0.device)
        weight = torch.full((len(x0),), float(diffusion.T - 1), dtype=torch.float64, device=x0.device)
    else:
        p = sampler.probs()
        index = torch.multinomial(p, len(x0), replacement=True, generator=generator)
        t, weight = index + 2, 1 / p[index]
    return TrainingDraws(t, weight, diffusion.noise_like(x0, generator), diffusion.noise_like(x0, generator))


def training_loss(diffusion: "DiscreteTimeProcess", model, x0: Tensor, generator: torch.Generator | None = None,
                  draws: TrainingDraws | None = None, loss: TrainingLoss | str = TrainingLoss.BOUND,
                  hybrid_lambda: float = HYBRID_LAMBDA) -> tuple[Tensor, Tensor]:
    """The training loss from one t per example, and an unbiased one-draw estimate of K.

    The loss is -K (paper Eq. 14), L_simple (Ho et al. 2020, Eq. 14) or L_simple + lambda L_vlb
    (Nichol & Dhariwal 2021, Eq. 16), as ``loss`` says (:class:`TrainingLoss`). K's diffusion
    terms are weighted by 1 / p_t (T - 1 for uniform t; the reference code draws one t per batch
    and weights it by T, T/(T-1) too much). Under grad, the terms update the process's ``t_sampler``.
    Returns (loss, K_estimate): the loss differentiable in the model (and a learned schedule, for
    the bound); K_estimate per example in nats, detached, float64.
    """
    loss = diffusion.check_loss(loss)
    d = training_draws(diffusion, x0, generator) if draws is None else draws
    if loss is TrainingLoss.BOUND:
        kl = diffusion.reverse_kl(model, x0, d.t, noise=d.noise_t)
        k = diffusion.decoder_log_likelihood(model, x0, noise=d.noise_1) - d.weight * kl - diffusion.prior_kl(x0)
        objective = -k.mean()
    else:
        # one network call per draw; the bound's terms see its output with the mean's part
        # frozen (improved-diffusion's stop-gradient): only the variance learns from L_vlb
        kl, sq_err = _frozen_mean_terms(diffusion, model, x0, d.t, d.noise_t)
        if diffusion.decoder is Decoder.FORWARD:  # no network at t = 1
            nll_1, sq_err_1 = -diffusion.decoder_log_likelihood(model, x0), torch.zeros_like(sq_err)
        else:
            nll_1, sq_err_1 = _frozen_mean_terms(diffusion, model, x0, torch.ones_like(d.t), d.noise_1)
        k = -nll_1 - d.weight * kl - diffusion.prior_kl(x0)
        # Ho et al.'s L_simple: t uniform on 1..T, here t = 1 always and t >= 2 by importance
        objective = ((sq_err_1 + d.weight * sq_err) / diffusion.T).mean()
        if loss is TrainingLoss.HYBRID:  # L_vlb in bits per dimension, as improved-diffusion's
            objective = objective - hybrid_lambda * k.mean() / (x0[0].numel() * LN2)
    if diffusion.t_sampler is not None and torch.is_grad_enabled():
        diffusion.t_sampler.update(d.t, kl.detach())
    return objective, k.detach()


def _frozen_mean_terms(diffusion, model, x0: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """From one draw of x_t (t all >= 2, or all 1): the bound's term (the KL, or at t = 1
    -log p(x_0|x_1)) with the mean's network output z[:, 0] detached, and the squared error of the
    noise prediction per dimension, ||eps - z[:, 0]||^2 / D (the noise is standard normal)."""
    x_t = diffusion.q_sample(x0, t, noise=noise)
    z = model(x_t, t)
    frozen = torch.stack([z[:, 0].detach(), z[:, 1]], 1)
    if bool((t == 1).all()):
        term = -diffusion.decoder_log_likelihood(lambda *_: frozen, x0, noise=noise)
    else:
        term = diffusion.reverse_kl(lambda *_: frozen, x0, t, noise=noise)
    return term, ((noise - z[:, 0].double()) ** 2).flatten(1).mean(1)


class DiscreteTimeProcess(Process):
    """The training side of the process contract for a process of T discrete steps: a one-t
    estimate of its bound (:func:`training_loss`), with t uniform on 2..T or drawn by a
    :class:`LossAwareSampler` (``t_sampler``), minimising the :class:`TrainingLoss` ``loss``.
    A subclass's constructor sets them last, with :meth:`init_training`, as the losses it accepts
    may depend on its other settings (:meth:`check_noise_loss`)."""

    def init_training(self, t_sampler: LossAwareSampler | None, loss: TrainingLoss | str,
                      hybrid_lambda: float = HYBRID_LAMBDA) -> None:
        if t_sampler is not None and len(t_sampler.seen) != self.T - 1:
            raise ValueError(f"the t sampler draws from {len(t_sampler.seen)} steps, not T - 1 = {self.T - 1}")
        self.t_sampler = t_sampler
        self.loss = self.check_loss(loss)
        self.hybrid_lambda = hybrid_lambda

    def check_loss(self, loss: TrainingLoss | str) -> TrainingLoss:
        """``loss`` as a :class:`TrainingLoss`, if this process can be trained on it (ValueError otherwise)."""
        if loss not in set(TrainingLoss):
            raise ValueError(f"train.loss must be one of {', '.join(v.value for v in TrainingLoss)}, got {loss!r}")
        loss = TrainingLoss(loss)
        if loss is not TrainingLoss.BOUND:
            self.check_noise_loss(loss)
        return loss

    def check_noise_loss(self, loss: TrainingLoss) -> None:
        """Refuse ``loss``, SIMPLE or HYBRID, unless the process's network predicts Gaussian noise
        (ValueError; GaussianDiffusion says when it does, CategoricalDiffusion has its own hybrid)."""
        raise ValueError(f"the {loss.value!r} loss trains a prediction of Gaussian noise; a {type(self).__name__} "
                         "trains on the 'bound'")

    def training_draws(self, x0: Tensor, generator: torch.Generator | None = None) -> TrainingDraws:
        return training_draws(self, x0, generator)

    def training_loss(self, model, x0: Tensor, draws: TrainingDraws) -> tuple[Tensor, Tensor]:
        return training_loss(self, model, x0, draws=draws, loss=self.loss, hybrid_lambda=self.hybrid_lambda)


@dataclass(frozen=True)
class Stratum:
    """Contiguous diffusion steps, one of which an example draws: uniformly (``probs`` None), or
    with ``probs``; the drawn step's term is weighted by 1 / its probability."""

    steps: Tensor
    probs: Tensor | None = None

    def draw(self, n: int, generator: torch.Generator | None, device) -> tuple[Tensor, Tensor]:
        """``n`` steps and their weights."""
        if self.probs is None:
            t = self.steps.to(device)[torch.randint(len(self.steps), (n,), generator=generator, device=device)]
            return t, torch.full((n,), float(len(self.steps)), dtype=torch.float64)
        probs = self.probs.to(device)  # drawn where the generator is (the examples' device)
        index = torch.multinomial(probs, n, replacement=True, generator=generator)
        return self.steps.to(device)[index], (1 / probs[index]).cpu()


def strata(T: int, t_samples: int | None) -> list[Stratum]:
    """The diffusion steps 2..T in ``t_samples`` contiguous strata of (nearly) equal size, or one
    stratum per step (None, or at least T - 1 samples: the exact sum)."""
    steps = torch.arange(2, T + 1)
    k = T - 1 if t_samples is None else min(t_samples, T - 1)
    return [Stratum(group) for group in torch.tensor_split(steps, k)]


def importance_strata(profile: Tensor, t_samples: int) -> list[Stratum]:
    """The steps 2..T (``profile``: a positive guess at each one's term, in order) in at most
    ``t_samples`` contiguous strata, each step drawn within its stratum in proportion to the profile:
    stratified importance sampling. A step heavier than a stratum's share (at most
    (t_samples - 1) // 2 of them, the heaviest) is a stratum of its own, summed in every example; the
    others are cut into strata of equal mass with what is left. The estimate stays unbiased for any
    positive profile, and is exact for an example whose terms are proportional to it."""
    if t_samples >= len(profile):
        return strata(len(profile) + 1, None)
    profile = profile.double()
    heavy = torch.zeros(len(profile), dtype=torch.bool)
    heaviest = profile.argsort(descending=True)[:(t_samples - 1) // 2]
    heavy[heaviest[profile[heaviest] >= profile.sum() / t_samples]] = True
    light = torch.where(heavy, 0.0, profile)
    n_light = t_samples - 2 * int(heavy.sum())  # each heavy step may cut a light stratum in two
    levels = torch.arange(1, n_light, dtype=torch.float64) / n_light
    index = heavy.nonzero()[:, 0]
    ends = torch.cat([torch.searchsorted(light.cumsum(0) / light.sum(), levels) + 1, index, index + 1]).unique()
    ends = ends[(ends > 0) & (ends < len(profile))]
    steps = torch.arange(2, len(profile) + 2)
    return [Stratum(group, weights / weights.sum())
            for group, weights in zip(torch.tensor_split(steps, ends), torch.tensor_split(profile, ends))]


#: the pilot of an importance-sampled bound: examples of the first batch, and steps it scores
PILOT_EXAMPLES, PILOT_STEPS = 8, 200


def term_profile(diffusion, model, x0: Tensor, generator: torch.Generator | None = None,
                 n_steps: int = PILOT_STEPS) -> Tensor:
    """A pilot for :func:`importance_strata`: the mean diffusion term over ``x0`` at ``n_steps``
    steps evenly spaced over 2..T (both ends included), interpolated linearly in its logarithm
    to every step, and floored at a millionth of its largest value (so that no step is left out)."""
    T = diffusion.T
    grid = torch.linspace(2, T, min(n_steps, T - 1)).round().long().unique()
    terms = torch.stack([diffusion.reverse_kl(model, x0, t.expand(len(x0)).to(x0.device), generator).double().mean()
                         for t in grid]).cpu()
    terms = terms.clamp_min(float(terms.max()) * 1e-6 if float(terms.max()) > 0 else 1.0)
    profile = _interpolate(torch.arange(2, T + 1, dtype=torch.float64), grid.double(), terms.log())
    return profile.exp()


def _interpolate(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x (xp increasing), as numpy.interp."""
    index = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[index - 1], xp[index], fp[index - 1], fp[index]
    return f0 + (f1 - f0) * ((x - x0) / (x1 - x0)).clamp(0, 1)


@torch.no_grad()
def exact_bound(
    diffusion,
    model,
    batches: Iterable[Tensor],
    n_draws: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
    t_samples: int | None = None,
    t_sampling: TSampling | str = TSampling.UNIFORM,
) -> BoundEstimate:
    """K on every example of ``batches``: the prior and decoder terms, and the T - 1 diffusion
    terms summed over every t (each averaged over ``n_draws`` draws of x_t) rather than sampled.

    With ``t_samples`` = k < T - 1, the diffusion terms are instead estimated without bias from k
    steps per example, one drawn uniformly in each of k equal strata of 2..T (:func:`strata`) and
    weighted by its stratum's size: k / (T - 1) of the cost, with the sampling of t adding to each
    example's variance (and so to the standard error over examples). ``terms`` then holds each
    step's mean over the examples that drew it. ``t_sampling`` "importance" draws them instead
    from :func:`importance_strata` of a pilot (:func:`term_profile` of the first batch's first
    :data:`PILOT_EXAMPLES` examples; its cost is not in the callback's count). ``callback(done,
    total)`` reports progress in network calls per example over all batches."""
    if n_draws < 1:
        raise ValueError("n_draws must be at least 1")
    T = diffusion.T
    batches, groups = list(batches), strata(T, t_samples)
    importance = TSampling(t_sampling) is TSampling.IMPORTANCE and len(groups) < T - 1
    if importance and batches:
        groups = importance_strata(term_profile(diffusion, model, batches[0][:PILOT_EXAMPLES], generator), len(groups))
    drawn = None if len(groups) == T - 1 else TSampling.IMPORTANCE if importance else TSampling.UNIFORM
    total = len(batches) * (len(groups) + 1)
    per_example, term_sums, term_counts = [], torch.zeros(T + 1, dtype=torch.float64), torch.zeros(T + 1, dtype=torch.float64)
    for b, x0 in enumerate(batches):
        n = len(x0)
        prior = diffusion.prior_kl(x0).cpu().double()
        nll_1 = sum(-diffusion.decoder_log_likelihood(model, x0, generator).cpu().double() for _ in range(n_draws)) / n_draws
        loss = prior + nll_1  # -K per example, the diffusion terms added below
        term_sums[0] += nll_1.sum()
        term_sums[T] += prior.sum()
        term_counts[[0, T]] += n
        for j, group in enumerate(groups):
            if len(group.steps) == 1:  # every example at this step
                t, weight = group.steps.expand(n).to(x0.device), torch.ones(n, dtype=torch.float64)
            else:
                t, weight = group.draw(n, generator, x0.device)
            kl = sum(diffusion.reverse_kl(model, x0, t, generator) for _ in range(n_draws)).cpu().double() / n_draws
            loss += weight * kl
            term_sums.index_add_(0, t.cpu() - 1, kl)
            term_counts.index_add_(0, t.cpu() - 1, torch.ones(n, dtype=torch.float64))
            if callback is not None:
                callback(b * (len(groups) + 1) + j + 1, total)
        per_example.append(-loss)
        if callback is not None:
            callback((b + 1) * (len(groups) + 1), total)
    return BoundEstimate(per_example=torch.cat(per_example), terms=term_sums / term_counts.clamp_min(1),
                         n_draws=n_draws, t_samples=None if len(groups) == T - 1 else len(groups),
                         t_sampling=drawn)
