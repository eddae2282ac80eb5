"""Posteriors by multiplying distributions (paper section 4).

To sample from p~(x_0) proportional to p(x_0) r(x_0), every reverse kernel p(x_{t-1} | x_t)
is multiplied by a factor r(x_{t-1}) and renormalised. For the Gaussian kernels of continuous
data each step's product is exact when r is Gaussian (a product of Gaussians) or pins some
entries to known values (variance 0), and a first-order perturbation for any smooth r: the mean
moves by Sigma * grad log r (paper section 4.3). For Bernoulli and categorical kernels, known entries are clamped.
The chain of exact per-step products is still the paper's approximation of the posterior (a
constant Gaussian r at every step targets p r^2, tested in closed form);
:func:`thermodiff.tasks.conditioning.denoise` with ``method="start"`` is exact for Gaussian noise.

A factor is an object with ``gaussian(mean, var, t, x_t) -> (mean, var)`` and/or
``bernoulli(prob, t, x_t) -> prob`` and/or ``categorical(probs, t, x_t) -> probs`` acting on the kernel that draws x_{t-1} from x_t; the
processes' ``p_sample`` applies it at every step. All values are in the model's space (after
the data's scaling).
"""

from collections.abc import Callable

import torch
from torch import Tensor

from thermodiff.errors import UserError
from thermodiff.process.contract import Process


def _observed(mask: Tensor | None, like: Tensor) -> Tensor:
    return torch.ones_like(like, dtype=torch.bool) if mask is None else mask.to(torch.bool).expand_as(like)


class GaussianObservation:
    """r(x) = N(y; x, noise_var) on the entries where ``mask`` is true (all when None): the
    paper's denoising factor, the same at every step (r(x_t) = r(x_0)). Exact for Gaussian
    kernels: var' = (1/var + 1/noise_var)^-1, mean' = var' (mean/var + y/noise_var)."""

    def __init__(self, y: Tensor, noise_var: float | Tensor, mask: Tensor | None = None):
        noise_var = torch.as_tensor(noise_var, dtype=torch.float64)
        if not bool((noise_var > 0).all()):
            raise UserError("the observation noise variance must be positive")
        self.y, self.noise_var, self.mask = y.double(), noise_var, mask

    def gaussian(self, mean: Tensor, var: Tensor, t: int, x_t: Tensor) -> tuple[Tensor, Tensor]:
        var_new = 1 / (1 / var + 1 / self.noise_var)
        mean_new = var_new * (mean / var + self.y / self.noise_var)
        observed = _observed(self.mask, mean)
        return torch.where(observed, mean_new, mean), torch.where(observed, var_new, var)

    def bernoulli(self, prob: Tensor, t: int, x_t: Tensor) -> Tensor:
        raise UserError("a Gaussian observation factor needs Gaussian diffusion; clamp binary data instead")

    def categorical(self, probs: Tensor, t: int, x_t: Tensor) -> Tensor:
        raise UserError("a Gaussian observation factor needs Gaussian diffusion; clamp categorical data instead")


class Clamp:
    """Known entries pinned to their values (inpainting). The paper (Fig. 5) holds them at their
    clean values at every step. With ``forward`` (the diffusion process) they instead follow a
    forward trajectory that ends at their values, x_{t-1} ~ q(x_{t-1} | x_t, x_0 = value), so the
    network sees known entries noised like the data it was trained on; both are exact at t = 1."""

    def __init__(self, values: Tensor, mask: Tensor, forward: Process | None = None):
        if not bool(mask.any()):
            raise UserError("the mask marks no known values")
        self.values, self.mask, self.forward = values.double(), mask.to(torch.bool), forward

    def _posterior_step(self, x_t: Tensor, t: int):
        tt = torch.full((len(x_t),), t, dtype=torch.long, device=x_t.device)
        return self.forward.q_posterior(self.values.expand_as(x_t), x_t.double(), tt)

    def gaussian(self, mean: Tensor, var: Tensor, t: int, x_t: Tensor) -> tuple[Tensor, Tensor]:
        known = self.mask.expand_as(mean)
        target_mean, target_var = self.values.expand_as(mean), torch.zeros_like(var)
        if self.forward is not None and t > 1:
            target_mean, target_var = self._posterior_step(x_t, t)
        return torch.where(known, target_mean, mean), torch.where(known, target_var, var)

    def bernoulli(self, prob: Tensor, t: int, x_t: Tensor) -> Tensor:
        target = self.values.expand_as(prob)
        if self.forward is not None and t > 1:
            target = self._posterior_step(x_t, t)
        return torch.where(self.mask.expand_as(prob), target, prob)

    def categorical(self, probs: Tensor, t: int, x_t: Tensor) -> Tensor:
        """The known entries' probabilities (a last dimension over the states) put on their values."""
        if self.forward is not None and t > 1:
            target = self._posterior_step(x_t, t)
        else:
            target = torch.nn.functional.one_hot(self.values.expand(probs.shape[:-1]).round().long(), probs.shape[-1])
        return torch.where(self.mask.expand(probs.shape[:-1]).unsqueeze(-1), target.to(probs.dtype), probs)


class SmoothFactor:
    """Any smooth log r(x) given as a callable: the kernel's mean is shifted by
    Sigma * grad log r(mean), its variance kept (paper section 4.3, first order in Sigma)."""

    def __init__(self, log_r: Callable[[Tensor], Tensor]):
        self.log_r = log_r

    def gaussian(self, mean: Tensor, var: Tensor, t: int, x_t: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x = mean.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_r(x).sum(), x)
        return mean + var * grad, var

    def bernoulli(self, prob: Tensor, t: int, x_t: Tensor) -> Tensor:
        raise UserError("a smooth log-factor needs Gaussian diffusion")

    def categorical(self, probs: Tensor, t: int, x_t: Tensor) -> Tensor:
        raise UserError("a smooth log-factor needs Gaussian diffusion")


class Product:
    """Several factors applied in turn (e.g. a clamp and a noisy observation)."""

    def __init__(self, *factors):
        self.factors = factors

    def gaussian(self, mean: Tensor, var: Tensor, t: int, x_t: Tensor) -> tuple[Tensor, Tensor]:
        for f in self.factors:
            mean, var = f.gaussian(mean, var, t, x_t)
        return mean, var

    def bernoulli(self, prob: Tensor, t: int, x_t: Tensor) -> Tensor:
        for f in self.factors:
            prob = f.bernoulli(prob, t, x_t)
        return prob

    def categorical(self, probs: Tensor, t: int, x_t: Tensor) -> Tensor:
        for f in self.factors:
            probs = f.categorical(probs, t, x_t)
        return probs
