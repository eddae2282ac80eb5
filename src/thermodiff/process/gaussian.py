"""Gaussian diffusion for continuous data (Sohl-Dickstein et al. 2015, section 2 and App. A).

One object owns the process math, behind the contract of :mod:`thermodiff.process.contract`. The reverse model is any callable
``model(x_t, t) -> z`` with ``z`` of shape ``(N, 2, *x.shape[1:])``; the parameterisation turns
z into the reverse kernel's mean and variance, so that every parameterisation is scored by the
same bound. Times are the paper's, 1-based: t = 1..T, and tables are float64, indexed at t - 1.
"""

import copy
from abc import abstractmethod
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from thermodiff.process.bound import HYBRID_LAMBDA, DiscreteTimeProcess, LossAwareSampler, TrainingLoss
from thermodiff.process.contract import Decoder, Process
from thermodiff.process.distributions import (
    bin_index,
    discretized_gaussian_log_prob,
    gaussian_entropy,
    gaussian_kl,
    gaussian_log_prob,
    standard_normal_log_prob,
)
from thermodiff.process.entropy import reverse_entropy_bounds
from thermodiff.process.schedules import Schedule, invert_increasing, monotone_cubic
from thermodiff.process.tensors import gather, sum_except_batch


class GaussianParameterization(str, Enum):
    """How the network output z becomes the reverse kernel's mean and variance."""

    REFERENCE = "reference"  # reference code: (z_mu, z_Sigma) perturb the forward kernel
    PAPER = "paper"  # paper Eqs. 64-65: decay towards z_mu
    EPS = "eps"  # Ho et al. (2020): z[:, 0] predicts the noise; a fixed variance (FixedVariance)
    EPS_LEARNED_VAR = "eps_learned_var"  # Nichol & Dhariwal (2021): the noise, and z[:, 1] places the variance
    # the noise and the variance as residuals from the exact reverse kernel of N(0, I) data: z = 0 is
    # the forward kernel, exact for whitened Gaussian data at any T (see GaussianDiffusion.p_mean_var)
    EPS_RESIDUAL = "eps_residual"


class FixedVariance(str, Enum):
    """The reverse variance of the EPS parameterisation (improved-diffusion's ModelVarType)."""

    BETA_TILDE = "beta_tilde"  # q(x_{t-1}|x_t,x_0)'s: exact for a point-mass x_0 (FIXED_SMALL)
    BETA = "beta"  # the forward step's: exact for x_0 ~ N(0, I) (FIXED_LARGE)


class Prediction(str, Enum):
    """What a noise-predicting network of another codebase outputs (diffusers' ``prediction_type``),
    turned into the noise by :meth:`GaussianDiffusion.eps_from_prediction`."""

    EPSILON = "epsilon"  # the noise eps (Ho et al. 2020)
    SAMPLE = "sample"  # x_0 itself
    V_PREDICTION = "v_prediction"  # v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022)


