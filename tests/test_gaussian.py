"""Gaussian diffusion: forward marginals, posteriors, reverse kernels and sampling, against
Monte Carlo simulation, brute-force Bayes on a grid and the formulas of PAPER.md section 2."""

import math

import numpy as np
import pytest
import torch

from thermodiff import GaussianDiffusion, ancestral_sample, make_schedule


def zero_model(x, t):
    return torch.zeros(len(x), 2, *x.shape[1:], dtype=x.dtype)


def _abar(betas):
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - float(b)
        out.append(acc)
    return np.array(out)


def _mean_and_var_with_stderr(samples):
    """Per-column mean, variance and the standard errors of each (from the samples themselves)."""
    n = samples.shape[0]
    mean = samples.mean(0)
    centred = samples - mean
    var = (centred**2).mean(0) * n / (n - 1)
    se_mean = samples.std(0) / math.sqrt(n)
    se_var = (centred**2).std(0) / math.sqrt(n)
    return mean, var, se_mean, se_var


@pytest.mark.parametrize("t", [1, 2, 5, 10])
def test_q_sample_matches_closed_form_and_composed_kernel(t):
    T, n = 10, 40_000
    diffusion = GaussianDiffusion(make_schedule("reference", T))
    betas = diffusion.schedule.betas().numpy()
    x0_values = torch.tensor([-1.5, 0.3, 2.0], dtype=torch.float64)
    x0 = x0_values.expand(n, 3).clone()
    tt = torch.full((n,), t, dtype=torch.long)
    xt = diffusion.q_sample(x0, tt, torch.Generator().manual_seed(t))
    assert xt.shape == x0.shape and xt.dtype == x0.dtype

    # closed form N(x0 sqrt(abar_t), 1 - abar_t) with abar_t from an explicit product
    abar = _abar(betas)[t - 1]
    mean, var, se_mean, se_var = _mean_and_var_with_stderr(xt)
    assert ((mean - x0_values * math.sqrt(abar)).abs() < 4 * se_mean).all(), (mean, x0_values * math.sqrt(abar), se_mean)
    assert ((var - (1 - abar)).abs() < 4 * se_var).all(), (var, 1 - abar, se_var)

    # composing the one-step kernel x_s = sqrt(1 - b_s) x_{s-1} + sqrt(b_s) eps, s = 1..t
    g = torch.Generator().manual_seed(1000 + t)
    sim = x0.clone()
    for s in range(1, t + 1):
        b = float(betas[s - 1])
        sim = math.sqrt(1 - b) * sim + math.sqrt(b) * torch.randn(sim.shape, generator=g, dtype=torch.float64)
    mean2, var2, se_mean2, se_var2 = _mean_and_var_with_stderr(sim)
    assert ((mean - mean2).abs() < 4 * torch.sqrt(se_mean**2 + se_mean2**2)).all()
    assert ((var - var2).abs() < 4 * torch.sqrt(se_var**2 + se_var2**2)).all()


def _grid_posterior(x0, xt, t, betas):
    """Mean and variance of q(x_{t-1} | x_t, x_0) by numerical integration of
    q(x_{t-1} | x_0) q(x_t | x_{t-1}) over a fine grid (no closed form used)."""
    abar_prev = _abar(betas)[t - 2]
    b = float(betas[t - 1])
    prior_m, prior_s = x0 * math.sqrt(abar_prev), math.sqrt(1 - abar_prev)
    lik_m, lik_s = xt / math.sqrt(1 - b), math.sqrt(b / (1 - b))  # where the likelihood in x_{t-1} peaks
    lo = min(prior_m - 12 * prior_s, lik_m - 12 * lik_s)
    hi = max(prior_m + 12 * prior_s, lik_m + 12 * lik_s)
    grid = np.linspace(lo, hi, 400_001)
    log_prior = -0.5 * (grid - prior_m) ** 2 / (1 - abar_prev)
    log_lik = -0.5 * (xt - grid * math.sqrt(1 - b)) ** 2 / b
    w = np.exp(log_prior + log_lik - (log_prior + log_lik).max())
    w /= w.sum()
    mean = (w * grid).sum()
    var = (w * (grid - mean) ** 2).sum()
    return mean, var


@pytest.mark.parametrize("schedule_kind", ["reference", "cosine"])
def test_q_posterior_matches_grid_bayes(schedule_kind):
    T = 10
    diffusion = GaussianDiffusion(make_schedule(schedule_kind, T))
    betas = diffusion.schedule.betas().numpy()
    cases = [(0.5, -0.3, 2), (-1.2, 0.8, 3), (2.0, 1.5, 6), (0.0, -2.0, 9), (1.0, 0.1, 10)]
    x0 = torch.tensor([[c[0]] for c in cases], dtype=torch.float64)
    xt = torch.tensor([[c[1]] for c in cases], dtype=torch.float64)
    t = torch.tensor([c[2] for c in cases])
    mean, var = diffusion.q_posterior(x0, xt, t)
    assert mean.shape == x0.shape and var.shape == x0.shape
    for i, (a, b, tt) in enumerate(cases):
        m_grid, v_grid = _grid_posterior(a, b, tt, betas)
        assert float(mean[i, 0]) == pytest.approx(m_grid, rel=1e-6, abs=1e-8)
        assert float(var[i, 0]) == pytest.approx(v_grid, rel=1e-6)


