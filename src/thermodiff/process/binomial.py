"""Binomial diffusion for binary data (Sohl-Dickstein et al. 2015, App. A and D.1.2).

The forward kernel q(x_t = 1 | x_{t-1}) = x_{t-1} (1 - beta_t) + p beta_t decays every bit
towards the stationary Bernoulli(p) (the paper's table writes p = 0.5; its heartbeat experiment
uses the data's mean activity). The reverse model is any callable ``model(x_t, t) -> z`` with
``z`` of shape ``(N, 1, *x.shape[1:])``. Times are 1-based, tables float64.
"""

from enum import Enum

import torch
from torch import Tensor

from thermodiff.process.bound import DiscreteTimeProcess, LossAwareSampler, TrainingLoss
from thermodiff.process.contract import Decoder
from thermodiff.process.distributions import bernoulli_entropy, bernoulli_kl, bernoulli_log_prob
from thermodiff.process.entropy import reverse_entropy_bounds
from thermodiff.process.schedules import Schedule
from thermodiff.process.tensors import gather, sum_except_batch


class BinomialParameterization(str, Enum):
    """How the network output z becomes the reverse kernel's probability f_b(x_t, t)."""

    PAPER = "paper"  # f_b = sigmoid(z) (paper App. A)
    FORWARD_OFFSET = "forward_offset"  # logit f_b = z + logit of the forward kernel's mean
    # z predicts x_0: logit P(x_0 = 1 | x_t) = z + the logit under the null prior B(p) (logit p plus
    # the evidence log q(x_t|x_0=1)/q(x_t|x_0=0)), and f_b = E_{x_0 ~ P} q(x_{t-1} = 1 | x_t, x_0)
    # (Austin et al. 2021's x_0-parameterisation; the Bayes-optimal factorised kernel has exactly
    # this form). z = 0 gives the forward kernel, and at t = 1 f_b is P itself, the learned decoder.
    X0 = "x0"


