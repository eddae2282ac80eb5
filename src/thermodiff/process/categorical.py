"""Categorical diffusion for data of K categories: the paper's binomial diffusion (App. A) with K
states, as in Hoogeboom et al. 2021 ("Argmax flows and multinomial diffusion") and Austin et al.
2021 (D3PM).

Every step mixes a category with a fixed distribution m over the S states:
q(x_t | x_{t-1}) = Cat((1 - beta_t) e_{x_{t-1}} + beta_t m), so q(x_t | x_0) = Cat(abar_t e_{x_0}
+ (1 - abar_t) m), abar_t = prod_{s<=t} (1 - beta_s). The kernel (:class:`CategoricalKernel`)
chooses m: uniform over the K categories (S = K), a point mass on an extra absorbing "mask" state
(S = K + 1), or the training data's category frequencies (S = K; for K = 2 the binomial process
with p the data's mean). The reverse model is any callable ``model(x_t, t) -> z`` with ``z`` of
shape ``(N, K, *x.shape[1:])``: logits of x_0 (D3PM's x_0-parameterisation). States are
category indices 0..S-1, held as floats in the model's units; tables are float64, times 1-based.
Training minimises -K, or D3PM's hybrid loss -K + lambda L_ce (``loss = "hybrid"``).
"""

from enum import Enum

import torch
from torch import Tensor

from thermodiff.process.bound import HYBRID_LAMBDA, DiscreteTimeProcess, LossAwareSampler, TrainingLoss, training_loss
from thermodiff.process.contract import Decoder
from thermodiff.process.distributions import categorical_entropy, categorical_kl
from thermodiff.process.entropy import reverse_entropy_bounds
from thermodiff.process.schedules import Schedule
from thermodiff.process.tensors import sum_except_batch


class CategoricalKernel(str, Enum):
    """The distribution m that every forward step mixes in, and the chain's prior p(x_T) = m."""

    UNIFORM = "uniform"  # m = 1/K (Hoogeboom et al. 2021; D3PM's uniform Q_t)
    ABSORBING = "absorbing"  # m = e_mask, an extra state K (D3PM's absorbing Q_t): needs beta_T = 1
    MARGINAL = "marginal"  # m = the training data's category frequencies (D3PM's marginal Q_t)


class CategoricalParameterization(str, Enum):
    """How the network output z becomes the reverse kernel."""

    # z are logits of x_0, tilted by the null model's log-probabilities: p~(x_0 | x_t) = softmax(z + log pi),
    # and p(x_{t-1} | x_t) is proportional to sum_{x_0} q(x_{t-1}, x_t | x_0) p~(x_0 | x_t) (D3PM Eq. 4);
    # for K = 2 this is the binomial process's x0 parameterisation. z = 0 gives the forward posterior
    # averaged over the null model; at t = 1 it is the learned decoder.
    X0 = "x0"