def _sigmoid(u):
    return 1.0 / (1.0 + math.exp(-u))


@pytest.mark.parametrize("parameterization", ["reference", "paper"])
def test_p_mean_var_matches_paper_formulas(parameterization):
    T, N, D = 20, 7, 3
    diffusion = GaussianDiffusion(make_schedule("reference", T), parameterization=parameterization)
    betas = diffusion.schedule.betas().numpy()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, D, generator=g)
    t = torch.randint(1, T + 1, (N,), generator=g)
    z = torch.randn(N, 2, D, generator=g) * 2

    mean, var = diffusion.p_mean_var(lambda x_t, tt: z, x, t)
    assert mean.shape == (N, D) and var.shape == (N, D)
    for n in range(N):
        b = float(betas[int(t[n]) - 1])
        for d in range(D):
            xi, zm, zs = float(x[n, d]), float(z[n, 0, d]), float(z[n, 1, d])
            logit_b = math.log(b / (1 - b))
            if parameterization == "reference":
                # Sigma = sigmoid(z_Sigma / sqrt(T) + logit b_t);  mu = x sqrt(1 - b_t) + z_mu sqrt(b_t)
                v = _sigmoid(zs / math.sqrt(T) + logit_b)
                m = xi * math.sqrt(1 - b) + zm * math.sqrt(b)
            else:
                # paper Eqs. 64-65: Sigma = sigmoid(z_Sigma + logit b_t); mu = (x - z_mu)(1 - Sigma) + z_mu
                v = _sigmoid(zs + logit_b)
                m = (xi - zm) * (1 - v) + zm
            assert float(var[n, d]) == pytest.approx(v, rel=1e-6)
            assert float(mean[n, d]) == pytest.approx(m, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("parameterization", ["reference", "paper"])
def test_p_mean_var_with_zero_output(parameterization):
    T = 15
    diffusion = GaussianDiffusion(make_schedule("reference", T), parameterization=parameterization)
    betas = diffusion.schedule.betas()
    x = torch.randn(T, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    t = torch.arange(1, T + 1)
    mean, var = diffusion.p_mean_var(zero_model, x, t)
    b = betas[:, None].expand_as(x)
    # with z = 0 the variance is beta_t in both parameterisations
    torch.testing.assert_close(var, b, rtol=1e-12, atol=0)
    if parameterization == "reference":
        # exactly the forward kernel's mean: the reverse of the stationary N(0, 1) chain
        torch.testing.assert_close(mean, x * (1 - b).sqrt(), rtol=1e-12, atol=1e-15)
    else:
        # paper: mu = x (1 - beta_t) (decay towards z_mu = 0)
        torch.testing.assert_close(mean, x * (1 - b), rtol=1e-12, atol=1e-15)


def test_gaussian_diffusion_rejects_beta_one():
    with pytest.raises(ValueError):
        GaussianDiffusion(make_schedule("erase", 5))


def test_zero_model_samples_are_standard_normal():
    """Reference parameterisation with z = 0 and the forward decoder: every reverse kernel is
    the time reversal of the N(0, I)-stationary forward chain, so x_0 ~ N(0, I) exactly."""
    T, n, D = 20, 4000, 2
    diffusion = GaussianDiffusion(make_schedule("reference", T), parameterization="reference", decoder="forward")
    seen = []
    x0 = ancestral_sample(diffusion, zero_model, (n, D), torch.Generator().manual_seed(7),
                          callback=lambda t, x: seen.append(t))
    assert seen == list(range(T, -1, -1))
    assert x0.shape == (n, D) and torch.isfinite(x0).all()
    mean, var, se_mean, se_var = _mean_and_var_with_stderr(x0.double())
    assert (mean.abs() < 4 * se_mean).all(), (mean, se_mean)
    assert ((var - 1).abs() < 4 * se_var).all(), (var, se_var)
    # the two dimensions are independent
    corr = float((x0[:, 0] * x0[:, 1]).mean())
    assert abs(corr) < 4 / math.sqrt(n)


def test_learned_decoder_zero_model_samples_are_standard_normal():
    """With decoder='learned' and z = 0 the network's kernel at t = 1 is again the forward
    kernel's reversal (reference parameterisation), so samples are still N(0, I)."""
    T, n = 20, 4000
    diffusion = GaussianDiffusion(make_schedule("reference", T), decoder="learned")
    x0 = ancestral_sample(diffusion, zero_model, (n, 1), torch.Generator().manual_seed(8))
    mean, var, se_mean, se_var = _mean_and_var_with_stderr(x0.double())
    assert (mean.abs() < 4 * se_mean).all()
    assert ((var - 1).abs() < 4 * se_var).all()
