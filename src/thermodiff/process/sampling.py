"""Ancestral sampling through the reverse chain (paper section 2.2), k-diffusion style:
a small pure function with an optional per-step callback."""

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from thermodiff.process.contract import Chain


@torch.no_grad()
def ancestral_sample(
    diffusion: Chain,
    model,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
    factor=None,
    start: tuple[int, Tensor] | None = None,
) -> Tensor:
    """Draw x_T ~ p(x_T), then x_{t-1} ~ p(x_{t-1} | x_t) for t = T..1; returns x_0.

    ``callback(t, x_t)`` is called with every state, from t = T down to t = 0. With a
    ``factor`` r (see :mod:`thermodiff.process.posterior`) every kernel is multiplied by r, which samples
    the posterior p(x_0) r(x_0) / Z (paper section 4). ``start = (t, x_t)`` runs the chain from
    that state instead of the prior (``shape`` is then x_t's), drawing from p(x_0 | x_t).
    """
    t_start, x = (diffusion.T, diffusion.sample_prior(shape, generator, device)) if start is None else start
    for t in range(t_start, 0, -1):
        if callback is not None:
            callback(t, x)
        x = diffusion.p_sample(model, x, t, generator, factor)
    if callback is not None:
        callback(0, x)
    return x


def sample_in_batches(diffusion, model, n: int, event_shape: tuple[int, ...], batch_size: int,
                      generator: torch.Generator | None = None, progress: bool = False,
                      draw: Callable = ancestral_sample) -> Iterator[Tensor]:
    """``n`` draws of ``draw`` (:func:`ancestral_sample`, or a function of its signature such as
    samplers.sample with its sampler fixed) made ``batch_size`` at a time, batch after batch from one
    ``generator`` (so the draws depend on ``batch_size``), on the generator's device, under one progress bar."""
    sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    device = generator.device if generator is not None else None
    with tqdm(total=len(sizes) * diffusion.T, desc="sample", unit="t", disable=not progress, mininterval=1.0) as bar:
        for size in sizes:
            yield draw(diffusion, model, (size, *event_shape), generator, device,
                       callback=lambda t, x: bar.update(1) if t > 0 else None)
