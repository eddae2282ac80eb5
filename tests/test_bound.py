"""The variational bound K: tightness where it must be tight, unbiasedness of the one-t training
estimate, and agreement with an exactly solvable linear-Gaussian model."""

import math

import numpy as np
import pytest
import torch

from linear_gaussian import analytic_model, true_reverse
from thermodiff import BinomialDiffusion, GaussianDiffusion, exact_bound, make_schedule, training_loss
from thermodiff.process.schedules import Schedule

LOG_2PI = math.log(2 * math.pi)


def zero_model(x, t):
    return torch.zeros(len(x), 2, *x.shape[1:], dtype=torch.float64)


def log_normal(x, var):
    return -0.5 * (LOG_2PI + math.log(var) + x * x / var)


def _within(mean, target, se, k=4.0):
    return abs(mean - target) < k * se


# ----------------------------------------------------------------------------------------------
# tightness of the bound for the stationary chain

@pytest.mark.parametrize("decoder", ["forward", "learned"])
def test_zero_model_bound_is_tight_for_standard_normal_data(decoder):
    """Reference parameterisation, z = 0: every reverse kernel is the time reversal of the
    N(0, I)-stationary forward chain, so p(x_0) = N(0, I) and K = log N(x_0; 0, I) in expectation
    for every x_0 (the forward process's posterior over x_{1:T} is the model's)."""
    T, n, D = 20, 3000, 2
    diffusion = GaussianDiffusion(make_schedule("reference", T), parameterization="reference", decoder=decoder)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, D, generator=g, dtype=torch.float64)
    est = exact_bound(diffusion, zero_model, [x0[: n // 2], x0[n // 2:]], n_draws=1, generator=g)
    log_n = sum(log_normal(x0[:, d], 1.0) for d in range(D))
    diff = est.per_example - log_n
    se = float(diff.std() / math.sqrt(n))
    assert se > 0
    assert _within(float(diff.mean()), 0.0, se), (float(diff.mean()), se)
    # per x_0, not just on average: a far-out point repeated (float32 data, the common case)
    far = torch.tensor([[2.5, -1.75]], dtype=torch.float32).expand(2000, D).contiguous()
    est_far = exact_bound(diffusion, zero_model, [far], n_draws=1, generator=g)
    target = log_normal(2.5, 1.0) + log_normal(-1.75, 1.0)
    assert _within(est_far.mean, target, est_far.stderr), (est_far.mean, target, est_far.stderr)
    # the bookkeeping of BoundEstimate
    assert est.stderr == pytest.approx(float(est.per_example.std() / math.sqrt(n)), rel=1e-12)
    assert float(-est.terms.sum()) == pytest.approx(est.mean, rel=1e-10)
    null = diffusion.null_log_likelihood(x0)
    torch.testing.assert_close(null, log_n, rtol=1e-12, atol=0)


def test_exact_bound_validation_and_progress():
    diffusion = GaussianDiffusion(make_schedule("reference", 5))
    x0 = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError):
        exact_bound(diffusion, zero_model, [x0], n_draws=0)
    calls = []
    exact_bound(diffusion, zero_model, [x0, x0], callback=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (10, 10) and all(total == 10 for _, total in calls)


# ----------------------------------------------------------------------------------------------
# training_loss is an unbiased estimate of K

def _gaussian_model(x, t):
    x = x.double()
    return torch.stack([0.6 * torch.sin(2 * x) + 0.05 * t[:, None], 0.8 * torch.cos(x) - 1.5], 1)


def _binomial_model(x, t):
    x = x.double()
    return (1.2 * x - 0.5 + 0.1 * t[:, None] - 0.7 * x.roll(1, dims=1)).unsqueeze(1)


@pytest.mark.parametrize("process", ["gaussian-reference", "gaussian-paper", "binomial"])
def test_training_loss_estimate_is_unbiased(process):
    g = torch.Generator().manual_seed(1)
    if process == "binomial":
        T = 8
        diffusion = BinomialDiffusion(make_schedule("erase", T), 0.3, parameterization="forward_offset", decoder="learned")
        base = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1], [1, 0, 1, 1]], dtype=torch.float64)
        model = _binomial_model
    else:
        T = 8
        diffusion = GaussianDiffusion(make_schedule("reference", T), parameterization=process.split("-")[1], decoder="learned")
        base = torch.tensor([[0.3, -1.2], [1.5, 0.4], [-0.8, -0.1], [0.0, 2.0]], dtype=torch.float64)
        model = _gaussian_model
    reps = 6000
    x0 = base.repeat(reps, 1)
    loss, k_train = training_loss(diffusion, model, x0, g)
    assert k_train.shape == (len(x0),) and k_train.dtype == torch.float64 and not k_train.requires_grad
    assert float(loss) == pytest.approx(-float(k_train.mean()), rel=1e-6)
    est = exact_bound(diffusion, model, [base.repeat(1000, 1)], n_draws=1, generator=g)
    se_train = float(k_train.std() / math.sqrt(len(k_train)))
    se = math.sqrt(se_train**2 + est.stderr**2)
    assert _within(float(k_train.mean()), est.mean, se), (float(k_train.mean()), est.mean, se)
    # the test has power: the reference code's T (instead of T - 1) weighting would be caught
    diffusion_terms = float(est.terms[1:T].sum())
    assert diffusion_terms / (T - 1) > 6 * se


