"""The variational lower bound K on log-likelihood (paper Eq. 14), assembled from the terms
that a diffusion process provides, VDM-style:

    K = - KL(q(x_T|x_0) || p(x_T))                                  prior term
        - sum_{t=2..T} E_q KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))  diffusion terms
        + E_q log p(x_0 | x_1)                                        decoder term

With the paper's decoder (the forward step reversed, App. B.2) this is Eq. 14 with H_p(X_T)
read as the cross-entropy E_q[-log p(x_T)], plus log pi(x_0) - E log pi(x_1); both corrections
vanish on average over unit-variance data, where Eq. 14 and this bound agree. Written this way
K is a true lower bound for every single example, held-out ones included.

A process object must provide ``T``, ``prior_kl(x0)``, ``reverse_kl(model, x0, t, generator)``
and ``decoder_log_likelihood(model, x0, generator)``, each per example in nats.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


def standard_error(x: Tensor) -> float:
    """Standard error of the mean of ``x`` (NaN for fewer than 2 values)."""
    return float(x.std(unbiased=True) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


@dataclass
class BoundEstimate:
    """K per example (nats) and the mean loss of each term over examples.

    ``terms[0]`` is -E log p(x_0|x_1), ``terms[t - 1]`` the KL at t = 2..T, ``terms[T]`` the
    prior KL; K = -sum(terms) on average. All float64.
    """

    per_example: Tensor
    terms: Tensor
    n_draws: int

    @property
    def mean(self) -> float:
        return float(self.per_example.mean())

    @property
    def stderr(self) -> float:
        """Standard error of the mean over examples (each example's value is itself an unbiased
        noisy estimate, so this covers both data and noise-draw variability)."""
        return standard_error(self.per_example)


@dataclass
class TrainingDraws:
    """The randomness of one training step: t ~ U{2..T} per example, and the noise that draws
    x_t and (for a learned decoder) x_1. Drawn for a whole global batch and sliced per process,
    data-parallel training sees exactly the draws of a single process."""

    t: Tensor
    noise_t: Tensor
    noise_1: Tensor

    def __getitem__(self, index) -> "TrainingDraws":
        return TrainingDraws(self.t[index], self.noise_t[index], self.noise_1[index])


def training_draws(diffusion, x0: Tensor, generator: torch.Generator | None = None) -> TrainingDraws:
    t = torch.randint(2, diffusion.T + 1, (len(x0),), generator=generator, device=x0.device)
    return TrainingDraws(t, diffusion.noise_like(x0, generator), diffusion.noise_like(x0, generator))


def training_loss(diffusion, model, x0: Tensor, generator: torch.Generator | None = None,
                  draws: TrainingDraws | None = None) -> tuple[Tensor, Tensor]:
    """Unbiased one-draw estimate of K per example, with one t ~ U{2..T} per example weighted
    by T - 1 (the reference code draws one t per batch and weights it by T, T/(T-1) too much).

    Returns (loss, K_estimate): loss = -mean K in nats, differentiable in the model and a
    learned schedule; K_estimate per example, detached, float64.
    """
    d = training_draws(diffusion, x0, generator) if draws is None else draws
    diffusion_terms = (diffusion.T - 1) * diffusion.reverse_kl(model, x0, d.t, noise=d.noise_t)
    decoder = diffusion.decoder_log_likelihood(model, x0, noise=d.noise_1)
    k = decoder - diffusion_terms - diffusion.prior_kl(x0)
    return -k.mean(), k.detach()


@torch.no_grad()
def exact_bound(
    diffusion,
    model,
    batches: Iterable[Tensor],
    n_draws: int = 1,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> BoundEstimate:
    """K on every example of ``batches``, summing all T - 1 diffusion terms (each averaged over
    ``n_draws`` draws of x_t) rather than sampling t. ``callback(done, total)`` reports progress
    in timesteps over all batches."""
    if n_draws < 1:
        raise ValueError("n_draws must be at least 1")
    T = diffusion.T
    batches = list(batches)
    total = len(batches) * T
    per_example, term_sums, count = [], torch.zeros(T + 1, dtype=torch.float64), 0
    for b, x0 in enumerate(batches):
        terms = torch.zeros(len(x0), T + 1, dtype=torch.float64, device=x0.device)
        terms[:, T] = diffusion.prior_kl(x0)
        for draw in range(n_draws):
            terms[:, 0] -= diffusion.decoder_log_likelihood(model, x0, generator) / n_draws
        for t in range(2, T + 1):
            tt = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
            for draw in range(n_draws):
                terms[:, t - 1] += diffusion.reverse_kl(model, x0, tt, generator) / n_draws
            if callback is not None:
                callback(b * T + t, total)
        per_example.append(-terms.sum(1).cpu())
        term_sums += terms.sum(0).cpu()
        count += len(x0)
    return BoundEstimate(per_example=torch.cat(per_example), terms=term_sums / count, n_draws=n_draws)
