"""Closed-form densities, entropies and KLs against torch.distributions and hand-computed values."""

import math

import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from thermodiff.process.distributions import (
    bernoulli_entropy,
    bernoulli_kl,
    bernoulli_log_prob,
    gaussian_entropy,
    gaussian_kl,
    gaussian_log_prob,
    standard_normal_log_prob,
)


def _gaussian_params(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean_p = torch.randn(n, generator=g, dtype=torch.float64) * 3
    mean_q = torch.randn(n, generator=g, dtype=torch.float64) * 3
    var_p = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 2)
    var_q = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 2)
    return mean_p, var_p, mean_q, var_q


def test_gaussian_kl_matches_torch():
    mean_p, var_p, mean_q, var_q = _gaussian_params()
    ours = gaussian_kl(mean_p, var_p, mean_q, var_q)
    ref = kl_divergence(Normal(mean_p, var_p.sqrt()), Normal(mean_q, var_q.sqrt()))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    assert ours.shape == mean_p.shape


def test_gaussian_kl_is_zero_for_equal_and_asymmetric():
    mean_p, var_p, mean_q, var_q = _gaussian_params(seed=1)
    torch.testing.assert_close(gaussian_kl(mean_p, var_p, mean_p, var_p), torch.zeros_like(mean_p), atol=1e-12, rtol=0)
    # direction: KL(N(0,1) || N(0,4)) = 0.5 (log 4 + 1/4 - 1), not the reverse
    kl = gaussian_kl(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(4.0))
    assert math.isclose(float(kl), 0.5 * (math.log(4.0) + 0.25 - 1.0), rel_tol=1e-6)


def test_gaussian_kl_broadcasts():
    mean_p = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    var_p = torch.tensor(0.5, dtype=torch.float64).expand(4, 3)
    ours = gaussian_kl(mean_p, var_p, torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))
    ref = kl_divergence(Normal(mean_p, var_p.sqrt()), Normal(torch.zeros(4, 3, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64)))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_gaussian_entropy_matches_torch():
    _, var, _, _ = _gaussian_params(seed=3)
    torch.testing.assert_close(gaussian_entropy(var), Normal(torch.zeros_like(var), var.sqrt()).entropy(), rtol=1e-10, atol=1e-12)


def test_gaussian_log_prob_matches_torch():
    mean, var, x, _ = _gaussian_params(seed=4)
    torch.testing.assert_close(gaussian_log_prob(x, mean, var), Normal(mean, var.sqrt()).log_prob(x), rtol=1e-10, atol=1e-12)


def test_standard_normal_log_prob_matches_torch():
    _, _, x, _ = _gaussian_params(seed=6)
    torch.testing.assert_close(standard_normal_log_prob(x), Normal(0.0, 1.0).log_prob(x), rtol=1e-10, atol=1e-12)


def _probs(n=300, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=torch.float64) * 0.998 + 0.001,
            torch.rand(n, generator=g, dtype=torch.float64) * 0.998 + 0.001)


def test_bernoulli_kl_matches_torch():
    p, q = _probs()
    ref = kl_divergence(Bernoulli(probs=p), Bernoulli(probs=q))
    torch.testing.assert_close(bernoulli_kl(p, q), ref, rtol=1e-8, atol=1e-10)


def test_bernoulli_kl_edge_probabilities():
    q = torch.tensor([0.1, 0.5, 0.7, 0.999], dtype=torch.float64)
    # p = 0: KL = log(1 / (1 - q)); p = 1: KL = log(1 / q)  (0 log 0 = 0)
    expected0 = torch.tensor([-math.log(1 - v) for v in q.tolist()], dtype=torch.float64)
    expected1 = torch.tensor([-math.log(v) for v in q.tolist()], dtype=torch.float64)
    torch.testing.assert_close(bernoulli_kl(torch.zeros_like(q), q), expected0, rtol=1e-12, atol=0)
    torch.testing.assert_close(bernoulli_kl(torch.ones_like(q), q), expected1, rtol=1e-12, atol=0)
    # point masses against themselves: zero, finite
    for v in (0.0, 1.0):
        kl = bernoulli_kl(torch.tensor(v, dtype=torch.float64), torch.tensor(v, dtype=torch.float64))
        assert float(kl) == 0.0
    # a point mass against the opposite point mass: infinite
    assert math.isinf(float(bernoulli_kl(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))))


def test_bernoulli_entropy_matches_torch_and_edges():
    p, _ = _probs(seed=6)
    torch.testing.assert_close(bernoulli_entropy(p), Bernoulli(probs=p).entropy(), rtol=1e-8, atol=1e-10)
    edges = bernoulli_entropy(torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(edges, torch.tensor([0.0, 0.0, math.log(2.0)], dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.isfinite(edges).all()


def test_bernoulli_log_prob_matches_torch_and_edges():
    p, _ = _probs(seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.bernoulli(torch.full_like(p, 0.5), generator=g)
    torch.testing.assert_close(bernoulli_log_prob(x, p), Bernoulli(probs=p).log_prob(x), rtol=1e-8, atol=1e-10)
    one, zero = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    assert float(bernoulli_log_prob(one, one)) == 0.0
    assert float(bernoulli_log_prob(zero, zero)) == 0.0
    assert float(bernoulli_log_prob(zero, one)) == -math.inf
    assert float(bernoulli_log_prob(one, zero)) == -math.inf
