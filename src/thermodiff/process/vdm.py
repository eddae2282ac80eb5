"""Continuous-time Gaussian diffusion with a learned noise schedule: Variational Diffusion Models
(Kingma, Salimans, Poole and Ho, NeurIPS 2021; "VDM" below, sections of arXiv:2107.00630),
measured with the same bound as the 2015 model.

Variance preserving: q(z_s | x) = N(alpha_s x, sigma_s^2 I) for s in [0, 1], with
sigma_s^2 = sigmoid(gamma(s)), alpha_s^2 = sigmoid(-gamma(s)) and gamma increasing, so that
SNR(s) = exp(-gamma(s)) falls (VDM sec. 3.1-3.2). The network predicts the noise eps of z_s
(sec. 3.4); it is called with the continuous time s as a floating-point t, which the bump
readouts of networks.py evaluate at the same positions as the integer steps.

The bound (sec. 3.5), in nats per example:

    K = E_q log p(x | z_0) - KL(q(z_1 | x) || N(0, I)) - L_diffusion

with L_diffusion = 0.5 E_{s ~ U(0, 1), eps} gamma'(s) ||eps - eps_hat(z_s, s)||^2 in continuous time
(sec. 5), or the sum of T - 1 Gaussian KLs of the chain it induces on the times
s_t = (t - 1) / (T - 1), t = 1..T (sec. 4). That chain is offered through the process contract
(:class:`thermodiff.process.contract.Process`: steps t = 1..T, x_t = z_{s_t}, ``reverse_kl``, ``prior_kl``,
``decoder_log_likelihood``, ``p_sample``), as a chain of Gaussian kernels like the 2015 model's
(:class:`thermodiff.process.gaussian.GaussianChain`), so the exact evaluator, the sampler and the figures
treat it as they treat the 2015 model: T latents, T - 1 KL terms, a decoder at the first, K in
bits on the same footing.
"""

import copy
import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor, nn

from thermodiff.process.bound import BoundEstimate
from thermodiff.process.contract import Decoder
from thermodiff.process.distributions import gaussian_entropy, gaussian_kl, standard_normal_log_prob
from thermodiff.process.gaussian import GaussianChain
from thermodiff.process.respace import VarianceRule
from thermodiff.process.schedules import Schedule, invert_increasing
from thermodiff.process.tensors import per_example, sum_except_batch

GAMMA_0 = -13.3  # VDM's initial gamma(0) and gamma(1) (its released code's gamma_min, gamma_max)
GAMMA_1 = 5.0


class Parameterization(str, Enum):
    EPS = "eps"  # the network predicts the noise of z_s (VDM sec. 3.4)


class ScheduleGradient(str, Enum):
    """What trains the learned schedule (``diffusion.schedule_gradient``); see :meth:`VDM.diffusion_loss`."""

    BOUND = "bound"  # the bound, like every other parameter
    VARIANCE = "variance"  # its shape: E[L_diffusion^2], the estimate's variance (VDM sec. 5.2); gamma(1): the bound