class BinomialDiffusion(DiscreteTimeProcess):
    """q(x_t | x_{t-1}) = B(x_{t-1} (1 - beta_t) + p beta_t), p(x_T) = B(p). Trains on the bound
    (``loss``), with t uniform or from ``t_sampler`` (bound.DiscreteTimeProcess)."""

    outputs_per_dim = 1
    binary = True

    def __init__(
        self,
        schedule: Schedule,
        stationary_p: float,
        parameterization: BinomialParameterization | str = BinomialParameterization.FORWARD_OFFSET,
        decoder: Decoder | str = Decoder.FORWARD,
        *,
        t_sampler: LossAwareSampler | None = None,
        loss: TrainingLoss | str = TrainingLoss.BOUND,
    ):
        super().__init__()
        if not 0 < stationary_p < 1:
            raise ValueError(f"the stationary probability must lie in (0, 1), got {stationary_p}")
        if schedule.learn:
            raise ValueError("binomial diffusion supports fixed schedules only")
        self.schedule = schedule
        self.register_buffer("p", torch.tensor(float(stationary_p), dtype=torch.float64))
        self.parameterization = BinomialParameterization(parameterization)
        self.decoder = Decoder(decoder)
        if self.decoder is Decoder.DISCRETIZED:
            raise ValueError("the discretized decoder is for Gaussian diffusion of 8-bit data; binary data are discrete already")
        self.init_training(t_sampler, loss)

    @property
    def T(self) -> int:
        return self.schedule.T

    @property
    def stationary_p(self) -> float:
        return float(self.p)

    def kernel_mean(self, x_prev: Tensor, beta: Tensor) -> Tensor:
        """q(x_t = 1 | x_{t-1}) = x_{t-1} (1 - beta_t) + p beta_t (paper App. A, binomial column)."""
        return x_prev * (1 - beta) + self.p * beta

    def marginal_mean(self, x0: Tensor, t: Tensor) -> Tensor:
        """q(x_t = 1 | x_0) = x_0 abar_t + p (1 - abar_t), abar_t = prod_{s<=t} (1 - beta_s); t = 0 gives x_0."""
        abar = torch.cat([torch.ones(1, dtype=torch.float64, device=x0.device), torch.cumprod(1 - self.schedule.betas(), 0)])
        a = gather(abar, t + 1, x0)
        return x0.double() * a + self.p * (1 - a)

    def noise_like(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The uniform draws that :meth:`q_sample` turns into x_t."""
        return torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)

    def q_sample(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0): a bit is 1 where ``noise`` (uniform, see :meth:`noise_like`) falls
        below q(x_t = 1 | x_0)."""
        noise = self.noise_like(x0, generator) if noise is None else noise
        return (noise < self.marginal_mean(x0, t)).to(x0.dtype)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """q(x_{t-1} = 1 | x_t, x_0), t >= 2, by Bayes' rule on q(x_{t-1}|x_0) q(x_t|x_{t-1})."""
        beta = gather(self.schedule.betas(), t, x0)
        prior_1 = self.marginal_mean(x0, t - 1)
        x_t = x_t.double()
        like_1 = bernoulli_log_prob(x_t, self.kernel_mean(torch.ones_like(x_t), beta)).exp()
        like_0 = bernoulli_log_prob(x_t, self.kernel_mean(torch.zeros_like(x_t), beta)).exp()
        joint_1 = prior_1 * like_1
        return joint_1 / (joint_1 + (1 - prior_1) * like_0)

    def p_prob(self, model, x_t: Tensor, t: Tensor) -> Tensor:
        """f_b(x_t, t) = p(x_{t-1} = 1 | x_t) from the network output."""
        if self.parameterization is BinomialParameterization.X0:
            return self.x0_kernel(model, x_t, t)
        z = model(x_t, t).double()[:, 0]
        if self.parameterization is BinomialParameterization.FORWARD_OFFSET:
            forward = self.kernel_mean(x_t.double(), gather(self.schedule.betas(), t, x_t))
            z = z + torch.logit(forward)
        return torch.sigmoid(z)

    def evidence(self, x_t: Tensor, t: Tensor) -> Tensor:
        """log q(x_t | x_0 = 1) - log q(x_t | x_0 = 0) per bit (float64): P(x_0 | x_t) is the data
        distribution tilted by exp(evidence . x_0)."""
        x_t = x_t.double()
        return (bernoulli_log_prob(x_t, self.marginal_mean(torch.ones_like(x_t), t))
                - bernoulli_log_prob(x_t, self.marginal_mean(torch.zeros_like(x_t), t)))

    def x0_kernel(self, model, x_t: Tensor, t: Tensor) -> Tensor:
        """f_b for the x0 parameterisation: the network outputs z with logit P(x_0 = 1 | x_t) =
        z + logit p + evidence, and f_b = E_{x_0 ~ P} q(x_{t-1} = 1 | x_t, x_0)."""
        evidence = self.evidence(x_t, t)
        z = model(x_t, t).double()[:, 0]
        # P(x_0 = 1 | x_t), kept 1e-13 from 0 and 1: a certain x_0 (e.g. deterministic data at
        # t = 1) would otherwise give log 0 and NaN gradients
        p1 = torch.sigmoid((z + torch.logit(self.p) + evidence).clamp(-30, 30))
        one, zero = torch.ones_like(evidence), torch.zeros_like(evidence)
        x_t = x_t.double()
        return p1 * self.q_posterior(one, x_t, t) + (1 - p1) * self.q_posterior(zero, x_t, t)

    def prior_kl(self, x0: Tensor) -> Tensor:
        """KL(q(x_T | x_0) || B(p)) per example (zero when beta_T = 1)."""
        T = torch.full((len(x0),), self.T, dtype=torch.long, device=x0.device)
        return sum_except_batch(bernoulli_kl(self.marginal_mean(x0, T), self.p.expand_as(x0)))

    def reverse_kl(self, model, x0: Tensor, t: Tensor, generator: torch.Generator | None = None,
                   noise: Tensor | None = None) -> Tensor:
        """One-draw estimate of E_{q(x_t|x_0)} KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), t >= 2."""
        x_t = self.q_sample(x0, t, generator, noise)
        return sum_except_batch(bernoulli_kl(self.q_posterior(x0, x_t, t), self.p_prob(model, x_t, t)))

    def decoder_log_likelihood(self, model, x0: Tensor, generator: torch.Generator | None = None,
                               noise: Tensor | None = None) -> Tensor:
        """E_{q(x_1|x_0)} log p(x_0 | x_1) per example.

        FORWARD (paper App. B.2): p(x_0|x_1) = q(x_1|x_0) pi(x_0) / pi(x_1), exact by summing over
        x_1 in {0, 1}: -H_q(X_1|X_0) + log pi(x_0) - E log pi(x_1). LEARNED: one draw.
        """
        t1 = torch.ones(len(x0), dtype=torch.long, device=x0.device)
        x0d = x0.double()
        if self.decoder is Decoder.FORWARD:
            m1 = self.marginal_mean(x0, t1)
            expected_log_pi_x1 = m1 * torch.log(self.p) + (1 - m1) * torch.log1p(-self.p)
            log_pi_x0 = bernoulli_log_prob(x0d, self.p.expand_as(x0d))
            return sum_except_batch(-bernoulli_entropy(m1) + log_pi_x0 - expected_log_pi_x1)
        x_1 = self.q_sample(x0, t1, generator, noise)
        return sum_except_batch(bernoulli_log_prob(x0d, self.p_prob(model, x_1, t1)))

    def sample_prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> Tensor:
        """x_T ~ B(p), independently per bit."""
        return torch.bernoulli(self.p.float().expand(shape).to(device), generator=generator)

    def step_distribution(self, model, x_t: Tensor, t: int) -> Tensor:
        """p(x_{t-1} = 1 | x_t) for the step from t (the decoder at t = 1)."""
        tt = torch.full((len(x_t),), t, dtype=torch.long, device=x_t.device)
        if t == 1 and self.decoder is Decoder.FORWARD:
            # the two-state kernel is reversible w.r.t. B(p), so its reversal is itself
            return self.kernel_mean(x_t.double(), self.schedule.betas()[0])
        return self.p_prob(model, x_t, tt)

    def p_sample(self, model, x_t: Tensor, t: int, generator: torch.Generator | None = None, factor=None) -> Tensor:
        """Draw x_{t-1} ~ p(x_{t-1} | x_t) (at t = 1, the decoder), multiplied by ``factor``
        (see :mod:`thermodiff.process.posterior`) when one is given."""
        prob = self.step_distribution(model, x_t, t)
        if factor is not None:
            prob = factor.bernoulli(prob, t, x_t)
        return torch.bernoulli(prob, generator=generator).to(x_t.dtype)

    def reverse_entropy_bounds(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """The paper's bounds on H_q(X_{t-1} | X_t), t = 2..T (entropy.reverse_entropy_bounds), per
        example, from Bernoulli entropies H: per bit, H_q(X_t|X_0) = E_data H(q(x_t = 1 | x_0)) and
        H_q(X_t|X_{t-1}) = E_{q(x_{t-1})} H(q(x_t = 1 | x_{t-1})). Both depend on the data only
        through each bit's frequency of a 1 in ``x0`` (the bits are binary, the marginals linear in x_0)."""
        T, freq = self.T, x0.double().mean(0).flatten()
        t = torch.arange(T + 1, device=freq.device)
        ones = torch.ones(T + 1, 1, dtype=torch.float64, device=freq.device)
        from_1, from_0 = self.marginal_mean(ones, t), self.marginal_mean(ones * 0, t)  # q(x_t = 1 | x_0), t = 0..T
        given_x0 = freq * bernoulli_entropy(from_1) + (1 - freq) * bernoulli_entropy(from_0)
        prev_1 = freq * from_1[:-1] + (1 - freq) * from_0[:-1]  # q(x_{t-1} = 1), t = 1..T
        betas = self.schedule.betas().unsqueeze(1)
        step = (prev_1 * bernoulli_entropy(self.kernel_mean(ones[1:], betas))
                + (1 - prev_1) * bernoulli_entropy(self.kernel_mean(ones[1:] * 0, betas)))
        return reverse_entropy_bounds(step.sum(1), given_x0[1:].sum(1))

    def kernel_entropy(self, model, x_t: Tensor, t: int) -> Tensor:
        """The entropy of p(x_{t-1} | x_t) per example: H of its probability f_b(x_t, t), summed over bits."""
        return sum_except_batch(bernoulli_entropy(self.step_distribution(model, x_t, t)))

    def null_log_likelihood(self, x0: Tensor) -> Tensor:
        """log prod_i B(x_i; p) per example: the independent-Bernoulli null model L_null."""
        return sum_except_batch(bernoulli_log_prob(x0.double(), self.p.expand_as(x0)))
