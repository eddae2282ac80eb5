"""The entropy of each learned reverse kernel set against the paper's bounds on H_q(X_{t-1} | X_t)
(section 2.6; process/entropy.py), step by step, for ``thermodiff evaluate``."""

from collections.abc import Iterable

import torch
from torch import Tensor

from thermodiff.process.bound import standard_error
from thermodiff.process.contract import Process
from thermodiff.process.respace import evenly_spaced
from thermodiff.process.tensors import LN2

#: The learned kernel's entropy is averaged over q's x_t from at most this many held-out examples
#: (its standard error is reported): one network call per example and step, like the bound's.
ENTROPY_EXAMPLES = 500
#: ... and this many images: an image kernel's entropy sums thousands of dimensions, so its average
#: over x_t settles on few images, and the entropies cost a quarter of a 200-image evaluation.
ENTROPY_IMAGES = 50
#: A step is flagged when its kernel's entropy lies beyond a bound by more than this many standard
#: errors of the average over x_t ...
FLAG_STDERRS = 3.0
#: ... plus this much per dimension (nats): a kernel whose variance is fixed at beta_t or beta-tilde_t
#: lies on a bound exactly, up to float64 rounding.
ROUNDING_NATS = 1e-9


def entropy_steps(T: int, t_samples: int | None) -> list[int]:
    """The steps compared: every t = 2..T, or for a bound estimated on ``t_samples`` stratified steps
    (images, where every step costs a network call per image) that many steps evenly spaced in 2..T."""
    if t_samples is None or t_samples >= T - 1:
        return list(range(2, T + 1))
    return [t + 1 for t in evenly_spaced(T - 1, max(t_samples, 2))]


def entropy_examples(is_image: bool) -> int:
    return ENTROPY_IMAGES if is_image else ENTROPY_EXAMPLES


def step_record(t: int, lower: float, upper: float, kernel: Tensor, dim: int) -> dict:
    """One step's bounds and kernel entropy (bits per example), and whether it lies outside them:
    ``excursion_bits`` > 0 above the upper bound, < 0 below the lower one, 0 within."""
    mean, stderr = float(kernel.mean()), standard_error(kernel) or 0.0
    margin = FLAG_STDERRS * stderr + ROUNDING_NATS * dim
    excursion = mean - upper if mean > upper else mean - lower if mean < lower else 0.0
    return {"t": t, "lower_bits": lower / LN2, "upper_bits": upper / LN2, "kernel_bits": mean / LN2,
            "kernel_stderr_bits": stderr / LN2, "excursion_bits": excursion / LN2,
            "outside": abs(excursion) > margin}


@torch.no_grad()
def entropy_report(diffusion: Process, model, x0: Tensor, steps: Iterable[int], batch_size: int,
                   generator: torch.Generator | None = None, examples: int = ENTROPY_EXAMPLES) -> dict:
    """Per step t in ``steps``: the paper's lower and upper bounds on H_q(X_{t-1} | X_t) for data like
    ``x0`` (model units), and the entropy of the learned kernel p(x_{t-1} | x_t) averaged over x_t ~
    q(x_t | x_0) from the first ``examples`` of ``x0`` (one draw each), with its standard
    error; then how many steps lie outside the bounds (flagged), the largest excursion among them (0
    when none is), and at how many steps the bounds cross (lower > upper: the upper bound's premise, a marginal
    entropy that never falls, fails there). Bits per example."""
    lower, upper = (b.cpu() for b in diffusion.reverse_entropy_bounds(x0))
    x0, dim = x0[:examples], x0[0].numel()
    per_step = []
    for t in steps:
        kernel = torch.cat([diffusion.kernel_entropy(model, diffusion.q_sample(batch, torch.full(
            (len(batch),), t, device=batch.device), generator), t).cpu() for batch in torch.split(x0, batch_size)])
        per_step.append(step_record(t, float(lower[t - 2]), float(upper[t - 2]), kernel, dim))
    outside = [s for s in per_step if s["outside"]]
    largest = max(outside, key=lambda s: abs(s["excursion_bits"]), default={"excursion_bits": 0.0, "t": None})
    return {"unit": "bits/example (model units)", "n_examples": len(x0), "n_steps": len(per_step),
            "n_outside": len(outside), "n_above": sum(s["excursion_bits"] > 0 for s in outside),
            "n_below": sum(s["excursion_bits"] < 0 for s in outside),
            "largest_excursion_bits": largest["excursion_bits"], "largest_excursion_t": largest["t"],
            "n_bounds_crossed": sum(s["lower_bits"] > s["upper_bits"] for s in per_step), "per_step": per_step}