@dataclass(frozen=True)
class Bins:
    """Where discrete data lie in the model's units: low + k width, k = 0..count - 1, the same for
    every dimension (floats) or per dimension of N x D data (sequences of D values). For 8-bit
    images, width is one grey level after the data's scaling and count = 256; for integer-valued
    vectors, the lattice of each dimension (:class:`thermodiff.data.dataset.Lattice`)."""

    low: float | tuple[float, ...]
    width: float | tuple[float, ...]
    count: int | tuple[int, ...] = 256

    def tables(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """low, width and count as float64 tensors on ``like``'s device, broadcastable against it."""
        return tuple(torch.as_tensor(v, dtype=torch.float64, device=like.device) for v in (self.low, self.width, self.count))

    def snap(self, x: Tensor) -> Tensor:
        """The centre of the bin that x falls in (the edge bins take the tails)."""
        low, width, count = self.tables(x)
        return (low + bin_index(x, low, width, count) * width).to(x.dtype)

    def log_prob(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """log P(bin of x) under N(mean, var), elementwise (see discretized_gaussian_log_prob)."""
        return discretized_gaussian_log_prob(x, mean, var, *self.tables(x))


class GaussianChain(Process):
    """What every chain of Gaussian kernels with the prior N(0, I) shares, whatever defines its
    steps (a schedule here, continuous time in vdm.py): its noise, its prior, the ancestral step
    and observations as states. A subclass gives :meth:`log_alphas_cumprod` and the kernels
    (:meth:`step_distribution`)."""

    bins: Bins | None = None  # where discrete data lie, for the DISCRETIZED decoder

    @abstractmethod
    def log_alphas_cumprod(self) -> Tensor:
        """log abar_t, t = 1..T (float64): q(x_t | x_0) = N(x_0 sqrt(abar_t), (1 - abar_t) I)."""

    def noise_like(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The standard normal draws that :meth:`q_sample` turns into x_t."""
        return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)

    def sample_prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> Tensor:
        """x_T ~ p(x_T) = N(0, I)."""
        return torch.randn(shape, generator=generator, device=device)

    def p_sample(self, model, x_t: Tensor, t: int, generator: torch.Generator | None = None, factor=None) -> Tensor:
        """Draw x_{t-1} ~ p(x_{t-1} | x_t) (at t = 1, the decoder), multiplied by ``factor``
        (see :mod:`thermodiff.process.posterior`) when one is given."""
        mean, var = self.step_distribution(model, x_t, t)
        if factor is not None:
            mean, var = factor.gaussian(mean, var, t, x_t)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float64)
        x = mean + var.sqrt() * noise
        if t == 1 and self.decoder is Decoder.DISCRETIZED:
            x = self.bins.snap(x)  # a Gaussian draw snapped to its bin is a draw of the discretised decoder
        return x.to(x_t.dtype)

    def flow_drift(self, model, x: Tensor, gamma: Tensor) -> Tensor:
        """dx/dgamma of the probability-flow ODE of the VP-SDE (Song et al. 2021, Eq. 13 with the
        VP-SDE of its Eq. 11), float64, in the noise level gamma = log(sigma^2 / alpha^2) = -log SNR
        as the time: with alpha^2 = sigmoid(-gamma) the drift in any time u, -beta(u) (x + score) / 2
        with beta(u) = -d log alpha^2 / du, is dx/dgamma = -(sigma^2 x + sigma^2 score) / 2 =
        -(sigma^2 x - sigma eps_hat) / 2, score = -eps_hat / sigma. Smooth in gamma whatever the
        schedule (its time enters only through the network's time input), so an adaptive solver
        sees no kinks of an interpolated table. A subclass gives :meth:`flow_eps`."""
        sigma2 = torch.sigmoid(gamma)
        return -0.5 * (sigma2 * x - sigma2.sqrt() * self.flow_eps(model, x, gamma))

    def flow_prior_log_prob(self, x: Tensor) -> Tensor:
        """log p(x_T) = log N(x_T; 0, I) per example, where the flow ends."""
        return sum_except_batch(standard_normal_log_prob(x.double()))

    def reverse_entropy_bounds(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """The paper's bounds on H_q(X_{t-1} | X_t), t = 2..T (entropy.reverse_entropy_bounds), per
        example: per dimension H_q(X_t|X_{t-1}) = h(beta_t) and H_q(X_t|X_0) = h(1 - abar_t), h(v) the
        entropy of N(., v) (PAPER.md section 3), the same for any data. The lower bound is h of
        q(x_{t-1}|x_t,x_0)'s variance beta-tilde_t, the upper h(beta_t)."""
        log_abar = self.log_alphas_cumprod().detach()
        lower, upper = reverse_entropy_bounds(gaussian_entropy(self.schedule.betas().detach()),
                                              gaussian_entropy(-torch.expm1(log_abar)))
        dim = x0[0].numel()
        return dim * lower, dim * upper

    def kernel_entropy(self, model, x_t: Tensor, t: int) -> Tensor:
        """The entropy of p(x_{t-1} | x_t) per example: h of its variance Sigma(x_t, t), summed."""
        _, var = self.step_distribution(model, x_t, t)
        return sum_except_batch(gaussian_entropy(var))

    def diffuse_observation(self, y: Tensor, noise_var: float, generator: torch.Generator | None = None) -> tuple[int, Tensor]:
        """An observation y = x_0 + N(0, s^2 I) as a forward-process state: x_t / sqrt(abar_t) =
        x_0 + N(0, (1 - abar_t) / abar_t I), so at the first t whose noise-to-signal ratio
        rho_t = (1 - abar_t) / abar_t reaches s^2, x_t = sqrt(abar_t) (y + N(0, rho_t - s^2)) is an
        exact draw of q(x_t | x_0) and the reverse chain from it samples p(x_0 | x_t). The extra
        noise (the gap to the step's level, small for a fine schedule) is the only information lost."""
        abar = self.log_alphas_cumprod().detach().exp()  # a learned schedule is fixed here
        rho = (1 - abar) / abar
        if not float(noise_var) <= float(rho[-1]):
            raise ValueError(f"noise variance {float(noise_var):.3g} exceeds the chain's largest level {float(rho[-1]):.3g}")
        t = int(torch.searchsorted(rho, torch.tensor(float(noise_var), dtype=torch.float64))) + 1
        extra = torch.randn(y.shape, generator=generator, device=y.device, dtype=torch.float64)
        x_t = abar[t - 1].sqrt() * (y.double() + (rho[t - 1] - noise_var).clamp_min(0).sqrt() * extra)
        return t, x_t.to(y.dtype)


class GaussianDiffusion(GaussianChain, DiscreteTimeProcess):
    """q(x_t | x_{t-1}) = N(x_{t-1} sqrt(1 - beta_t), beta_t I), p(x_T) = N(0, I)."""

    outputs_per_dim = 2
    x0_bounds: tuple[Tensor, Tensor] | None = None  # set by :meth:`clipped`

    def __init__(
        self,
        schedule: Schedule,
        parameterization: GaussianParameterization | str = GaussianParameterization.REFERENCE,
        decoder: Decoder | str = Decoder.FORWARD,
        eps_variance: FixedVariance | str | None = None,
        bins: Bins | None = None,
        *,
        t_sampler: LossAwareSampler | None = None,
        loss: TrainingLoss | str = TrainingLoss.BOUND,
        hybrid_lambda: float = HYBRID_LAMBDA,
    ):
        """``eps_variance`` (EPS only; default beta-tilde) fixes the reverse variance; ``bins``
        (the data's, for the DISCRETIZED decoder) says where 8-bit values lie in model units;
        ``t_sampler``, ``loss``, ``hybrid_lambda``: how it trains (bound.DiscreteTimeProcess)."""
        super().__init__()
        if not bool((schedule.betas() < 1).all()):
            raise ValueError("Gaussian diffusion needs every beta_t < 1")
        self.schedule = schedule
        self.parameterization = GaussianParameterization(parameterization)
        if eps_variance is not None and self.parameterization is not GaussianParameterization.EPS:
            raise ValueError(f"eps_variance applies to the 'eps' parameterisation, not {self.parameterization.value!r}")
        self.eps_variance = FixedVariance(eps_variance or FixedVariance.BETA_TILDE)
        self.decoder = Decoder(decoder)
        if self.decoder is Decoder.DISCRETIZED and bins is None:
            raise ValueError("the discretized decoder is for discrete data (8-bit images, integer-valued vectors): it "
                             "needs their bins in model units")
        self.bins = bins
        self.init_training(t_sampler, loss, hybrid_lambda)

    def check_noise_loss(self, loss: TrainingLoss) -> None:
        """L_simple needs a noise prediction (EPS or EPS_LEARNED_VAR), the hybrid loss a learned
        variance as well (EPS_LEARNED_VAR), and neither has a gradient that keeps a learned schedule a bound."""
        needs = ((GaussianParameterization.EPS_LEARNED_VAR,) if loss is TrainingLoss.HYBRID else
                 (GaussianParameterization.EPS, GaussianParameterization.EPS_LEARNED_VAR))
        if self.parameterization not in needs:
            raise ValueError(f"the {loss.value!r} loss needs parameterization {' or '.join(repr(n.value) for n in needs)}")
        if self.schedule.learn:
            raise ValueError(f"the {loss.value!r} loss cannot learn the schedule (L_simple has no gradient that keeps "
                             "it a bound); use a fixed schedule or the 'bound' loss")

    @property
    def T(self) -> int:
        return self.schedule.T

    def respaced(self, timesteps: list[int], variance_rule, fit=None) -> "GaussianDiffusion":
        from thermodiff.process.respace import RespacedDiffusion, VarianceRule, fitted_x0_errors  # builds on this module

        if VarianceRule(variance_rule) is not VarianceRule.FITTED:
            return RespacedDiffusion(self, timesteps, variance_rule)
        if fit is None:
            raise ValueError("the fitted variance rule needs the network and training data to fit on (respace.VarianceFit)")
        return RespacedDiffusion(self, timesteps, variance_rule, fitted_x0_errors(self, fit, timesteps))

    def clipped(self, low: Tensor, high: Tensor) -> "GaussianDiffusion":
        """This chain with every reverse kernel's mean the posterior mean q(x_{t-1} | x_t, x_0) at
        the x_0 it implies clipped to [low, high], as DDPM (clip_denoised) and diffusers'
        DDPMScheduler (clip_sample) sample. Each kernel stays a Gaussian, so the bound is this
        chain's; ancestral, DDIM and DPM-Solver samples (which read :meth:`expected_x0`) all clip.
        Respace the clipped chain: a respaced chain reads its base's kernels. The forward decoder
        calls no network and is left as it is."""
        chain = copy.copy(self)  # shares the schedule and buffers
        chain.x0_bounds = (torch.as_tensor(low, dtype=torch.float64), torch.as_tensor(high, dtype=torch.float64))
        return chain

    def clip_mean(self, mean: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``mean`` moved to the posterior mean at its x_0 clipped to :attr:`x0_bounds` (unchanged without)."""
        if self.x0_bounds is None:
            return mean
        low, high = (bound.to(mean.device) for bound in self.x0_bounds)
        x0 = torch.clamp(self.x0_from_posterior_mean(mean, x_t, t), low, high)
        return self.q_posterior(x0, x_t, t)[0]

    def log_alphas_cumprod(self) -> Tensor:
        """log abar_t = sum_{s <= t} log(1 - beta_s), t = 1..T (float64)."""
        return torch.cumsum(torch.log1p(-self.schedule.betas()), 0)

    def q_sample(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(x_0 sqrt(abar_t), (1 - abar_t) I) (paper App. A), from
        ``noise`` (standard normal, see :meth:`noise_like`) when given."""
        abar = gather(self.log_alphas_cumprod().exp(), t, x0)
        noise = self.noise_like(x0, generator) if noise is None else noise
        return (x0 * abar.sqrt() + noise * (1 - abar).sqrt()).to(x0.dtype)

    def posterior_tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """(c0_t, c_t, beta-tilde_t), t = 1..T: q(x_{t-1} | x_t, x_0) = N(c0_t x_0 + c_t x_t,
        beta-tilde_t) with c0_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t), c_t = sqrt(1 - beta_t)
        (1 - abar_{t-1}) / (1 - abar_t), beta-tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
        (Ho et al. 2020, Eqs. 6-7; the product of q(x_{t-1}|x_0) and q(x_t|x_{t-1}), PAPER.md
        section 1). At t = 1 (abar_0 = 1) it is the point x_0: c0 = 1, c = 0, beta-tilde = 0."""
        betas, log_abar = self.schedule.betas(), self.log_alphas_cumprod()
        log_abar_prev = torch.cat([log_abar.new_zeros(1), log_abar[:-1]])
        one_minus, one_minus_prev = -torch.expm1(log_abar), -torch.expm1(log_abar_prev)  # exact for tiny beta
        return ((0.5 * log_abar_prev).exp() * betas / one_minus, (1 - betas).sqrt() * one_minus_prev / one_minus,
                betas * one_minus_prev / one_minus)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (see :meth:`posterior_tables`)."""
        c0, c, var = (gather(table, t, x0) for table in self.posterior_tables())
        mean = c0 * x0 + c * x_t
        return mean, var.expand_as(mean)

    def x0_from_posterior_mean(self, mean: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The x_0 whose posterior q(x_{t-1} | x_t, x_0) has this mean: any reverse kernel's mean
        read as a prediction of x_0 (c0_t > 0 for every t, so it is defined everywhere)."""
        c0, c, _ = (gather(table, t, x_t) for table in self.posterior_tables())
        return (mean - c * x_t) / c0

    def log_variance_range(self) -> tuple[Tensor, Tensor]:
        """(log beta-tilde_t, log beta_t), t = 1..T: the reverse variances that are exact for a
        point-mass x_0 and for x_0 ~ N(0, I), the fixed choices of Ho et al. (2020) and the ends of
        Nichol & Dhariwal's interpolation. beta-tilde_1 = 0 is replaced by beta-tilde_2, as
        improved-diffusion's posterior_log_variance_clipped does."""
        beta_tilde = self.posterior_tables()[2]
        return torch.log(torch.cat([beta_tilde[1:2], beta_tilde[1:]])), torch.log(self.schedule.betas())

    def interpolated_variance(self, v: Tensor, t: Tensor) -> Tensor:
        """Sigma = exp(v log beta_t + (1 - v) log beta-tilde_t) (Nichol & Dhariwal 2021, Eq. 15)."""
        log_small, log_large = (gather(table, t, v) for table in self.log_variance_range())
        return torch.exp(v * log_large + (1 - v) * log_small)

    def variance_fraction(self, var: Tensor, t: Tensor) -> Tensor:
        """The v at which :meth:`interpolated_variance` gives ``var``, its inverse (t >= 2, where
        beta-tilde_t < beta_t)."""
        log_small, log_large = (gather(table, t, var) for table in self.log_variance_range())
        return (torch.log(var) - log_small) / (log_large - log_small)

    @staticmethod
    def mean_from_eps(x_t: Tensor, beta: Tensor, one_minus_abar: Tensor, eps: Tensor) -> Tensor:
        """mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(1 - beta_t) (Ho et al. 2020, Eq. 11):
        the posterior mean at the x_0 that the noise prediction implies."""
        return (x_t - beta / one_minus_abar.sqrt() * eps) / (1 - beta).sqrt()

    def eps_from_prediction(self, x_t: Tensor, t: Tensor, out: Tensor, prediction: Prediction) -> Tensor:
        """The noise eps that a network's output ``out`` (a :class:`Prediction`) implies through
        x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, Eq. 4; for v, Salimans & Ho
        2022, section 4)."""
        log_abar = gather(self.log_alphas_cumprod(), t, x_t)
        a, s = (0.5 * log_abar).exp(), (-torch.expm1(log_abar)).sqrt()
        if prediction is Prediction.EPSILON:
            eps = out
        elif prediction is Prediction.SAMPLE:
            eps = (x_t - a * out) / s
        else:  # x_0 = a x_t - s v and eps = s x_t + a v, as a^2 + s^2 = 1
            eps = s * x_t + a * out
        return eps

    @staticmethod
    def eps_from_mean(x_t: Tensor, beta: Tensor, one_minus_abar: Tensor, mean: Tensor) -> Tensor:
        """The noise whose :meth:`mean_from_eps` is ``mean``: any reverse kernel's mean read as a
        prediction of the noise of x_t, so of the score -eps / sqrt(1 - abar_t)."""
        return (x_t - (1 - beta).sqrt() * mean) * one_minus_abar.sqrt() / beta

    def kernel_mean(self, z: Tensor, x_t: Tensor, beta: Tensor, one_minus_abar: Tensor) -> Tensor:
        """The reverse kernel's mean from the network output ``z`` (float64) at a step of ``beta``
        from x_t at the noise level ``1 - abar`` (per example, broadcastable against x_t)."""
        P = self.parameterization
        if P is GaussianParameterization.REFERENCE:
            return x_t * (1 - beta).sqrt() + z[:, 0] * beta.sqrt()  # z = 0: the forward kernel's mean
        if P is GaussianParameterization.PAPER:
            var = self.paper_variance(z, beta)
            return (x_t - z[:, 0]) * (1 - var) + z[:, 0]  # paper Eq. 64
        if P is GaussianParameterization.EPS_RESIDUAL:
            # N(0, I) data have E[eps | x_t] = sqrt(1 - abar_t) x_t, so z = 0 gives their exact reverse
            return self.mean_from_eps(x_t, beta, one_minus_abar, one_minus_abar.sqrt() * x_t + z[:, 0])
        return self.mean_from_eps(x_t, beta, one_minus_abar, z[:, 0])

    @staticmethod
    def paper_variance(z: Tensor, beta: Tensor) -> Tensor:
        """Sigma = sigmoid(z_Sigma + logit beta_t) (paper Eq. 65)."""
        return torch.sigmoid(z[:, 1] + torch.logit(beta))

    def p_mean_var(self, model, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of the reverse kernel p(x_{t-1} | x_t) from the network output."""
        z = model(x_t, t).double()
        beta = gather(self.schedule.betas(), t, x_t)
        one_minus_abar = gather(-torch.expm1(self.log_alphas_cumprod()), t, x_t)
        mean = self.kernel_mean(z, x_t.double(), beta, one_minus_abar)
        P = self.parameterization
        if P is GaussianParameterization.REFERENCE:
            # z_Sigma is scaled by sqrt(T) so that its effect is commensurate with z_mu's
            var = torch.sigmoid(z[:, 1] / self.T**0.5 + torch.logit(beta))
        elif P is GaussianParameterization.PAPER:
            var = self.paper_variance(z, beta)
        elif P is GaussianParameterization.EPS_RESIDUAL:
            var = self.interpolated_variance(1 + z[:, 1], t)  # z[:, 1] moves log Sigma towards log beta-tilde (at -1)
        elif P is GaussianParameterization.EPS_LEARNED_VAR:
            var = self.interpolated_variance((z[:, 1] + 1) / 2, t)  # v in [-1, 1] maps to [0, 1]
        else:
            log_small, log_large = self.log_variance_range()
            log_var = log_large if self.eps_variance is FixedVariance.BETA else log_small
            var = gather(log_var, t, x_t).exp().expand_as(mean)
        return self.clip_mean(mean, x_t.double(), t), var

    def flow_gammas(self) -> tuple[float, float]:
        """gamma = log((1 - abar) / abar) at the first step (the bound's resolution beta_1) and the last."""
        log_abar = self.log_alphas_cumprod().detach()[[0, -1]]
        gamma = torch.log(-torch.expm1(log_abar)) - log_abar
        return float(gamma[0]), float(gamma[1])

    def continuous_log_alpha_bar(self, u: Tensor) -> Tensor:
        """log abar(u) at continuous steps u in [0, T]: the chain's VP-SDE limit, whose beta(u) =
        -d log abar / du is continuous, with abar(t) = abar_t at every step t (the
        :func:`monotone_cubic` through log abar_0 = 0, log abar_1, ..., log abar_T)."""
        log_abar = self.log_alphas_cumprod().detach()
        return monotone_cubic(torch.cat([log_abar.new_zeros(1), log_abar]), u)

    def flow_eps(self, model, x: Tensor, gamma: Tensor) -> Tensor:
        """The noise prediction at the noise level ``gamma`` (0-d): at the continuous step u where
        :meth:`continuous_log_alpha_bar` has it, the network called at the continuous time
        (u - 1) / (T - 1) that step u stands for, and its kernel's mean read as noise
        (:meth:`eps_from_mean`) for the step from u to u - 1 (beta = 1 - abar(u) / abar(u - 1)),
        so every parameterisation gives its score; at an integer u, the kernel of step u."""
        def gamma_at(u: Tensor) -> Tensor:
            log_abar = self.continuous_log_alpha_bar(u)
            return torch.log(-torch.expm1(log_abar)) - log_abar

        u = invert_increasing(gamma_at, gamma, 1.0, float(self.T))
        log_abar = self.continuous_log_alpha_bar(u)
        beta = -torch.expm1(log_abar - self.continuous_log_alpha_bar(u - 1))
        one_minus_abar = -torch.expm1(log_abar)
        z = model(x, ((u - 1) / (self.T - 1)).expand(len(x)).to(x.device)).double()
        return self.eps_from_mean(x, beta, one_minus_abar, self.kernel_mean(z, x, beta, one_minus_abar))

    def prior_kl(self, x0: Tensor) -> Tensor:
        """KL(q(x_T | x_0) || p(x_T)) per example. Equals -H_q(X_T|X_0) - E_q log p(x_T); the
        paper's Eq. 14 writes its expectation over unit-variance data as H_p(X_T) - H_q(X_T|X_0)."""
        abar_T = self.log_alphas_cumprod()[-1].exp()
        kl = gaussian_kl(x0.double() * abar_T.sqrt(), (1 - abar_T).expand_as(x0), torch.zeros_like(x0, dtype=torch.float64), torch.ones_like(x0, dtype=torch.float64))
        return sum_except_batch(kl)

    def reverse_kl(self, model, x0: Tensor, t: Tensor, generator: torch.Generator | None = None,
                   noise: Tensor | None = None) -> Tensor:
        """One-draw estimate of E_{q(x_t|x_0)} KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) per
        example, t >= 2: the terms summed in the paper's Eq. 14."""
        x_t = self.q_sample(x0, t, generator, noise)
        mean_q, var_q = self.q_posterior(x0.double(), x_t.double(), t)
        mean_p, var_p = self.p_mean_var(model, x_t, t)
        return sum_except_batch(gaussian_kl(mean_q, var_q, mean_p, var_p))

    def decoder_log_likelihood(self, model, x0: Tensor, generator: torch.Generator | None = None,
                               noise: Tensor | None = None) -> Tensor:
        """E_{q(x_1|x_0)} log p(x_0 | x_1) per example.

        FORWARD (paper App. B.2): p(x_0|x_1) = q(x_1|x_0) pi(x_0) / pi(x_1), so the term is
        -H_q(X_1|X_0) + log pi(x_0) - E log pi(x_1), in closed form (no draw). LEARNED: one draw.
        """
        t1 = torch.ones(len(x0), dtype=torch.long, device=x0.device)
        beta_1 = self.schedule.betas()[0]
        x0d = x0.double()
        if self.decoder is Decoder.FORWARD:
            per_dim = -gaussian_entropy(beta_1.expand_as(x0d)) + 0.5 * beta_1 * (1 - x0d**2)
            return sum_except_batch(per_dim)
        x_1 = self.q_sample(x0, t1, generator, noise)
        mean, var = self.p_mean_var(model, x_1, t1)
        return sum_except_batch(self.decoder_log_prob(x0d, mean, var))

    def decoder_log_prob(self, x0: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """log p(x_0 | x_1) elementwise for a Gaussian kernel: a density, or with the DISCRETIZED
        decoder the probability of x_0's bin, so that K bounds the log-probability of the 8-bit data."""
        if self.decoder is Decoder.DISCRETIZED:
            return self.bins.log_prob(x0, mean, var)
        return gaussian_log_prob(x0, mean, var)

    def step_distribution(self, model, x_t: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """Mean and variance of the kernel that draws x_{t-1} from x_t, the decoder at t = 1."""
        tt = torch.full((len(x_t),), t, dtype=torch.long, device=x_t.device)
        if t == 1 and self.decoder is Decoder.FORWARD:
            beta_1 = self.schedule.betas()[0]
            return x_t.double() * (1 - beta_1).sqrt(), beta_1.expand(x_t.shape)
        return self.p_mean_var(model, x_t, tt)

    def expected_x0(self, model, x_t: Tensor, t: int) -> Tensor:
        """The model's E[x_0 | x_t] in one network call: the bound is minimised by the kernel mean
        E_q[mu~(x_0, x_t) | x_t], linear in x_0, so the x_0 that the mean implies
        (:meth:`x0_from_posterior_mean`) is the posterior mean (Tweedie's formula in kernel form)."""
        tt = torch.full((len(x_t),), t, dtype=torch.long, device=x_t.device)
        mean, _ = self.step_distribution(model, x_t, t)
        return self.x0_from_posterior_mean(mean, x_t.double(), tt)

    def null_log_likelihood(self, x0: Tensor) -> Tensor:
        """log N(x_0; 0, I) per example: the null model L_null for unit-variance data (with the
        DISCRETIZED decoder, N(0, I) discretised the same way, so that K - L_null compares like with like)."""
        x0d = x0.double()
        return sum_except_batch(self.decoder_log_prob(x0d, torch.zeros_like(x0d), torch.ones_like(x0d)))
