"""The process contract: what the training loop, the bound, the sampler and the commands may ask
of the object a run holds beside its network (``Run.diffusion``), written down once.

Two levels:

- :class:`Trainable`: anything the training loop trains and the commands load: a diffusion
  process or a baseline (baselines.py). It draws the randomness of a training step and turns it
  into a loss, and it says, by attributes rather than by its type, how the data enter it and what
  it offers besides (``dequantizes``, ``binary``, ``continuous_time``, ``stationary_p``,
  ``one_hot_states``).
- :class:`Process`: a diffusion process of T steps (gaussian.py, binomial.py, categorical.py, vdm.py, and the
  respaced chains of respace.py): the forward process, the terms of the bound K (paper Eq. 14)
  that bound.exact_bound sums, the reverse kernels that sampling.ancestral_sample runs, the
  null model that K is compared with, and the paper's bounds on each reverse step's entropy. Gaussian
  ones also give their noise levels and the network's E[x_0 | x_t] (``log_alphas_cumprod``,
  ``expected_x0``), all that samplers.py's DDIM and ODE samplers need.

A network is any callable ``model(x_t, t) -> z`` with ``z`` of shape
``(N, outputs_per_dim, *x.shape[1:])``; it is passed to the methods, never held by the process.
Times are the paper's, 1-based: t = 1..T, x_0 the data, x_T the prior's draw. Every term is per
example, in nats, float64. Code outside the processes reads the attributes below instead of
checking types (isinstance, hasattr).
"""

from abc import ABC, abstractmethod
from enum import Enum
from typing import Protocol

import torch
from torch import Tensor, nn


class Decoder(str, Enum):
    """The last reverse step p(x_0 | x_1)."""

    FORWARD = "forward"  # the forward step reversed, T_pi(x_0 | x_1; beta_1) (paper App. B.2)
    LEARNED = "learned"  # the network's kernel at t = 1
    DISCRETIZED = "discretized"  # the network's kernel at t = 1 over the bins of discrete data (Ho et al. 2020)


class Trainable(nn.Module, ABC):
    """What the training loop trains and a run directory restores (the process's parameters and
    buffers are saved with the network's).

    Attributes read by callers (class defaults here):

    - ``dequantizes``: whether 8-bit data enter dequantised (a density model, the paper's) or as
      the centres of their bins (a model of the discrete values, the discretized decoder's).
    - ``binary``: the states are bits {0, 1}: kernels are Bernoulli, so Gaussian observation
      factors do not apply and known values must be 0 or 1.
    - ``continuous_time``: defined at every time s in [0, 1] (VDM): the network is called at
      floating-point times, ``continuous_bound(model, batches, n_draws, generator)`` gives the
      continuous-time bound besides the T-step chain's.
    - ``stationary_p``: the stationary probability of a 1 of a binary process (recorded with the
      run), else None.
    - ``one_hot_states``: the states are integers 0..S-1 (categorical.py), which networks take
      one-hot: S, else None.
    """

    dequantizes: bool = True
    binary: bool = False
    continuous_time: bool = False
    stationary_p: float | None = None
    one_hot_states: int | None = None

    def respaced(self, timesteps: list[int], variance_rule, fit=None) -> "Trainable":
        """The chain on the kept steps ``timesteps`` (1-based, from 1 to T) of this one, with the same
        network (respace.py; ``variance_rule`` a respace.VarianceRule for processes whose kernels it
        approximates, ``fit`` a respace.VarianceFit for its FITTED rule). Only Gaussian processes have one."""
        raise ValueError(f"respacing is for Gaussian diffusion; a {type(self).__name__} keeps its T steps")

    def clipped(self, low: Tensor, high: Tensor) -> "Trainable":
        """This chain with the network's x_0 clipped to [low, high] (model units, broadcastable
        against an example) in every reverse kernel: DDPM's clip_denoised. Only discrete-time
        Gaussian diffusion has one (its kernels' means are posterior means at an x_0)."""
        raise ValueError(f"clipping x_0 is for discrete-time Gaussian diffusion, not a {type(self).__name__}")

    def log_alphas_cumprod(self) -> Tensor:
        """log abar_t, t = 1..T (float64) of a chain of Gaussian kernels: x_t = sqrt(abar_t) x_0 +
        sqrt(1 - abar_t) eps. With :meth:`expected_x0`, all that samplers.py's DDIM and ODE samplers
        need of a process. Only Gaussian processes have one."""
        raise _not_gaussian(self)

    def expected_x0(self, model, x_t: Tensor, t: int) -> Tensor:
        """The network's E[x_0 | x_t] at step ``t`` (float64, at most one network call; at t = 1 the decoder's
        mean), from which samplers.py reads the noise eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t).
        Only Gaussian processes have one."""
        raise _not_gaussian(self)

    @abstractmethod
    def training_draws(self, x0: Tensor, generator: torch.Generator | None = None):
        """The randomness of one training step for the batch ``x0``, drawn from ``generator``
        only: an object that slices per example (``draws[index]``), so that data-parallel
        processes draw the global batch's and take their shard."""

    @abstractmethod
    def training_loss(self, model, x0: Tensor, draws) -> tuple[Tensor, Tensor]:
        """(loss, K_estimate) from :meth:`training_draws`: the scalar minimised, differentiable in
        the network and the process's parameters, and per example a detached float64 estimate of
        the bound in nats that the loop logs (what the loss is, is the process's own setting)."""


def _not_gaussian(process: Trainable) -> ValueError:
    return ValueError(f"DDIM and ODE samplers are for Gaussian diffusion; a {type(process).__name__} samples "
                      "ancestrally (--sampler ancestral)")