def test_training_loss_gradients_reach_the_model():
    diffusion = GaussianDiffusion(make_schedule("reference", 6), decoder="learned")
    w = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)

    def model(x, t):
        return (w.view(1, 2, 1) * x.double().unsqueeze(1)).expand(len(x), 2, x.shape[1])

    x0 = torch.randn(32, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss, _ = training_loss(diffusion, model, x0, torch.Generator().manual_seed(3))
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and (w.grad != 0).all()


# ----------------------------------------------------------------------------------------------
# an exactly solvable case: 1-D Gaussian data N(0, s^2) and the true reverse conditionals

def _exact_k(betas, s, x0):
    """log p(x_0) and the exact ELBO K(x_0) = log p(x_0) - KL(q(x_{1:T}|x_0) || p(x_{1:T}|x_0))
    for the linear-Gaussian reverse chain from p(x_T) = N(0, 1), via joint covariances."""
    T = len(betas)
    a, r, _ = true_reverse(betas, s)
    # p chain: x = M w, w ~ N(0, I_{T+1}); x_T = w_T, x_{t-1} = a_t x_t + sqrt(r_t) w_{t-1}
    M = np.zeros((T + 1, T + 1))
    M[T, T] = 1.0
    for t in range(T, 0, -1):
        M[t - 1] = a[t - 1] * M[t]
        M[t - 1, t - 1] += math.sqrt(r[t - 1])
    C = M @ M.T
    p0 = C[0, 0]
    gain = C[1:, 0] / p0
    S_p = C[1:, 1:] - np.outer(C[1:, 0], C[0, 1:]) / p0
    # q(x_{1:T} | x_0): x_t = sqrt(1 - b_t) x_{t-1} + sqrt(b_t) n_t
    Q = np.zeros((T, T))
    abar = np.cumprod(1 - np.asarray(betas))
    for t in range(1, T + 1):
        if t > 1:
            Q[t - 1] = math.sqrt(1 - betas[t - 1]) * Q[t - 2]
        Q[t - 1, t - 1] += math.sqrt(betas[t - 1])
    S_q = Q @ Q.T
    S_p_inv = np.linalg.inv(S_p)
    u = np.sqrt(abar) - gain  # mean difference per unit x_0
    tr = np.trace(S_p_inv @ S_q)
    logdet = np.linalg.slogdet(S_p)[1] - np.linalg.slogdet(S_q)[1]
    quad = u @ S_p_inv @ u
    x0 = np.asarray(x0, dtype=float)
    kl = 0.5 * (tr + quad * x0**2 - T + logdet)
    log_p = -0.5 * (LOG_2PI + math.log(p0) + x0**2 / p0)
    # the KL averaged over x_0 ~ N(0, s^2), for the identity checked below
    mean_kl = 0.5 * (tr + quad * s * s - T + logdet)
    return log_p, log_p - kl, p0, mean_kl


def _kl_normal(v1, v2):
    """KL(N(0, v1) || N(0, v2))."""
    return 0.5 * (math.log(v2 / v1) + v1 / v2 - 1)


@pytest.mark.parametrize("s", [0.5, 2.0])
def test_reference_solution_is_self_consistent(s):
    """The exact K above satisfies E_{x_0}[log p(x_0) - K(x_0)] = KL(q(x_T)||p(x_T)) - KL(q(x_0)||p(x_0))
    (chain rule of KL on the two joints, whose reverse conditionals agree)."""
    betas = [float(b) for b in make_schedule("reference", 10).betas()]
    _, _, v = true_reverse(betas, s)
    _, _, p0, mean_kl = _exact_k(betas, s, 0.0)
    assert mean_kl == pytest.approx(_kl_normal(v[-1], 1.0) - _kl_normal(s * s, p0), rel=1e-8, abs=1e-12)
    assert 0 < mean_kl < _kl_normal(v[-1], 1.0)


@pytest.mark.parametrize("parameterization", ["reference", "paper"])
@pytest.mark.parametrize("s", [0.5, 2.0])
def test_bound_for_true_reverse_model(parameterization, s):
    T = 10
    diffusion = GaussianDiffusion(make_schedule("reference", T), parameterization=parameterization, decoder="learned")
    betas = [float(b) for b in diffusion.schedule.betas()]
    model = analytic_model(betas, s, parameterization)
    a, r, v = true_reverse(betas, s)

    # the model really outputs the true reverse kernels
    xs = torch.linspace(-2, 2, 5, dtype=torch.float64)[:, None]
    for t in range(1, T + 1):
        mean, var = diffusion.p_mean_var(model, xs, torch.full((5,), t))
        torch.testing.assert_close(mean, a[t - 1] * xs, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(var, torch.full_like(xs, r[t - 1]), rtol=1e-10, atol=0)

    g = torch.Generator().manual_seed(5)
    # per x_0: exact_bound's K matches the exact ELBO and stays below log p(x_0)
    points = [-1.0, 0.0, 0.4, 1.7]
    n = 8000
    est = exact_bound(diffusion, model, [torch.full((n, 1), x, dtype=torch.float64) for x in points], n_draws=1, generator=g)
    for i, x in enumerate(points):
        k = est.per_example[i * n:(i + 1) * n]
        se = float(k.std() / math.sqrt(n))
        log_p, k_exact, _, _ = _exact_k(betas, s, x)
        assert k_exact <= log_p
        assert _within(float(k.mean()), float(k_exact), se), (x, float(k.mean()), float(k_exact), se)
        assert float(k.mean()) <= float(log_p) + 4 * se

    # over data x_0 ~ N(0, s^2): the mean gap log p(x_0) - K is the small analytic
    # KL(q(x_T)||p(x_T)) - KL(q(x_0)||p(x_0)), and at most KL(q(x_T)||p(x_T))
    m = 16_000
    x0 = torch.randn(m, 1, generator=g, dtype=torch.float64) * s
    est = exact_bound(diffusion, model, [x0], n_draws=1, generator=g)
    log_p, _, p0, mean_kl = _exact_k(betas, s, x0[:, 0].numpy())
    gap = torch.tensor(log_p) - est.per_example
    se = float(gap.std() / math.sqrt(m))
    prior_gap = _kl_normal(v[-1], 1.0)
    assert _within(float(gap.mean()), mean_kl, se), (float(gap.mean()), mean_kl, se)
    assert float(gap.mean()) < prior_gap + 4 * se
    assert float(gap.mean()) > -4 * se


def test_learned_schedule_bound_runs_without_grad():
    diffusion = GaussianDiffusion(make_schedule("learned", 5))
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    est = exact_bound(diffusion, zero_model, [x0], n_draws=2, generator=torch.Generator().manual_seed(7))
    assert not est.per_example.requires_grad and torch.isfinite(est.per_example).all()
    assert est.n_draws == 2


def test_binomial_prior_term_is_zero_only_when_chain_reaches_stationarity():
    x0 = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    erased = BinomialDiffusion(make_schedule("erase", 5), 0.3)
    assert float(erased.prior_kl(x0)) == pytest.approx(0.0, abs=1e-14)
    partial = BinomialDiffusion(Schedule(np.array([0.2, 0.5])), 0.3)
    # q(x_T=1|x_0) = x_0 * 0.4 + 0.3 * 0.6; KL to B(0.3) by hand
    kl = 0.0
    for x in (0.0, 1.0):
        m = x * 0.4 + 0.18
        kl += m * math.log(m / 0.3) + (1 - m) * math.log((1 - m) / 0.7)
    assert float(partial.prior_kl(x0)) == pytest.approx(kl, rel=1e-12)