class CategoricalDiffusion(DiscreteTimeProcess):
    """q(x_t | x_{t-1}) = Cat((1 - beta_t) e_{x_{t-1}} + beta_t m), p(x_T) = Cat(m). Trains on the
    bound (``loss``), with t uniform or from ``t_sampler`` (bound.DiscreteTimeProcess)."""

    dequantizes = False  # the states are the discrete values: K bounds their log-probability

    def __init__(
        self,
        schedule: Schedule,
        categories: int,
        kernel: CategoricalKernel | str = CategoricalKernel.UNIFORM,
        frequencies: Tensor | None = None,
        parameterization: CategoricalParameterization | str = CategoricalParameterization.X0,
        decoder: Decoder | str = Decoder.LEARNED,
        *,
        t_sampler: LossAwareSampler | None = None,
        loss: TrainingLoss | str = TrainingLoss.BOUND,
        hybrid_lambda: float = HYBRID_LAMBDA,
    ):
        """``frequencies``: the K data categories' probabilities, for the MARGINAL kernel only.
        ``loss``: BOUND (-K) or HYBRID (:meth:`training_loss`)."""
        super().__init__()
        if categories < 2:
            raise ValueError(f"categorical diffusion needs at least 2 categories, got {categories}")
        if schedule.learn:
            raise ValueError("categorical diffusion supports fixed schedules only")
        self.schedule, self.categories = schedule, categories
        self.kernel = CategoricalKernel(kernel)
        self.parameterization = CategoricalParameterization(parameterization)
        self.decoder = Decoder(decoder)
        if self.decoder is Decoder.DISCRETIZED:
            raise ValueError("the discretized decoder is for Gaussian diffusion; categorical data are discrete already")
        if self.kernel is CategoricalKernel.ABSORBING and self.decoder is Decoder.FORWARD:
            raise ValueError("the absorbing kernel is not reversible: use the learned decoder")
        if self.kernel is CategoricalKernel.ABSORBING and float(schedule.betas()[-1]) != 1:
            raise ValueError("the absorbing kernel needs beta_T = 1 (e.g. the 'erase' schedule), so that x_T is the mask")
        if (frequencies is not None) != (self.kernel is CategoricalKernel.MARGINAL):
            raise ValueError("category frequencies are given for the 'marginal' kernel, and only for it")
        self.register_buffer("m", self._stationary(frequencies))
        self.init_training(t_sampler, loss, hybrid_lambda)

    def check_noise_loss(self, loss: TrainingLoss) -> None:
        """HYBRID is D3PM's (:meth:`training_loss`); SIMPLE trains a noise prediction, which this has not."""
        if loss is not TrainingLoss.HYBRID:
            super().check_noise_loss(loss)

    def training_loss(self, model, x0: Tensor, draws) -> tuple[Tensor, Tensor]:
        """-K from one t per example (bound.training_loss), plus for the HYBRID loss lambda times
        the cross-entropy -log p~(x_0 | x_t) of the network's prediction at the same x_t (Austin et
        al. 2021, Eq. 5: "encourages good predictions of x_0 at each time step"), read off the
        bound's own network call, so it costs no extra forward pass."""
        if self.loss is not TrainingLoss.HYBRID:
            return super().training_loss(model, x0, draws)
        at_t = OutputsAt(model, draws.t)
        objective, k = training_loss(self, at_t, x0, draws=draws, loss=TrainingLoss.BOUND)
        return objective + self.hybrid_lambda * self.x0_cross_entropy(at_t.output, x0).mean(), k

    def x0_cross_entropy(self, z: Tensor, x0: Tensor) -> Tensor:
        """-log p~(x_0 | x_t) per example, summed over dimensions, from the network's output ``z``."""
        log_probs = torch.log_softmax(self.x0_logits(z), 1)
        return -sum_except_batch(log_probs.gather(1, x0.round().long().unsqueeze(1)).squeeze(1))

    def x0_logits(self, z: Tensor) -> Tensor:
        """The logits of p~(x_0 | x_t) over the K categories (dimension 1): the network's output
        ``z`` tilted by the null model, z + log pi (:class:`CategoricalParameterization`)."""
        return z.double() + self.null_probs().log().reshape(-1, *[1] * (z.ndim - 2))

    def _stationary(self, frequencies: Tensor | None) -> Tensor:
        """m over the S states (float64)."""
        K = self.categories
        if self.kernel is CategoricalKernel.ABSORBING:
            return torch.nn.functional.one_hot(torch.tensor(K), K + 1).double()
        if self.kernel is CategoricalKernel.UNIFORM:
            return torch.full((K,), 1 / K, dtype=torch.float64)
        m = torch.as_tensor(frequencies, dtype=torch.float64)
        if m.shape != (K,) or not bool((m > 0).all()) or abs(float(m.sum()) - 1) > 1e-9:
            raise ValueError(f"the marginal kernel needs {K} positive category frequencies summing to 1, got {m.tolist()}")
        return m

    @property
    def T(self) -> int:
        return self.schedule.T

    @property
    def outputs_per_dim(self) -> int:
        return self.categories

    @property
    def one_hot_states(self) -> int:
        return len(self.m)

    def null_probs(self) -> Tensor:
        """pi, the null model's distribution over the K categories: m, or uniform for the absorbing kernel."""
        if self.kernel is CategoricalKernel.ABSORBING:
            return torch.full((self.categories,), 1 / self.categories, dtype=torch.float64, device=self.m.device)
        return self.m

    def alphas_cumprod(self) -> Tensor:
        """abar_t for t = 0..T (index t; abar_0 = 1)."""
        betas = self.schedule.betas()
        return torch.cat([torch.ones(1, dtype=torch.float64, device=betas.device), torch.cumprod(1 - betas, 0)])

    def one_hot(self, x: Tensor) -> Tensor:
        """States (float indices) as float64 one-hot vectors over the S states, in a new last dimension."""
        return torch.nn.functional.one_hot(x.round().long(), len(self.m)).double()

    def marginal(self, probs0: Tensor, t: Tensor) -> Tensor:
        """q(x_t | x_0) = abar_t x_0 + (1 - abar_t) m for x_0 given as probabilities over the states
        (one-hot, or a distribution: the mixture), t = 0..T per example (Hoogeboom et al. Eq. 13)."""
        abar = self.alphas_cumprod()[t].reshape(-1, *[1] * (probs0.ndim - 1))
        return abar * probs0 + (1 - abar) * self.m

    def likelihood(self, x_t: Tensor, t: Tensor) -> Tensor:
        """q(x_t | x_{t-1}) as a function of the state x_{t-1} (last dimension):
        (1 - beta_t) [x_{t-1} = x_t] + beta_t m[x_t] (paper App. A, the binomial column with K states)."""
        beta = self.schedule.betas()[t - 1].reshape(-1, *[1] * x_t.ndim)
        return (1 - beta) * self.one_hot(x_t) + beta * self.m[x_t.round().long()].unsqueeze(-1)

    def posterior(self, probs0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """sum_{x_0} q(x_{t-1}, x_t | x_0) P(x_0), normalised over x_{t-1}, for x_0 ~ P given by
        ``probs0``: Bayes' rule on q(x_{t-1} | x_0) q(x_t | x_{t-1}) (Hoogeboom et al. Eq. 16; D3PM Eq. 4).
        t = 1..T; at t = 1, x_0 itself (abar_0 = 1)."""
        joint = self.likelihood(x_t, t) * self.marginal(probs0, t - 1)
        return joint / joint.sum(-1, keepdim=True)

    def noise_like(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The uniform draws that :meth:`q_sample` turns into x_t."""
        return torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)

    def draw(self, probs: Tensor, u: Tensor, dtype: torch.dtype) -> Tensor:
        """The state whose interval of the cumulative ``probs`` holds the uniform ``u`` (inverse CDF),
        scaled by the total so that rounding never reaches a state of probability 0."""
        cdf = probs.cumsum(-1)
        return (cdf <= u.unsqueeze(-1) * cdf[..., -1:]).sum(-1).to(dtype)

    def q_sample(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """A draw of x_t ~ q(x_t | x_0) from ``noise`` (uniform, see :meth:`noise_like`)."""
        noise = self.noise_like(x0, generator) if noise is None else noise
        return self.draw(self.marginal(self.one_hot(x0), t), noise, x0.dtype)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """q(x_{t-1} | x_t, x_0) over the states (last dimension), t >= 2."""
        return self.posterior(self.one_hot(x0), x_t, t)

    def x0_probs(self, model, x_t: Tensor, t: Tensor) -> Tensor:
        """p~(x_0 | x_t) = softmax(z + log pi) over the K categories, padded with 0 for the mask state."""
        probs = torch.softmax(self.x0_logits(model(x_t, t)), 1).movedim(1, -1)  # over the categories where they are the network's (faster)
        return torch.nn.functional.pad(probs, (0, len(self.m) - self.categories))

    def p_probs(self, model, x_t: Tensor, t: Tensor) -> Tensor:
        """p(x_{t-1} | x_t) over the states: the forward posterior averaged over p~(x_0 | x_t)
        (:class:`CategoricalParameterization`); the learned decoder at t = 1."""
        return self.posterior(self.x0_probs(model, x_t, t), x_t, t)

    def prior_kl(self, x0: Tensor) -> Tensor:
        """KL(q(x_T | x_0) || Cat(m)) per example (zero when beta_T = 1)."""
        T = torch.full((len(x0),), self.T, dtype=torch.long, device=x0.device)
        return sum_except_batch(categorical_kl(self.marginal(self.one_hot(x0), T), self.m.expand(*x0.shape, -1)))

    def reverse_kl(self, model, x0: Tensor, t: Tensor, generator: torch.Generator | None = None,
                   noise: Tensor | None = None) -> Tensor:
        """One-draw estimate of E_{q(x_t|x_0)} KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), t >= 2."""
        x_t = self.q_sample(x0, t, generator, noise)
        return sum_except_batch(categorical_kl(self.q_posterior(x0, x_t, t), self.p_probs(model, x_t, t)))

    def decoder_log_likelihood(self, model, x0: Tensor, generator: torch.Generator | None = None,
                               noise: Tensor | None = None) -> Tensor:
        """E_{q(x_1|x_0)} log p(x_0 | x_1) per example.

        FORWARD (paper App. B.2): p(x_0|x_1) = q(x_1|x_0) m(x_0) / m(x_1), exact by summing over
        the K values of x_1. LEARNED: one draw of x_1."""
        t1 = torch.ones(len(x0), dtype=torch.long, device=x0.device)
        if self.decoder is Decoder.FORWARD:
            q1 = self.marginal(self.one_hot(x0), t1)
            log_m0 = self.m.log()[x0.round().long()]
            return sum_except_batch((torch.special.xlogy(q1, q1) - q1 * self.m.log()).sum(-1) + log_m0)
        x_1 = self.q_sample(x0, t1, generator, noise)
        probs = self.p_probs(model, x_1, t1)
        return sum_except_batch(probs.gather(-1, x0.round().long().unsqueeze(-1)).squeeze(-1).log())

    def reverse_entropy_bounds(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """The paper's bounds on H_q(X_{t-1} | X_t), t = 2..T (entropy.reverse_entropy_bounds), per
        example, from categorical entropies H of the rows of q's matrices: with c_i the expected number
        of dimensions of ``x0`` in state i, H_q(X_t|X_0) = sum_i c_i H(abar_t e_i + (1 - abar_t) m) and
        H_q(X_t|X_{t-1}) = sum_j q_{t-1}(j) H((1 - beta_t) e_j + beta_t m), q_{t-1} = sum_i c_i's rows
        of q(x_{t-1} | x_0). The dimensions diffuse independently, so these sums are exact."""
        counts = self.one_hot(x0).flatten(1, -2).sum(1).mean(0)  # c over the S states
        eye = torch.eye(len(self.m), dtype=torch.float64, device=self.m.device)
        abar, betas = self.alphas_cumprod().reshape(-1, 1, 1), self.schedule.betas().reshape(-1, 1, 1)
        from_x0 = abar * eye + (1 - abar) * self.m  # q(x_t | x_0 = i), rows i, t = 0..T
        step_rows = categorical_entropy((1 - betas) * eye + betas * self.m)  # (T, S)
        step = ((counts @ from_x0[:-1]) * step_rows).sum(-1)
        return reverse_entropy_bounds(step, categorical_entropy(from_x0[1:]) @ counts)

    def kernel_entropy(self, model, x_t: Tensor, t: int) -> Tensor:
        """The entropy of p(x_{t-1} | x_t) per example: H of its distribution over the states, summed."""
        return sum_except_batch(categorical_entropy(self.step_distribution(model, x_t, t)))

    def null_log_likelihood(self, x0: Tensor) -> Tensor:
        """log prod_i pi(x_i) per example: the independent categorical null model L_null (see :meth:`null_probs`)."""
        return sum_except_batch(self.null_probs().log()[x0.round().long()])

    def sample_prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> Tensor:
        """x_T ~ Cat(m), independently per dimension."""
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        return self.draw(self.m.to(device).expand(*shape, -1), u, torch.float32)

    def step_distribution(self, model, x_t: Tensor, t: int) -> Tensor:
        """p(x_{t-1} | x_t) over the states (last dimension) for the step from t (the decoder at t = 1)."""
        tt = torch.full((len(x_t),), t, dtype=torch.long, device=x_t.device)
        if t == 1 and self.decoder is Decoder.FORWARD:
            # the kernel is reversible w.r.t. m (m_a Q_ab is symmetric), so its reversal is itself
            return self.marginal(self.one_hot(x_t), tt)
        return self.p_probs(model, x_t, tt)

    def p_sample(self, model, x_t: Tensor, t: int, generator: torch.Generator | None = None, factor=None) -> Tensor:
        """Draw x_{t-1} ~ p(x_{t-1} | x_t) (at t = 1, the decoder), multiplied by ``factor``
        (see :mod:`thermodiff.process.posterior`) when one is given."""
        probs = self.step_distribution(model, x_t, t)
        if factor is not None:
            probs = factor.categorical(probs, t, x_t)
        u = torch.rand(x_t.shape, generator=generator, device=x_t.device, dtype=torch.float64)
        return self.draw(probs, u, x_t.dtype)


class OutputsAt:
    """A network that keeps its output for the calls at the steps ``t`` (that very tensor): what
    the hybrid loss reads of the bound's call at the training steps (not the decoder's, at t = 1)."""

    def __init__(self, model, t: Tensor):
        self.model, self.t, self.output = model, t, None

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        z = self.model(x_t, t)
        if t is self.t:
            self.output = z
        return z