class Chain(Protocol):
    """What ancestral sampling (sampling.ancestral_sample) needs: every :class:`Process`, and the
    VAE baseline as a one-step chain."""

    T: int

    def sample_prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> Tensor:
        ...

    def p_sample(self, model, x_t: Tensor, t: int, generator: torch.Generator | None = None, factor=None) -> Tensor:
        ...


class Process(Trainable):
    """A diffusion process of ``T`` steps and the bound on its model's log-likelihood.

    Attributes: ``T`` (the chain's steps), ``outputs_per_dim`` (network outputs per data
    dimension), ``schedule`` (the chain's beta_1..beta_T as a schedules.Schedule),
    ``parameterization`` (how network outputs become kernels, an Enum of the process's module) and
    ``decoder`` (:class:`Decoder`). ``dequantizes`` follows from the decoder.

    The probability-flow ODE (ode.py; Song et al. 2021, Eq. 13) of a process with a continuous-time
    limit runs from the noise level :meth:`flow_gammas` ``[0]``, where the data enter scaled by
    sqrt(abar), to ``[1]``, where :meth:`flow_prior_log_prob` scores it, along :meth:`flow_drift`.

    The bound (bound.exact_bound) is K = -:meth:`prior_kl` - sum_{t=2..T} :meth:`reverse_kl` +
    :meth:`decoder_log_likelihood`, compared with :meth:`null_log_likelihood`. Sampling
    (sampling.ancestral_sample) is :meth:`sample_prior` then :meth:`p_sample` for t = T..1.
    """

    @property
    def dequantizes(self) -> bool:
        return self.decoder is not Decoder.DISCRETIZED

    @abstractmethod
    def noise_like(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The standard draws (float64, x0's shape) that :meth:`q_sample` turns into x_t."""

    @abstractmethod
    def q_sample(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None,
                 noise: Tensor | None = None) -> Tensor:
        """A draw of x_t ~ q(x_t | x_0) per example (``t``: (N,) steps), from ``noise`` when given, in x0's dtype."""

    @abstractmethod
    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor):
        """The forward posterior q(x_{t-1} | x_t, x_0), t >= 2, in the form of
        :meth:`step_distribution`."""

    @abstractmethod
    def prior_kl(self, x0: Tensor) -> Tensor:
        """KL(q(x_T | x_0) || p(x_T)) per example: the bound's prior term."""

    @abstractmethod
    def reverse_kl(self, model, x0: Tensor, t: Tensor, generator: torch.Generator | None = None,
                   noise: Tensor | None = None) -> Tensor:
        """A one-draw estimate of E_{q(x_t|x_0)} KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) per
        example, t >= 2 (x_t from ``noise``, see :meth:`noise_like`, when given)."""

    @abstractmethod
    def decoder_log_likelihood(self, model, x0: Tensor, generator: torch.Generator | None = None,
                               noise: Tensor | None = None) -> Tensor:
        """E_{q(x_1|x_0)} log p(x_0 | x_1) per example (in closed form or from one draw)."""

    @abstractmethod
    def null_log_likelihood(self, x0: Tensor) -> Tensor:
        """log-likelihood per example under the null model L_null (independent, data-free), for K - L_null."""

    @abstractmethod
    def sample_prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> Tensor:
        """x_T ~ p(x_T)."""

    @abstractmethod
    def step_distribution(self, model, x_t: Tensor, t: int):
        """The kernel that draws x_{t-1} from x_t at step ``t`` (the decoder at t = 1): its (mean,
        variance) for Gaussian kernels, its probability of a 1 for Bernoulli ones, its probabilities over
        the states (a last dimension) for categorical ones (float64)."""

    @abstractmethod
    def p_sample(self, model, x_t: Tensor, t: int, generator: torch.Generator | None = None, factor=None) -> Tensor:
        """A draw of x_{t-1} from :meth:`step_distribution`, in x_t's dtype, the kernel multiplied
        by ``factor`` (see posterior.py) when one is given."""

    def flow_gammas(self) -> tuple[float, float]:
        """(gamma_0, gamma_1): the noise levels gamma = log((1 - abar) / abar) = -log SNR, q(x | x_0) =
        N(x_0 sqrt(abar), (1 - abar) I), where the probability-flow ODE starts (the data's end) and
        ends (the prior's); gamma is the ODE's time. Only Gaussian processes have one (a ValueError here)."""
        raise ValueError(f"the probability-flow ODE is for Gaussian diffusion; a {type(self).__name__} has none")

    def flow_drift(self, model, x: Tensor, gamma: Tensor) -> Tensor:
        """dx/dgamma of the probability-flow ODE at the state ``x`` (float64) and noise level ``gamma``
        (0-d), differentiable in x, with the network ``model``."""
        raise NotImplementedError

    def flow_prior_log_prob(self, x: Tensor) -> Tensor:
        """log p(x_{gamma_1}) per example: the prior density where the flow ends."""
        raise NotImplementedError

    @abstractmethod
    def reverse_entropy_bounds(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """(lower, upper) bounds on H_q(X_{t-1} | X_t), t = 2..T (each (T - 1,), nats per example,
        float64), in closed form from the forward process (paper section 2.6; entropy.py) for data
        like ``x0`` (N, ...): their shape, and for binary data their frequency of a 1 per dimension."""

    @abstractmethod
    def kernel_entropy(self, model, x_t: Tensor, t: int) -> Tensor:
        """The entropy of the learned reverse kernel p(x_{t-1} | x_t) (:meth:`step_distribution`)
        at each x_t, nats per example (N,), float64."""
