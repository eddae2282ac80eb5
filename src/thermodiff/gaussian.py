"""Gaussian diffusion for continuous data (Sohl-Dickstein et al. 2015, section 2 and App. A).

One object owns the process math. The reverse model is any callable
``model(x_t, t) -> z`` with ``z`` of shape ``(N, 2, *x.shape[1:])`` holding (z_mu, z_Sigma);
the parameterisation turns z into the reverse kernel's mean and variance. Times are the
paper's, 1-based: t = 1..T, and tables are float64, indexed at t - 1.
"""

from enum import Enum

import torch
from torch import Tensor, nn

from thermodiff.distributions import gaussian_entropy, gaussian_kl, gaussian_log_prob
from thermodiff.schedules import Schedule


class GaussianParameterization(str, Enum):
    """How the network output (z_mu, z_Sigma) becomes the reverse kernel's mean and variance."""

    REFERENCE = "reference"  # reference code: perturbation around the forward kernel
    PAPER = "paper"  # paper Eqs. 64-65: decay towards z_mu


class Decoder(str, Enum):
    """The last reverse step p(x_0 | x_1)."""

    FORWARD = "forward"  # the forward step reversed, T_pi(x_0 | x_1; beta_1) (paper App. B.2)
    LEARNED = "learned"  # the network's kernel at t = 1


def sum_except_batch(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1)


def gather(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """table[t - 1] per example, shaped to broadcast against ``like`` (N, ...)."""
    return table[t - 1].reshape(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion(nn.Module):
    """q(x_t | x_{t-1}) = N(x_{t-1} sqrt(1 - beta_t), beta_t I), p(x_T) = N(0, I)."""

    outputs_per_dim = 2

    def __init__(
        self,
        schedule: Schedule,
        parameterization: GaussianParameterization | str = GaussianParameterization.REFERENCE,
        decoder: Decoder | str = Decoder.FORWARD,
    ):
        super().__init__()
        if not bool((schedule.betas() < 1).all()):
            raise ValueError("Gaussian diffusion needs every beta_t < 1")
        self.schedule = schedule
        self.parameterization = GaussianParameterization(parameterization)
        self.decoder = Decoder(decoder)

    @property
    def T(self) -> int:
        return self.schedule.T

    def log_alphas_cumprod(self) -> Tensor:
        """log abar_t = sum_{s <= t} log(1 - beta_s), t = 1..T (float64)."""
        return torch.cumsum(torch.log1p(-self.schedule.betas()), 0)

    def noise_like(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The standard normal draws that :meth:`q_sample` turns into x_t."""
        return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)

    def q_sample(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(x_0 sqrt(abar_t), (1 - abar_t) I) (paper App. A), from
        ``noise`` (standard normal, see :meth:`noise_like`) when given."""
        abar = gather(self.log_alphas_cumprod().exp(), t, x0)
        noise = self.noise_like(x0, generator) if noise is None else noise
        return (x0 * abar.sqrt() + noise * (1 - abar).sqrt()).to(x0.dtype)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0), t >= 2: the product of the Gaussians
        q(x_{t-1} | x_0) and q(x_t | x_{t-1}) (PAPER.md section 1; reference code)."""
        beta = gather(self.schedule.betas(), t, x0)
        abar_prev = gather(self.log_alphas_cumprod().exp(), t - 1, x0)
        c1 = 1 - abar_prev  # variance of x_{t-1} given x_0
        c2 = beta / (1 - beta)  # variance of x_{t-1} given x_t, from the forward step
        precision = 1 / c1 + 1 / c2
        mean = (x0 * abar_prev.sqrt() / c1 + x_t / (1 - beta).sqrt() / c2) / precision
        return mean, (1 / precision).expand_as(mean)

    def p_mean_var(self, model, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of the reverse kernel p(x_{t-1} | x_t) from the network output."""
        z = model(x_t, t).double()
        z_mu, z_sigma = z[:, 0], z[:, 1]
        beta = gather(self.schedule.betas(), t, x_t)
        logit_beta = torch.log(beta) - torch.log1p(-beta)
        x_t = x_t.double()
        if self.parameterization is GaussianParameterization.REFERENCE:
            # z = 0 gives the forward kernel's mean and variance; z_Sigma is scaled by sqrt(T)
            # so that its effect is commensurate with z_mu's.
            var = torch.sigmoid(z_sigma / self.T**0.5 + logit_beta)
            mean = x_t * (1 - beta).sqrt() + z_mu * beta.sqrt()
        else:
            var = torch.sigmoid(z_sigma + logit_beta)  # paper Eq. 65
            mean = (x_t - z_mu) * (1 - var) + z_mu  # paper Eq. 64
        return mean, var

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
        return sum_except_batch(gaussian_log_prob(x0d, mean, var))

    def sample_prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> Tensor:
        """x_T ~ p(x_T) = N(0, I)."""
        return torch.randn(shape, generator=generator, device=device)

    def step_distribution(self, model, x_t: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """Mean and variance of the kernel that draws x_{t-1} from x_t, the decoder at t = 1."""
        tt = torch.full((len(x_t),), t, dtype=torch.long, device=x_t.device)
        if t == 1 and self.decoder is Decoder.FORWARD:
            beta_1 = self.schedule.betas()[0]
            return x_t.double() * (1 - beta_1).sqrt(), beta_1.expand(x_t.shape)
        return self.p_mean_var(model, x_t, tt)

    def p_sample(self, model, x_t: Tensor, t: int, generator: torch.Generator | None = None, factor=None) -> Tensor:
        """Draw x_{t-1} ~ p(x_{t-1} | x_t) (at t = 1, the decoder), multiplied by ``factor``
        (see :mod:`thermodiff.posterior`) when one is given."""
        mean, var = self.step_distribution(model, x_t, t)
        if factor is not None:
            mean, var = factor.gaussian(mean, var, t, x_t)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float64)
        return (mean + var.sqrt() * noise).to(x_t.dtype)

    def null_log_likelihood(self, x0: Tensor) -> Tensor:
        """log N(x_0; 0, I) per example: the null model L_null for unit-variance data."""
        x0d = x0.double()
        return sum_except_batch(gaussian_log_prob(x0d, torch.zeros_like(x0d), torch.ones_like(x0d)))
