"""Closed-form log-densities, entropies and KL divergences, elementwise, in nats.

Everything here is independent of diffusion: these are the building blocks the
process objects combine into the paper's bound. Variances, not standard deviations,
are passed throughout; Bernoulli distributions are given by their probability of a 1.
"""

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_kl(mean_p: Tensor, var_p: Tensor, mean_q: Tensor, var_q: Tensor) -> Tensor:
    """KL( N(mean_p, var_p) || N(mean_q, var_q) ), elementwise."""
    return 0.5 * (torch.log(var_q) - torch.log(var_p) + (var_p + (mean_p - mean_q) ** 2) / var_q - 1.0)


def gaussian_entropy(var: Tensor) -> Tensor:
    """Differential entropy of N(., var), elementwise."""
    return 0.5 * (1.0 + LOG_2PI + torch.log(var))


def gaussian_log_prob(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """log N(x; mean, var), elementwise."""
    return -0.5 * (LOG_2PI + torch.log(var) + (x - mean) ** 2 / var)


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """log N(x; 0, 1), elementwise: the prior of latents and the null model of scaled data."""
    return -0.5 * (LOG_2PI + x**2)


def log_normal_interval(a: Tensor, b: Tensor) -> Tensor:
    """log(Phi(b) - Phi(a)) for a < b, elementwise, accurate in both tails: an interval in the
    upper tail is mirrored into the lower one, where log Phi keeps its precision."""
    upper = a > 0
    lo, hi = torch.where(upper, -b, a), torch.where(upper, -a, b)
    log_hi = torch.special.log_ndtr(hi)
    return log_hi + torch.log(-torch.expm1(torch.special.log_ndtr(lo) - log_hi))


def bin_index(x: Tensor, low: float | Tensor, width: float | Tensor, count: int | Tensor) -> Tensor:
    """The bin k in 0..count - 1 whose centre low + k width is nearest x, the first and last bins
    taking the tails (as a float tensor, elementwise; the bins' parameters broadcast against x)."""
    k = torch.round((x - low) / width)
    return torch.minimum(k.clamp_min(0), torch.as_tensor(count - 1, dtype=k.dtype, device=k.device))


def discretized_gaussian_log_prob(x: Tensor, mean: Tensor, var: Tensor, low: float | Tensor, width: float | Tensor,
                                  count: int | Tensor) -> Tensor:
    """log P(bin of x) under N(mean, var) discretised onto the ``count`` bins of ``width``
    centred at low, low + width, ..., the first and last bins taking the tails (Ho et al. 2020,
    section 3.3, Eq. 13; improved-diffusion's ``discretized_gaussian_log_likelihood``, here exact
    rather than through the tanh approximation of Phi). Elementwise; x is snapped to its bin
    (:func:`bin_index`)."""
    k = bin_index(x, low, width, count)
    std = var.sqrt()
    # finite edges for every bin (the tails are taken by where, not by infinite edges) so that
    # no infinity reaches autograd
    a = (low + (k - 0.5) * width - mean) / std
    b = (low + (k + 0.5) * width - mean) / std
    tails = torch.where(k == 0, torch.special.log_ndtr(b), torch.special.log_ndtr(-a))
    return torch.where((k == 0) | (k == count - 1), tails, log_normal_interval(a, b))


def _xlogy(x: Tensor, y: Tensor) -> Tensor:
    return torch.special.xlogy(x, y)


def bernoulli_kl(p: Tensor, q: Tensor) -> Tensor:
    """KL( B(p) || B(q) ), elementwise; 0 log 0 = 0."""
    return _xlogy(p, p) - _xlogy(p, q) + _xlogy(1 - p, 1 - p) - _xlogy(1 - p, 1 - q)


def bernoulli_entropy(p: Tensor) -> Tensor:
    """Entropy of B(p), elementwise."""
    return -(_xlogy(p, p) + _xlogy(1 - p, 1 - p))


def bernoulli_log_prob(x: Tensor, p: Tensor) -> Tensor:
    """log B(x; p) for x in {0, 1}, elementwise."""
    return _xlogy(x, p) + _xlogy(1 - x, 1 - p)


def categorical_kl(p: Tensor, q: Tensor) -> Tensor:
    """KL( Cat(p) || Cat(q) ) over the last dimension (the categories); 0 log 0 = 0."""
    return (_xlogy(p, p) - _xlogy(p, q)).sum(-1)


def categorical_entropy(p: Tensor) -> Tensor:
    """Entropy of Cat(p) over the last dimension (the categories); 0 log 0 = 0."""
    return -_xlogy(p, p).sum(-1)
