"""Binomial diffusion, checked by exact enumeration on tiny chains.

The key tests build a 2-bit, 3- or 4-step chain with a fixed pseudo-random reverse model and
compute, by summing over every path, (a) the model's exact log-likelihood log p(x_0) and (b) the
exact ELBO E_q[log p(x_{0:T}) - log q(x_{1:T}|x_0)]; the library's bound must agree with (b).
None of the reference computations here call the library's process math.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from thermodiff import BinomialDiffusion, ancestral_sample, exact_bound, make_schedule
from thermodiff.process.schedules import Schedule

P = 0.3
D = 2
STATES = list(itertools.product([0, 1], repeat=D))  # all x in {0,1}^D


# ----------------------------------------------------------------------------------------------
# independent reference computations (pure Python / numpy)

def transition_matrix(beta, p):
    """M[a, b] = q(x_t = b | x_{t-1} = a) for one bit: keep with prob 1 - beta, else redraw B(p)."""
    return np.array([[1 - beta + beta * (1 - p), beta * p],
                     [beta * (1 - p), 1 - beta + beta * p]])


def marginal_matrix(betas, p, t):
    m = np.eye(2)
    for s in range(t):
        m = m @ transition_matrix(betas[s], p)
    return m  # m[x0, x_t] = q(x_t | x0)


def bern(x, prob):
    return prob if x == 1 else 1 - prob


def sigmoid(u):
    return 1 / (1 + math.exp(-u))


def logit(v):
    return math.log(v / (1 - v))


class TableModel:
    """A fixed pseudo-random reverse model: z = W[t - 1, state of x_t, bit], deterministic."""

    def __init__(self, T, seed, scale=1.5, zero=False):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(T, 2**D, D, generator=g, dtype=torch.float64) * scale
        if zero:
            self.W.zero_()

    def index(self, x):
        return sum(int(x[d]) * 2**d for d in range(D))

    def __call__(self, x_t, t):
        idx = sum(x_t[:, d].long() * 2**d for d in range(D))
        return self.W[t - 1, idx].unsqueeze(1)  # (N, 1, D)

    def z(self, x, t, d):
        return float(self.W[t - 1, self.index(x), d])


def reverse_prob(model, x_t, t, d, betas, parameterization, decoder):
    """p(x_{t-1, d} = 1 | x_t) written from the definitions (paper App. A / the library's docs)."""
    b = betas[t - 1]
    forward = x_t[d] * (1 - b) + P * b  # the forward kernel's mean, its own reversal w.r.t. B(P)
    if t == 1 and decoder == "forward":
        return forward
    z = model.z(x_t, t, d)
    if parameterization == "paper":
        return sigmoid(z)
    return sigmoid(z + logit(forward))


def exact_log_likelihood(x0, model, betas, parameterization, decoder):
    """(a) log p(x_0) = log sum over x_1..x_T of p(x_T) prod_t p(x_{t-1} | x_t)."""
    T = len(betas)
    total = 0.0
    for path in itertools.product(STATES, repeat=T):  # path[t - 1] = x_t
        prob = math.prod(bern(path[T - 1][d], P) for d in range(D))
        for t in range(T, 0, -1):
            prev = x0 if t == 1 else path[t - 2]
            for d in range(D):
                prob *= bern(prev[d], reverse_prob(model, path[t - 1], t, d, betas, parameterization, decoder))
        total += prob
    return math.log(total)


def exact_elbo(x0, model, betas, parameterization, decoder):
    """(b) E_{q(x_{1:T}|x_0)}[log p(x_{0:T}) - log q(x_{1:T}|x_0)] by enumerating forward paths."""
    T = len(betas)
    total = 0.0
    for path in itertools.product(STATES, repeat=T):
        log_q, log_p = 0.0, 0.0
        prev = x0
        for t in range(1, T + 1):
            for d in range(D):
                log_q += math.log(transition_matrix(betas[t - 1], P)[prev[d], path[t - 1][d]])
            prev = path[t - 1]
        log_p += sum(math.log(bern(path[T - 1][d], P)) for d in range(D))
        for t in range(T, 0, -1):
            prev = x0 if t == 1 else path[t - 2]
            for d in range(D):
                log_p += math.log(bern(prev[d], reverse_prob(model, path[t - 1], t, d, betas, parameterization, decoder)))
        total += math.exp(log_q) * (log_p - log_q)
    return total


SCHEDULES = {
    "erase4": lambda: make_schedule("erase", 4),  # beta_T = 1: q(x_T|x_0) = B(P) exactly
    "custom3": lambda: Schedule(np.array([0.15, 0.35, 0.5])),  # prior KL > 0
}


# ----------------------------------------------------------------------------------------------
# forward process

@pytest.mark.parametrize("p", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("kind", ["erase", "reference", "cosine"])
def test_marginal_mean_matches_transition_matrix_products(kind, p):
    T = 6
    diffusion = BinomialDiffusion(make_schedule(kind, T), p)
    betas = diffusion.schedule.betas().numpy()
    for x0v in (0.0, 1.0):
        x0 = torch.full((T + 1, 3), x0v, dtype=torch.float64)
        got = diffusion.marginal_mean(x0, torch.arange(0, T + 1))
        for t in range(T + 1):
            expected = marginal_matrix(betas, p, t)[int(x0v), 1]
            np.testing.assert_allclose(got[t].numpy(), expected, rtol=1e-12, atol=1e-15)


def test_q_sample_frequencies():
    T, n = 6, 20_000
    diffusion = BinomialDiffusion(make_schedule("erase", T), P)
    betas = diffusion.schedule.betas().numpy()
    x0 = torch.tensor([0.0, 1.0], dtype=torch.float64).expand(n, 2).contiguous()
    for t in (1, 3, 6):
        xt = diffusion.q_sample(x0, torch.full((n,), t), torch.Generator().manual_seed(t))
        assert set(xt.unique().tolist()) <= {0.0, 1.0}
        for col in range(2):
            q1 = marginal_matrix(betas, P, t)[col, 1]
            se = math.sqrt(q1 * (1 - q1) / n)
            assert abs(float(xt[:, col].mean()) - q1) < 4 * se + 1e-12


@pytest.mark.parametrize("kind", ["erase", "reference"])
def test_q_posterior_matches_bayes_by_enumeration(kind):
    T = 5
    diffusion = BinomialDiffusion(make_schedule(kind, T), P)
    betas = diffusion.schedule.betas().numpy()
    rows = [(x0, xt, t) for x0 in (0, 1) for xt in (0, 1) for t in range(2, T + 1)]
    x0 = torch.tensor([[r[0]] for r in rows], dtype=torch.float64)
    xt = torch.tensor([[r[1]] for r in rows], dtype=torch.float64)
    t = torch.tensor([r[2] for r in rows])
    got = diffusion.q_posterior(x0, xt, t)
    for i, (a, b, s) in enumerate(rows):
        prior = marginal_matrix(betas, P, s - 1)[a]  # q(x_{s-1} | x_0)
        step = transition_matrix(betas[s - 1], P)  # q(x_s | x_{s-1})
        joint = [prior[k] * step[k, b] for k in (0, 1)]
        assert float(got[i, 0]) == pytest.approx(joint[1] / sum(joint), rel=1e-12, abs=1e-15)


def test_forward_kernel_is_reversible_wrt_stationary():
    # the fact the 'forward' decoder relies on: pi(a) M[a, b] = pi(b) M[b, a]
    for beta in (0.01, 0.3, 0.9, 1.0):
        M = transition_matrix(beta, P)
        pi = np.array([1 - P, P])
        np.testing.assert_allclose(pi[:, None] * M, (pi[:, None] * M).T, rtol=1e-14)


def test_constructor_validation():
    with pytest.raises(ValueError):
        BinomialDiffusion(make_schedule("erase", 4), 0.0)
    with pytest.raises(ValueError):
        BinomialDiffusion(make_schedule("erase", 4), 1.0)
    with pytest.raises(ValueError):
        BinomialDiffusion(make_schedule("learned", 4), 0.3)


# ----------------------------------------------------------------------------------------------
# the bound, by enumeration

CASES = [(s, par, dec) for s in SCHEDULES for par in ("paper", "forward_offset") for dec in ("forward", "learned")]


def _reference_values(schedule_name, parameterization, decoder, zero=False):
    sched = SCHEDULES[schedule_name]()
    betas = [float(b) for b in sched.betas()]
    model = TableModel(len(betas), seed=11, zero=zero)
    diffusion = BinomialDiffusion(sched, P, parameterization=parameterization, decoder=decoder)
    loglik = {x0: exact_log_likelihood(x0, model, betas, parameterization, decoder) for x0 in STATES}
    elbo = {x0: exact_elbo(x0, model, betas, parameterization, decoder) for x0 in STATES}
    return diffusion, model, betas, loglik, elbo


@pytest.mark.parametrize("schedule_name,parameterization,decoder", CASES)
def test_enumerated_likelihood_is_normalised_and_bounds_elbo(schedule_name, parameterization, decoder):
    _, _, _, loglik, elbo = _reference_values(schedule_name, parameterization, decoder)
    assert sum(math.exp(v) for v in loglik.values()) == pytest.approx(1.0, rel=1e-12)
    for x0 in STATES:
        assert elbo[x0] <= loglik[x0] + 1e-12, (x0, elbo[x0], loglik[x0])


@pytest.mark.parametrize("schedule_name,parameterization,decoder", CASES)
def test_exact_bound_matches_enumerated_elbo(schedule_name, parameterization, decoder):
    """THE KEY TEST: the library's K (all T - 1 terms, Monte Carlo over x_t) has the exact ELBO
    as its expectation for every x_0, within 4 standard errors."""
    diffusion, model, _, loglik, elbo = _reference_values(schedule_name, parameterization, decoder)
    n = 1000  # examples per x_0, each averaging 3 draws per term
    batches = [torch.tensor(x0, dtype=torch.float64).expand(n, D).contiguous() for x0 in STATES]
    est = exact_bound(diffusion, model, batches, n_draws=3, generator=torch.Generator().manual_seed(3))
    assert est.n_draws == 3
    assert est.per_example.shape == (len(STATES) * n,)
    assert est.terms.shape == (diffusion.T + 1,)
    for i, x0 in enumerate(STATES):
        k = est.per_example[i * n:(i + 1) * n]
        se = float(k.std() / math.sqrt(n))
        assert abs(float(k.mean()) - elbo[x0]) < 4 * se + 1e-10, (x0, float(k.mean()), elbo[x0], se)
        assert float(k.mean()) <= loglik[x0] + 4 * se + 1e-10
    # the terms: K = -sum(terms) on average
    assert float(-est.terms.sum()) == pytest.approx(est.mean, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("schedule_name,parameterization,decoder", CASES)
def test_library_terms_in_expectation_equal_enumerated_elbo(schedule_name, parameterization, decoder):
    """Averaging the library's per-term quantities exactly over x_t ~ q(x_t|x_0) (by enumerating
    the 4 states instead of sampling) reproduces the enumerated ELBO to rounding error."""
    from thermodiff.process.distributions import bernoulli_kl, bernoulli_log_prob

    diffusion, model, betas, _, elbo = _reference_values(schedule_name, parameterization, decoder)
    T = len(betas)
    states = torch.tensor(STATES, dtype=torch.float64)
    for x0 in STATES:
        x0t = torch.tensor([x0], dtype=torch.float64)
        k = -float(diffusion.prior_kl(x0t)[0])
        for t in range(1, T + 1):
            m = marginal_matrix(betas, P, t)
            weights = [math.prod(m[x0[d], s[d]] for d in range(D)) for s in STATES]
            x0s = x0t.expand(len(STATES), D)
            tt = torch.full((len(STATES),), t)
            if t == 1:
                if decoder == "forward":
                    k += float(diffusion.decoder_log_likelihood(model, x0t)[0])
                    continue
                vals = bernoulli_log_prob(x0s, diffusion.p_prob(model, states, tt)).sum(1)
                k += sum(w * float(v) for w, v in zip(weights, vals))
            else:
                vals = bernoulli_kl(diffusion.q_posterior(x0s, states, tt), diffusion.p_prob(model, states, tt)).sum(1)
                k -= sum(w * float(v) for w, v in zip(weights, vals))
        assert k == pytest.approx(elbo[x0], rel=1e-10, abs=1e-12), (x0, k, elbo[x0])


@pytest.mark.parametrize("schedule_name", ["erase4"])
def test_zero_model_forward_offset_is_tight_at_stationary_likelihood(schedule_name):
    """z = 0 with FORWARD_OFFSET makes every reverse kernel the forward kernel, the exact
    reversal of the chain started at B(p) (beta_T = 1 makes q(x_T|x_0) stationary too), so
    p(x_0) = B(x_0; p) and the bound is tight: K = log B(x_0; p) for every x_0."""
    diffusion, model, _, loglik, elbo = _reference_values(schedule_name, "forward_offset", "forward", zero=True)
    for x0 in STATES:
        log_b = sum(math.log(bern(x0[d], P)) for d in range(D))
        assert loglik[x0] == pytest.approx(log_b, rel=1e-12)
        assert elbo[x0] == pytest.approx(log_b, rel=1e-12)
    n = 3000
    batches = [torch.tensor(x0, dtype=torch.float64).expand(n, D).contiguous() for x0 in STATES]
    est = exact_bound(diffusion, model, batches, n_draws=1, generator=torch.Generator().manual_seed(4))
    for i, x0 in enumerate(STATES):
        k = est.per_example[i * n:(i + 1) * n]
        se = float(k.std() / math.sqrt(n))
        log_b = sum(math.log(bern(x0[d], P)) for d in range(D))
        assert abs(float(k.mean()) - log_b) < 4 * se + 1e-10, (x0, float(k.mean()), log_b, se)
    # and null_log_likelihood is that same log B(x_0; p)
    null = diffusion.null_log_likelihood(torch.tensor(STATES, dtype=torch.float64))
    expected = [sum(math.log(bern(x0[d], P)) for d in range(D)) for x0 in STATES]
    np.testing.assert_allclose(null.numpy(), expected, rtol=1e-12)
    assert float(diffusion.prior_kl(torch.tensor(STATES, dtype=torch.float64)).abs().max()) < 1e-12


# ----------------------------------------------------------------------------------------------
# sampling

def test_zero_model_samples_have_mean_p():
    T, n, bits = 20, 4000, 5
    diffusion = BinomialDiffusion(make_schedule("erase", T), P, parameterization="forward_offset")
    model = lambda x, t: torch.zeros(len(x), 1, *x.shape[1:])  # noqa: E731
    x0 = ancestral_sample(diffusion, model, (n, bits), torch.Generator().manual_seed(9))
    assert x0.shape == (n, bits)
    assert set(x0.unique().tolist()) <= {0.0, 1.0}
    se = math.sqrt(P * (1 - P) / (n * bits))
    assert abs(float(x0.mean()) - P) < 4 * se
    per_bit_se = math.sqrt(P * (1 - P) / n)
    assert ((x0.double().mean(0) - P).abs() < 4 * per_bit_se).all()


@pytest.mark.parametrize("decoder", ["forward", "learned"])
def test_ancestral_samples_follow_enumerated_marginal(decoder):
    """Frequencies of the 4 states of x_0 drawn by ancestral sampling from a random model equal
    the enumerated p(x_0) within 4 standard errors."""
    diffusion, model, _, loglik, _ = _reference_values("custom3", "paper", decoder)
    n = 20_000
    x0 = ancestral_sample(diffusion, model, (n, D), torch.Generator().manual_seed(10))
    for x in STATES:
        p_x = math.exp(loglik[x])
        freq = float((x0 == torch.tensor(x, dtype=x0.dtype)).all(1).double().mean())
        assert abs(freq - p_x) < 4 * math.sqrt(p_x * (1 - p_x) / n), (x, freq, p_x)


# ----------------------------------------------------------------------------------------------
# the x0 parameterisation

def test_x0_parameterization_matches_definition():
    """f_b = sum_b P(x_0 = b | x_t) q(x_{t-1} = 1 | x_t, x_0 = b) with logit P = z + logit p +
    log q(x_t|1)/q(x_t|0), from the transition matrices; at t = 1 f_b = P (the decoder)."""
    sched = make_schedule("erase", 5)
    betas = [float(b) for b in sched.betas()]
    diffusion = BinomialDiffusion(sched, P, parameterization="x0", decoder="learned")

    def model(x, t):
        return (0.7 * x - 0.4 * t[:, None].double() + 0.3).unsqueeze(1)

    states = torch.tensor(STATES, dtype=torch.float64)
    for t in range(1, 6):
        tt = torch.full((len(STATES),), t)
        f = diffusion.p_prob(model, states, tt)
        m = marginal_matrix(betas, P, t)  # m[x0, x_t]
        m_prev = marginal_matrix(betas, P, t - 1)
        step = transition_matrix(betas[t - 1], P)
        for i, x in enumerate(STATES):
            for d in range(D):
                evidence = math.log(m[1, x[d]] / m[0, x[d]])
                p1 = sigmoid(0.7 * x[d] - 0.4 * t + 0.3 + logit(P) + evidence)
                if t == 1:
                    expected = p1
                else:
                    post = [m_prev[b, 1] * step[1, x[d]] / sum(m_prev[b, a] * step[a, x[d]] for a in (0, 1)) for b in (0, 1)]
                    expected = p1 * post[1] + (1 - p1) * post[0]
                assert float(f[i, d]) == pytest.approx(expected, rel=1e-9)


def test_x0_zero_model_is_the_forward_kernel_and_certain_x0_stays_finite():
    diffusion = BinomialDiffusion(make_schedule("erase", 6), P, parameterization="x0", decoder="learned")
    states = torch.tensor(STATES, dtype=torch.float64).repeat(3, 1)
    for t in range(2, 7):
        tt = torch.full((len(states),), t)
        f = diffusion.p_prob(lambda v, t: torch.zeros(len(v), 1, D, dtype=v.dtype), states, tt)
        forward = diffusion.kernel_mean(states, diffusion.schedule.betas()[t - 1])
        torch.testing.assert_close(f, forward, rtol=1e-12, atol=1e-12)
    # a network certain of x_0 (huge z) keeps the decoder's log-probability and gradient finite
    z = torch.full((len(states), 1, D), 1e4, dtype=torch.float64, requires_grad=True)
    ll = diffusion.decoder_log_likelihood(lambda v, t: z, torch.zeros_like(states))
    ll.sum().backward()
    assert torch.isfinite(ll).all() and torch.isfinite(z.grad).all()
