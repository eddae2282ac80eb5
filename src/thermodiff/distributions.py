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