class NoiseSchedule(nn.Module):
    """gamma(s) = -log SNR(s), increasing on s in [0, 1], float64.

    ``learn``: VDM's monotone network (its released code's NoiseSchedule_NNet), l1(s) + l3(phi(l2(s)))
    with phi(h) = 2 sigmoid(h) - 1 on 2 s - 1, l3 averaging over its ``features`` units and every weight
    kept positive through abs, so gamma' > 0 for any parameters; 64 units rather than VDM's 1024, for
    speed on a CPU (in continuous time the bound depends only on gamma's end points, sec. 5.1; the
    shape sets the discrete chain's steps and the estimator's variance). Unlike VDM, gamma(0) is fixed:
    sigma_0^2 = sigmoid(gamma(0)) is the bound's resolution, which the 2015 paper also fixes (beta_1,
    section 2.4.1), so that the two models' bounds compare. Otherwise the fixed line from gamma_0 to gamma_1.

    ``end_point`` (learned only): gamma(1) is a parameter of its own, gamma(s) = gamma_0 + |span| shape(s)
    with the network normalised to a shape rising from 0 to 1 (:meth:`shaped`), so that the shape can be
    trained on another objective without moving the end point, which sets the bound.
    """

    def __init__(self, gamma_0: float = GAMMA_0, gamma_1: float = GAMMA_1, learn: bool = True, features: int = 64,
                 end_point: bool = False):
        super().__init__()
        if not gamma_1 > gamma_0:
            raise ValueError(f"gamma(1) = {gamma_1} must exceed gamma(0) = {gamma_0}")
        self.learn = learn
        self.register_buffer("gamma_0", torch.tensor(gamma_0, dtype=torch.float64))
        slope = torch.tensor(gamma_1 - gamma_0, dtype=torch.float64)
        if learn:
            self.slope = nn.Parameter(slope)
            # VDM's initialisation: small weights in l2 and l3, so gamma starts as the line
            self.w2 = nn.Parameter(0.01 * torch.randn(features, dtype=torch.float64))
            self.b2 = nn.Parameter(torch.zeros(features, dtype=torch.float64))
            self.w3 = nn.Parameter(0.01 * torch.randn(features, dtype=torch.float64))
            if end_point:  # gamma(1) - gamma(0), through abs like slope
                self.span = nn.Parameter(slope.clone())
        elif end_point:
            raise ValueError("a separate end point is for the learned schedule")
        else:
            self.register_buffer("slope", slope)
        self.end_point = end_point

    def _increasing(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """The monotone network at s and its derivative in s."""
        value, slope = self.slope.abs() * s, self.slope.abs().expand_as(s)
        if self.learn:
            u = torch.sigmoid(self.w2.abs() * (2 * s[..., None] - 1) + self.b2)
            value = value + (2 * u - 1) @ self.w3.abs() / len(self.w3)
            slope = slope + (4 * u * (1 - u) * self.w2.abs()) @ self.w3.abs() / len(self.w3)
        return value, slope

    def shaped(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """With ``end_point``: gamma(s), gamma'(s), and the shape(s), shape'(s) that |span| stretches them from."""
        s = s.double()
        value, slope = self._increasing(s)
        low, high = self._increasing(torch.tensor([0.0, 1.0], dtype=s.dtype, device=s.device))[0]
        shape, dshape = (value - low) / (high - low), slope / (high - low)
        span = self.span.abs()
        return self.gamma_0 + span * shape, span * dshape, shape, dshape

    def with_slope(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """gamma(s) and gamma'(s)."""
        if self.end_point:
            return self.shaped(s)[:2]
        s = s.double()
        value, slope = self._increasing(s)
        return self.gamma_0 + value - self._increasing(s.new_zeros(()))[0], slope

    def forward(self, s: Tensor) -> Tensor:
        return self.with_slope(s)[0]


@dataclass
class ContinuousDraws:
    """The randomness of one training step: a time s in [0, 1) and the noise of z_s per example;
    sliced per process like bound.TrainingDraws."""

    s: Tensor
    noise: Tensor

    def __getitem__(self, index) -> "ContinuousDraws":
        return ContinuousDraws(self.s[index], self.noise[index])


class VDM(GaussianChain):
    """VDM's variance-preserving diffusion; see the module docstring. ``T`` is the length of the
    chain that evaluation and sampling use (it may be changed after training). ``schedule_gradient``:
    :class:`ScheduleGradient`, see :meth:`diffusion_loss`."""

    outputs_per_dim = 1
    continuous_time = True
    parameterization = Parameterization.EPS
    # p(x | z_0) = N(z_0 / alpha_0, exp(gamma_0) I): the first forward step read as a density of x,
    # not learned, like the 2015 paper's forward decoder (without its pi(x_0) / pi(x_1) factor)
    decoder = Decoder.FORWARD

    def __init__(self, T: int, schedule: str = "learned", beta_1: float | None = None,
                 schedule_gradient: ScheduleGradient | str = ScheduleGradient.BOUND):
        super().__init__()
        if T < 2:
            raise ValueError(f"T must be at least 2, got {T}")
        if schedule not in ("learned", "linear"):
            raise ValueError(f"vdm: schedule must be 'learned' (VDM's monotone network) or 'linear', got {schedule!r}")
        if schedule_gradient not in tuple(ScheduleGradient):
            raise ValueError(f"vdm: schedule_gradient must be 'bound' or 'variance', got {schedule_gradient!r}")
        self.schedule_gradient = ScheduleGradient(schedule_gradient)
        variance = self.schedule_gradient is ScheduleGradient.VARIANCE
        if variance and schedule != "learned":
            raise ValueError("vdm: schedule_gradient = 'variance' trains the learned schedule; 'linear' has nothing to train")
        self.T = T
        self.step_times: Tensor | None = None  # the chain's times when respaced (see :meth:`respaced`)
        gamma_0 = GAMMA_0 if beta_1 is None else math.log(beta_1) - math.log1p(-beta_1)  # sigma_0^2 = beta_1
        self.gamma = NoiseSchedule(gamma_0, max(GAMMA_1, gamma_0 + 1), learn=schedule == "learned", end_point=variance)

    def null_log_likelihood(self, x0: Tensor) -> Tensor:
        """log N(x; 0, I) per example: the null model L_null, as for the 2015 model."""
        return sum_except_batch(standard_normal_log_prob(x0.double()))

    def times(self, t: Tensor) -> Tensor:
        """The continuous time s_t = (t - 1) / (T - 1) of chain step t = 1..T (of a respaced
        chain: the time of the kept step it stands for)."""
        if self.step_times is not None:
            return self.step_times.to(t.device)[t - 1]
        return (t - 1).double() / (self.T - 1)

    def respaced(self, timesteps: list[int], variance_rule=None, fit=None) -> "VDM":
        """The chain on the kept steps ``timesteps`` (1-based, from 1 to T) of this chain, sharing
        the network-free process and its parameters. A VDM is defined at every time, so the respaced
        chain is the model's own chain on those times: exact, with no kernel approximation (unlike
        :class:`~thermodiff.process.respace.RespacedDiffusion`), hence no ``variance_rule`` (and no
        fitted variances: a ValueError)."""
        if variance_rule == VarianceRule.FITTED:
            raise ValueError("a VDM's respaced chain is its own model's on those times; its variances are not fitted "
                             "(--variance fitted is for discrete-time Gaussian diffusion)")
        chain = copy.copy(self)  # shares the schedule's parameters and buffers
        chain.timesteps = torch.as_tensor(timesteps, device=self.gamma.gamma_0.device)  # as RespacedDiffusion's
        chain.step_times = self.times(chain.timesteps)
        chain.T = len(timesteps)
        return chain

    def log_alphas_cumprod(self) -> Tensor:
        """log abar_t = log alpha_{s_t}^2 for the chain's steps t = 1..T (float64)."""
        return nn.functional.logsigmoid(-self.gamma(self.times(torch.arange(1, self.T + 1, device=self.gamma.gamma_0.device))))

    def betas(self) -> Tensor:
        """The chain's beta_t = 1 - abar_t / abar_{t-1}, beta_1 = 1 - abar_1 = sigma_0^2 (float64)."""
        log_abar = self.log_alphas_cumprod()
        return -torch.expm1(torch.diff(log_abar, prepend=log_abar.new_zeros(1)))

    @property
    def schedule(self) -> Schedule:
        """The chain's schedule as a fixed :class:`Schedule` (the contract's ``schedule``)."""
        return Schedule(self.betas().detach())

    def diffuse(self, x0: Tensor, gamma: Tensor, noise: Tensor) -> Tensor:
        """z = alpha x + sigma eps, a draw of q(z_s | x) at gamma = gamma(s) (VDM sec. 3.1), float64."""
        g = per_example(gamma, x0)
        return torch.sigmoid(-g).sqrt() * x0.double() + torch.sigmoid(g).sqrt() * noise

    def q_sample(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """x_t = z_{s_t} ~ q(z_{s_t} | x), in x0's dtype."""
        noise = self.noise_like(x0, generator) if noise is None else noise
        return self.diffuse(x0, self.gamma(self.times(t)), noise).to(x0.dtype)

    def eps_hat(self, model, z: Tensor, s: Tensor, dtype: torch.dtype) -> Tensor:
        """The network's noise prediction at z_s, called in the data's dtype with the time s."""
        return model(z.to(dtype), s)[:, 0].double()

    def noise_error(self, model, x0: Tensor, s: Tensor, gamma: Tensor, noise: Tensor) -> Tensor:
        """||eps - eps_hat(z_s, s)||^2 per example for z_s = :meth:`diffuse` (x0, gamma = gamma(s), eps)."""
        return sum_except_batch((noise - self.eps_hat(model, self.diffuse(x0, gamma, noise), s, x0.dtype)) ** 2)

    def decoder_variance(self) -> Tensor:
        """exp(gamma_0) = sigma_0^2 / alpha_0^2, the variance of p(x | z_0) = N(z_0 / alpha_0, exp(gamma_0) I)
        (gamma(0) is the fixed gamma_0, see :class:`NoiseSchedule`)."""
        return self.gamma.gamma_0.exp()

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(z_s | z_u, x) for s = s_{t-1} < u = s_t, chain steps t >= 2 (VDM
        App. A): with c = 1 - SNR(u) / SNR(s), mean = (alpha_u / alpha_s) (sigma_s^2 / sigma_u^2) z_u
        + alpha_s c x, variance = c sigma_s^2."""
        g_s, g_u = per_example(self.gamma(self.times(t - 1)), x_t), per_example(self.gamma(self.times(t)), x_t)
        c = -torch.expm1(g_s - g_u)
        alpha_s = torch.sigmoid(-g_s).sqrt()
        mean = (torch.sigmoid(-g_u).sqrt() / alpha_s * torch.sigmoid(g_s) / torch.sigmoid(g_u) * x_t.double()
                + alpha_s * c * x0.double())
        return mean, (c * torch.sigmoid(g_s)).expand_as(mean)

    def expected_x0(self, model, x_t: Tensor, t: int) -> Tensor:
        """The network's E[x | z_u] at chain step t: x_hat = (z_u - sigma_u eps_hat) / alpha_u (VDM
        sec. 3.3); at t = 1 the decoder's mean z_0 / alpha_0."""
        u = self.times(torch.full((len(x_t),), t, device=x_t.device))
        g_u = per_example(self.gamma(u), x_t)
        z = x_t.double()
        if t > 1:
            z = z - torch.sigmoid(g_u).sqrt() * self.eps_hat(model, x_t, u, x_t.dtype)
        return z / torch.sigmoid(-g_u).sqrt()

    def step_distribution(self, model, x_t: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """Mean and variance of the kernel that draws x_{t-1} from x_t: for t >= 2,
        p(z_s | z_u) = q(z_s | z_u, x = x_hat) (VDM sec. 3.3); for t = 1 the decoder
        N(z_0 / alpha_0, exp(gamma_0))."""
        x_hat = self.expected_x0(model, x_t, t)
        if t == 1:
            return x_hat, self.decoder_variance().expand_as(x_hat)
        return self.q_posterior(x_hat, x_t, torch.full((len(x_t),), t, device=x_t.device))

    def flow_gammas(self) -> tuple[float, float]:
        """gamma(0) (the resolution gamma_0) and gamma(1)."""
        gamma = self.gamma(torch.tensor([0.0, 1.0], dtype=torch.float64, device=self.gamma.gamma_0.device)).detach()
        return float(gamma[0]), float(gamma[1])

    def flow_eps(self, model, x: Tensor, gamma: Tensor) -> Tensor:
        """The network's noise prediction at z_s = ``x``, at the time s where gamma(s) = ``gamma`` (0-d)."""
        with torch.no_grad():
            s = invert_increasing(self.gamma, gamma, 0.0, 1.0)
        return self.eps_hat(model, x, s.expand(len(x)).to(x.device), x.dtype)

    def prior_kl(self, x0: Tensor) -> Tensor:
        """KL(q(z_1 | x) || N(0, I)) per example."""
        g_1 = self.gamma(torch.ones(1, device=x0.device))
        x = x0.double()
        return sum_except_batch(gaussian_kl(torch.sigmoid(-g_1).sqrt() * x, torch.sigmoid(g_1).expand_as(x),
                                            torch.zeros_like(x), torch.ones_like(x)))

    def decoder_log_likelihood(self, model, x0: Tensor, generator: torch.Generator | None = None,
                               noise: Tensor | None = None) -> Tensor:
        """E_{q(z_0|x)} log p(x | z_0) per example, p(x | z_0) = N(z_0 / alpha_0, exp(gamma_0) I): as
        z_0 / alpha_0 - x ~ N(0, exp(gamma_0) I), minus that Gaussian's entropy (closed form, no draw)."""
        return sum_except_batch(-gaussian_entropy(self.decoder_variance().expand(x0.shape)))

    def reverse_kl(self, model, x0: Tensor, t: Tensor, generator: torch.Generator | None = None,
                   noise: Tensor | None = None) -> Tensor:
        """One-draw KL(q(z_s | z_u, x) || p(z_s | z_u)) per example for s = s_{t-1}, u = s_t, t >= 2:
        0.5 (SNR(s) - SNR(u)) ||x - x_hat||^2 = 0.5 expm1(gamma(u) - gamma(s)) ||eps - eps_hat||^2, the
        term of VDM's discrete-time diffusion loss (sec. 4)."""
        noise = self.noise_like(x0, generator) if noise is None else noise
        u = self.times(t)
        g_u, g_s = self.gamma(u), self.gamma(self.times(t - 1))
        return 0.5 * torch.expm1(g_u - g_s) * self.noise_error(model, x0, u, g_u, noise)

    def diffusion_loss(self, model, x0: Tensor, s: Tensor, noise: Tensor) -> Tensor:
        """One draw of the continuous-time diffusion loss per example,
        0.5 gamma'(s) ||eps - eps_hat(z_s, s)||^2 (VDM sec. 5).

        With ``schedule_gradient = 'variance'`` (VDM sec. 5.2) the value and the gradients of the network
        and of gamma(1) are the bound's, but the schedule's shape (:meth:`NoiseSchedule.shaped`) gets the
        gradient of the batch mean of L^2 instead of L, at no extra cost: d L^2 = 2 L dL, so its incoming
        gradient is scaled by 2 L per example in the backward pass. In continuous time the bound depends on
        gamma only through its end points (sec. 5.1, for a denoiser read as a function of the SNR), so the
        shape lowers E[L^2] by lowering the variance of this one-draw estimate."""
        variance = self.schedule_gradient is ScheduleGradient.VARIANCE and torch.is_grad_enabled()
        g, dg, *shape = self.gamma.shaped(s) if variance else self.gamma.with_slope(s)
        loss = 0.5 * dg * self.noise_error(model, x0, s, g, noise)
        if variance:
            scale = 2 * loss.detach()  # per example; the hooks run in the backward pass, once L is known
            for v in shape:
                v.register_hook(lambda grad: grad * scale)
        return loss

    def continuous_k(self, model, x0: Tensor, s: Tensor, noise: Tensor) -> Tensor:
        """K per example with one draw of the continuous-time diffusion loss (VDM sec. 3.5, 5)."""
        return self.decoder_log_likelihood(model, x0) - self.prior_kl(x0) - self.diffusion_loss(model, x0, s, noise)

    def training_draws(self, x0: Tensor, generator: torch.Generator | None = None) -> ContinuousDraws:
        """s_i = (u + i / N) mod 1 over the batch (VDM's low-discrepancy sampler, its released code's
        antithetic_time_sampling), and eps."""
        u = torch.rand((), generator=generator, device=x0.device, dtype=torch.float64)
        s = torch.remainder(u + torch.arange(len(x0), device=x0.device, dtype=torch.float64) / len(x0), 1.0)
        return ContinuousDraws(s, self.noise_like(x0, generator))

    def training_loss(self, model, x0: Tensor, draws: ContinuousDraws) -> tuple[Tensor, Tensor]:
        """(-mean K, K per example detached), K with one draw of the continuous-time diffusion loss."""
        k = self.continuous_k(model, x0, draws.s, draws.noise)
        return -k.mean(), k.detach()

    @torch.no_grad()
    def continuous_bound(self, model, batches, n_draws: int = 1, generator: torch.Generator | None = None) -> BoundEstimate:
        """The continuous-time K on every example, its diffusion loss averaged over ``n_draws`` times
        stratified in [0, 1) per example. ``terms`` = mean (-E log p(x | z_0), L_diffusion, prior KL)."""
        per_example, term_sums = [], torch.zeros(3, dtype=torch.float64)
        for x0 in batches:
            u = torch.rand(len(x0), generator=generator, device=x0.device, dtype=torch.float64)
            diffusion = sum(self.diffusion_loss(model, x0, (u + k) / n_draws, self.noise_like(x0, generator)) / n_draws
                            for k in range(n_draws))
            terms = torch.stack([-self.decoder_log_likelihood(model, x0), diffusion, self.prior_kl(x0)], 1)
            per_example.append(-terms.sum(1).cpu())
            term_sums += terms.sum(0).cpu()
        per_example = torch.cat(per_example)
        return BoundEstimate(per_example=per_example, terms=term_sums / len(per_example), n_draws=n_draws)
