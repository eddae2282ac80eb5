"""Small tensor helpers that every process and report shares: per-example sums, time-indexed
tables, and nats-to-bits."""

import math

from torch import Tensor

#: nats per bit: a value in nats divided by LN2 is in bits
LN2 = math.log(2.0)


def sum_except_batch(x: Tensor) -> Tensor:
    """x summed over every dimension but the first (N, ...) -> (N,)."""
    return x.flatten(1).sum(1)


def per_example(v: Tensor, like: Tensor) -> Tensor:
    """One value per example (N,) shaped to broadcast against ``like`` (N, ...)."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def gather(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """table[t - 1] per example (times are 1-based), shaped to broadcast against ``like`` (N, ...)."""
    return per_example(table[t - 1], like)
