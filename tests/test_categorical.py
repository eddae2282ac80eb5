"""Categorical diffusion (process/categorical.py), checked against computations that do not call
its math: transition matrices and their products, Bayes' rule by enumeration, and on a tiny chain
(D = 2 dimensions, K = 3 categories, T = 3 steps) the model's exact log-likelihood and ELBO by
summing over every path. Then its reduction to binomial diffusion at K = 2, training, the
selection rule and the command line."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import TINY_SEED, TINY_TEST_FRACTION, assert_one_line_error

from thermodiff import BinomialDiffusion, CategoricalDiffusion, ancestral_sample, exact_bound, make_schedule
from thermodiff.data.dataset import Lattice, split
from thermodiff.nets.vector import build_vector_net
from thermodiff.process.schedules import Schedule
from thermodiff.run.autoconfig import MAX_CATEGORIES, kind_choice

K, D = 3, 2
SCHEDULES = {
    "erase3": lambda: make_schedule("erase", 3),  # beta_T = 1: x_T is a draw of m
    "custom3": lambda: Schedule(np.array([0.15, 0.35, 0.5])),  # prior KL > 0
}
FREQUENCIES = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)


def process(schedule: str, kernel: str, decoder: str = "learned") -> CategoricalDiffusion:
    frequencies = FREQUENCIES if kernel == "marginal" else None
    return CategoricalDiffusion(SCHEDULES[schedule](), K, kernel, frequencies, decoder=decoder)


# ----------------------------------------------------------------------------------------------
# independent reference computations (numpy matrices over the S states of one dimension)

def stationary(kernel: str) -> np.ndarray:
    return {"uniform": np.full(K, 1 / K), "absorbing": np.eye(K + 1)[K], "marginal": FREQUENCIES.numpy()}[kernel]


def step_matrix(beta: float, m: np.ndarray) -> np.ndarray:
    """Q[a, b] = q(x_t = b | x_{t-1} = a): keep a with probability 1 - beta, else draw from m."""
    return (1 - beta) * np.eye(len(m)) + beta * np.outer(np.ones(len(m)), m)


def marginal_matrix(betas, m, t: int) -> np.ndarray:
    out = np.eye(len(m))
    for s in range(t):
        out = out @ step_matrix(betas[s], m)
    return out  # out[x0, x_t] = q(x_t | x0)


class TableModel:
    """A fixed pseudo-random reverse model: z = W[t - 1, joint state of x_t, category, dimension]."""

    def __init__(self, T: int, states: int, seed: int = 5):
        self.states = states
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(T, states**D, K, D, generator=g, dtype=torch.float64) * 1.5

    def __call__(self, x_t, t):
        index = sum(x_t[:, d].round().long() * self.states**d for d in range(D))
        return self.W[t - 1, index]  # (N, K, D)


def reverse_probs(model: TableModel, m: np.ndarray, betas, x_t: tuple, t: int, forward_decoder: bool) -> np.ndarray:
    """p(x_{t-1, d} = . | x_t) per dimension d, (D, S), from D3PM's Eq. 4 written as sums over x_0:
    sum_{x_0} q(x_{t-1} | x_0) q(x_t | x_{t-1}) p~(x_0 | x_t), p~ = softmax(z + log pi)."""
    S = len(m)
    if t == 1 and forward_decoder:
        return np.stack([marginal_matrix(betas, m, 1)[x_t[d]] for d in range(D)])  # its own reversal
    pi = m[:K] if S == K else np.full(K, 1 / K)
    z = model.W[t - 1, sum(x_t[d] * S**d for d in range(D))].numpy()
    out = []
    for d in range(D):
        logits = z[:, d] + np.log(pi)
        p0 = np.exp(logits - logits.max())
        p0 /= p0.sum()
        prev = marginal_matrix(betas, m, t - 1)  # q(x_{t-1} | x_0), rows x_0
        joint = sum(p0[a] * prev[a] * step_matrix(betas[t - 1], m)[:, x_t[d]] for a in range(K))
        # a state that q never reaches at t (the absorbing kernel's data states at beta_t = 1) has
        # p(x_t) = 0 in the sum over paths: any kernel from it will do
        out.append(joint / joint.sum() if joint.sum() > 0 else np.full(S, 1 / S))
    return np.stack(out)


def reverse_table(model, m, betas, forward_decoder: bool) -> dict:
    """reverse_probs for every step t and joint state x_t."""
    states = itertools.product(range(len(m)), repeat=D)
    return {(t, x): reverse_probs(model, m, betas, x, t, forward_decoder)
            for x in states for t in range(1, len(betas) + 1)}


def path_terms(x0, model, m, betas, forward_decoder: bool):
    """(log q(x_{1:T} | x_0), log p(x_{0:T})) for every forward path x_1..x_T over the S^D joint states."""
    T, S = len(betas), len(m)
    states = list(itertools.product(range(S), repeat=D))
    table = reverse_table(model, m, betas, forward_decoder)
    for path in itertools.product(states, repeat=T):  # path[t - 1] = x_t
        log_q, prev = 0.0, x0
        for t in range(1, T + 1):
            log_q += sum(math.log(max(step_matrix(betas[t - 1], m)[prev[d], path[t - 1][d]], 1e-300)) for d in range(D))
            prev = path[t - 1]
        if log_q < -600:
            continue  # an impossible path (the absorbing kernel's)
        log_p = sum(math.log(m[path[T - 1][d]]) for d in range(D))
        for t in range(T, 0, -1):
            prev = x0 if t == 1 else path[t - 2]
            probs = table[t, path[t - 1]]
            log_p += sum(math.log(probs[d, prev[d]]) for d in range(D))
        yield log_q, log_p


def exact_log_likelihood(x0, model, m, betas, forward_decoder) -> float:
    """log p(x_0) = log sum over all reverse paths (every path q can take, and others: p(x_{0:T}) is
    summed over x_{1:T} with log p evaluated on every joint state)."""
    T, S = len(betas), len(m)
    states = list(itertools.product(range(S), repeat=D))
    # p(x_{t-1} | x_t) as a matrix over joint states, then the chain's marginal of x_0
    dist = np.array([math.prod(m[s[d]] for d in range(D)) for s in states])
    table = reverse_table(model, m, betas, forward_decoder)
    for t in range(T, 0, -1):
        step = np.array([[math.prod(table[t, a][d, b[d]] for d in range(D))
                          for b in states] for a in states])
        dist = dist @ step
    return math.log(dist[states.index(tuple(x0))])


def exact_elbo(x0, model, m, betas, forward_decoder) -> float:
    return sum(math.exp(lq) * (lp - lq) for lq, lp in path_terms(x0, model, m, betas, forward_decoder))


# ----------------------------------------------------------------------------------------------
# the forward process

@pytest.mark.parametrize("kernel, schedule", [("uniform", "erase"), ("uniform", "cosine"), ("absorbing", "erase"),
                                              ("marginal", "erase"), ("marginal", "cosine")])
def test_marginals_match_matrix_powers(kernel, schedule):
    T = 6
    diffusion = CategoricalDiffusion(make_schedule(schedule, T), K, kernel, FREQUENCIES if kernel == "marginal" else None)
    betas, m = diffusion.schedule.betas().numpy(), stationary(kernel)
    for x0v in range(K):
        x0 = torch.full((T + 1, 2), float(x0v), dtype=torch.float64)
        got = diffusion.marginal(diffusion.one_hot(x0), torch.arange(0, T + 1))
        for t in range(T + 1):
            np.testing.assert_allclose(got[t, 0].numpy(), marginal_matrix(betas, m, t)[x0v], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kernel", ["uniform", "absorbing", "marginal"])
def test_posterior_matches_bayes_by_enumeration(kernel):
    T = 5
    diffusion = CategoricalDiffusion(make_schedule("erase", T), K, kernel, FREQUENCIES if kernel == "marginal" else None)
    betas, m = diffusion.schedule.betas().numpy(), stationary(kernel)
    S = len(m)
    rows = [(a, b, t) for a in range(K) for b in range(S) for t in range(2, T + 1)
            if marginal_matrix(betas, m, t)[a, b] > 0]  # x_t reachable from x_0
    x0 = torch.tensor([[r[0]] for r in rows], dtype=torch.float64)
    xt = torch.tensor([[r[1]] for r in rows], dtype=torch.float64)
    got = diffusion.q_posterior(x0, xt, torch.tensor([r[2] for r in rows]))
    for i, (a, b, t) in enumerate(rows):
        joint = marginal_matrix(betas, m, t - 1)[a] * step_matrix(betas[t - 1], m)[:, b]
        np.testing.assert_allclose(got[i, 0].numpy(), joint / marginal_matrix(betas, m, t)[a, b], rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("kernel", ["uniform", "absorbing"])
def test_q_sample_frequencies(kernel):
    """Draws of x_t against q(x_t | x_0), within 4 standard errors of a multinomial frequency."""
    T, n = 5, 20_000
    diffusion = CategoricalDiffusion(make_schedule("erase", T), K, kernel)
    betas, m = diffusion.schedule.betas().numpy(), stationary(kernel)
    x0 = torch.tensor([0.0, 2.0], dtype=torch.float64).expand(n, 2).contiguous()
    for t in (1, 3, 5):
        xt = diffusion.q_sample(x0, torch.full((n,), t), torch.Generator().manual_seed(t))
        for col, a in enumerate((0, 2)):
            q = marginal_matrix(betas, m, t)[a]
            freq = np.bincount(xt[:, col].long().numpy(), minlength=len(m)) / n
            assert (np.abs(freq - q) <= 4 * np.sqrt(np.clip(q * (1 - q), 0, None) / n) + 1e-12).all()


def test_constructor_validation():
    with pytest.raises(ValueError, match="beta_T = 1"):
        CategoricalDiffusion(make_schedule("cosine", 4), K, "absorbing")
    with pytest.raises(ValueError, match="not reversible"):
        CategoricalDiffusion(make_schedule("erase", 4), K, "absorbing", decoder="forward")
    with pytest.raises(ValueError, match="frequencies"):
        CategoricalDiffusion(make_schedule("erase", 4), K, "uniform", FREQUENCIES)
    with pytest.raises(ValueError, match="frequencies"):
        CategoricalDiffusion(make_schedule("erase", 4), K, "marginal", torch.tensor([0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="at least 2"):
        CategoricalDiffusion(make_schedule("erase", 4), 1)


# ----------------------------------------------------------------------------------------------
# the bound, by enumeration of the tiny chain

CASES = [("erase3", "uniform", "learned"), ("custom3", "uniform", "learned"), ("custom3", "uniform", "forward"),
         ("erase3", "absorbing", "learned"), ("custom3", "marginal", "learned"), ("erase3", "marginal", "forward")]


def exact_terms_bound(diffusion: CategoricalDiffusion, model, x0: torch.Tensor) -> float:
    """K with every expectation over x_t taken exactly: each KL and the decoder term at every
    x_t of one dimension pair, weighted by q(x_t | x_0) (noise chosen to land on that state)."""
    S, T = len(diffusion.m), diffusion.T
    states = torch.tensor(list(itertools.product(range(S), repeat=D)), dtype=torch.float64)
    x0s = x0.expand(len(states), D)
    total = -float(diffusion.prior_kl(x0[None])[0])
    for t in range(1, T + 1):
        tt = torch.full((len(states),), t)
        q = diffusion.marginal(diffusion.one_hot(x0s), tt)  # (n, D, S)
        cdf = q.cumsum(-1)
        lower = torch.cat([torch.zeros_like(cdf[..., :1]), cdf[..., :-1]], -1)
        weight = q.gather(-1, states.long().unsqueeze(-1)).squeeze(-1).prod(1)
        noise = ((lower + cdf) / 2).gather(-1, states.long().unsqueeze(-1)).squeeze(-1)  # inside x_t's interval
        keep = weight > 0
        if t == 1:
            term = diffusion.decoder_log_likelihood(model, x0s[keep], noise=noise[keep])
        else:
            term = -diffusion.reverse_kl(model, x0s[keep], tt[keep], noise=noise[keep])
        total += float((weight[keep] * term).sum())
    return total


@pytest.mark.parametrize("schedule, kernel, decoder", CASES)
def test_bound_equals_enumerated_elbo_and_bounds_log_likelihood(schedule, kernel, decoder):
    diffusion = process(schedule, kernel, decoder)
    betas, m = diffusion.schedule.betas().numpy(), stationary(kernel)
    model = TableModel(diffusion.T, len(m))
    for x0 in [(0, 0), (1, 2), (2, 1)]:
        x = torch.tensor(x0, dtype=torch.float64)
        elbo = exact_elbo(x0, model, m, betas, decoder == "forward")
        loglik = exact_log_likelihood(x0, model, m, betas, decoder == "forward")
        assert exact_terms_bound(diffusion, model, x) == pytest.approx(elbo, abs=1e-10)
        assert loglik >= elbo - 1e-12
        assert loglik - elbo > 1e-3  # a pseudo-random model is not the true reversal: the bound is loose


def test_exact_bound_averages_to_the_enumerated_elbo():
    """exact_bound's one-draw terms, averaged over many draws, within 4 standard errors of the ELBO."""
    diffusion = process("custom3", "uniform")
    model = TableModel(diffusion.T, K)
    x0 = (1, 2)
    elbo = exact_elbo(x0, model, stationary("uniform"), diffusion.schedule.betas().numpy(), False)
    x = torch.tensor([x0], dtype=torch.float64).expand(4000, D)
    estimate = exact_bound(diffusion, model, [x], generator=torch.Generator().manual_seed(0))
    assert abs(estimate.mean - elbo) < 4 * estimate.stderr


def test_null_log_likelihood_is_the_independent_categorical():
    x = torch.tensor([[0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    expected = [math.log(0.5) + math.log(0.3), 2 * math.log(0.2)]
    np.testing.assert_allclose(process("erase3", "marginal").null_log_likelihood(x).numpy(), expected, rtol=1e-13)
    np.testing.assert_allclose(process("erase3", "absorbing").null_log_likelihood(x).numpy(), [2 * math.log(1 / 3)] * 2)


# ----------------------------------------------------------------------------------------------
# K = 2: the binomial process

@pytest.mark.parametrize("kernel, decoder", [("uniform", "learned"), ("uniform", "forward"),
                                             ("marginal", "learned"), ("marginal", "forward")])
def test_two_categories_reduce_to_binomial_diffusion(kernel, decoder):
    """With m = (1 - p, p) (uniform: p = 1/2), the x0 parameterisation with logits (0, z) is the
    binomial x0 parameterisation with z, so every term of the bound agrees, draw for draw (the
    binomial process draws a 1 where u < q(x_t = 1), this one the category above u' = 1 - u)."""
    p = 0.5 if kernel == "uniform" else 0.3
    schedule = Schedule(np.array([0.1, 0.3, 0.5, 0.7]))
    binomial = BinomialDiffusion(schedule, p, "x0", decoder)
    categorical = CategoricalDiffusion(schedule, 2, kernel, torch.tensor([1 - p, p], dtype=torch.float64) if kernel == "marginal" else None,
                                       decoder=decoder)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 2, (64, 5), generator=g).double()
    z = torch.randn(4, 64, 5, generator=g, dtype=torch.float64)
    binomial_net = lambda x, t: z[t - 1, torch.arange(len(x))].unsqueeze(1)  # noqa: E731
    categorical_net = lambda x, t: torch.stack([torch.zeros_like(z[0]), z[t - 1, torch.arange(len(x))]], 1)  # noqa: E731
    u = torch.rand(x0.shape, generator=g, dtype=torch.float64)
    for t in (2, 3, 4):
        tt = torch.full((64,), t)
        torch.testing.assert_close(categorical.reverse_kl(categorical_net, x0, tt, noise=1 - u),
                                   binomial.reverse_kl(binomial_net, x0, tt, noise=u), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(categorical.decoder_log_likelihood(categorical_net, x0, noise=1 - u),
                               binomial.decoder_log_likelihood(binomial_net, x0, noise=u), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(categorical.prior_kl(x0), binomial.prior_kl(x0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(categorical.null_log_likelihood(x0), binomial.null_log_likelihood(x0), rtol=1e-12, atol=0)


def test_samples_have_the_chains_states():
    diffusion = process("erase3", "absorbing")
    model = TableModel(diffusion.T, K + 1)
    x = ancestral_sample(diffusion, model, (500, D), torch.Generator().manual_seed(0))
    assert set(x.unique().tolist()) <= {0.0, 1.0, 2.0}  # never the mask: the decoder is a draw of x_0


# ----------------------------------------------------------------------------------------------
# the network, and training

def test_one_hot_network_sees_the_states_and_outputs_K_logits():
    net = build_vector_net("mlp", 3, K, 4, hidden=8, layers=1, one_hot_states=K + 1)
    x = torch.tensor([[0.0, 3.0, 1.0], [2.0, 3.0, 1.0]])
    z = net(x, torch.tensor([1, 4]))
    assert z.shape == (2, K, 3)
    first = net.net.features[0]  # Linear over the D (K + 1) one-hot codes
    assert first.in_features == 3 * (K + 1)
    codes = torch.nn.functional.one_hot(x.long(), K + 1).flatten(1).float()
    torch.testing.assert_close(net.net.features(codes), net.net.features[1](first(codes)))


def correlated_symbols(n: int, seed: int) -> np.ndarray:
    """4 columns of 3 symbols: a uniform, b = a + {0, 1}, c skewed, d = 2 b + c (mod 3): 3.88 bits of entropy."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, n)
    b = (a + rng.integers(0, 2, n)) % 3
    c = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    return np.stack([a, b, c, (2 * b + c) % 3], 1).astype(np.int64)


def test_training_raises_the_held_out_bound():
    """A few hundred Adam steps on the bound raise K on held-out examples by many standard errors."""
    torch.manual_seed(0)
    diffusion = CategoricalDiffusion(make_schedule("erase", 20), 3, "uniform")
    net = build_vector_net("resmlp", 4, 3, 20, hidden=64, layers=2, one_hot_states=3)
    data = torch.as_tensor(correlated_symbols(2400, 1), dtype=torch.float32)
    train, test = data[:2000], data[2000:]

    def bound():
        with torch.no_grad():
            return exact_bound(diffusion, net, [test], generator=torch.Generator().manual_seed(1))

    before = bound()
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(300):
        x0 = train[torch.randint(len(train), (128,), generator=g)]
        loss, _ = diffusion.training_loss(net, x0, diffusion.training_draws(x0, g))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = bound()
    assert after.mean - before.mean > 5 * math.hypot(after.stderr, before.stderr)


@pytest.mark.parametrize("kernel", ["uniform", "absorbing"])
def test_hybrid_loss_adds_the_x0_cross_entropy_at_the_training_steps(kernel):
    """D3PM's hybrid loss: -K's one-t estimate (unchanged, the same draws) plus lambda times
    -log p~(x_0 | x_t) at the drawn x_t, computed here with torch.distributions from the network's
    logits tilted by the null model; lambda = 0 is the bound's loss, and SIMPLE is refused."""
    lam = 0.25
    schedule = make_schedule("erase", 6)
    hybrid = CategoricalDiffusion(schedule, K, kernel, loss="hybrid", hybrid_lambda=lam)
    bound = CategoricalDiffusion(schedule, K, kernel)
    net = build_vector_net("mlp", D, K, 6, hidden=16, layers=1, one_hot_states=len(hybrid.m))
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, K, (64, D), generator=g).float()
    draws = hybrid.training_draws(x0, g)
    loss, k = hybrid.training_loss(net, x0, draws)
    bound_loss, bound_k = bound.training_loss(net, x0, draws)
    torch.testing.assert_close(k, bound_k)
    x_t = hybrid.q_sample(x0, draws.t, noise=draws.noise_t)
    pi = torch.full((K,), 1 / K, dtype=torch.float64) if kernel == "absorbing" else hybrid.m
    logits = net(x_t, draws.t).double().movedim(1, -1) + pi.log()
    cross_entropy = -torch.distributions.Categorical(logits=logits).log_prob(x0.long()).sum(1)
    torch.testing.assert_close(loss, bound_loss + lam * cross_entropy.mean())
    loss.backward()  # differentiable in the network
    zero = CategoricalDiffusion(schedule, K, kernel, loss="hybrid", hybrid_lambda=0.0)
    torch.testing.assert_close(zero.training_loss(net, x0, draws)[0], bound_loss)
    with pytest.raises(ValueError, match="Gaussian noise"):
        CategoricalDiffusion(schedule, K, kernel, loss="simple")


# ----------------------------------------------------------------------------------------------
# selection, and the command line

def test_selection_rule():
    symbols = correlated_symbols(100, 0).astype(np.float64)
    assert kind_choice(False, False, True, Lattice.shared(symbols)).value == "categorical"
    assert kind_choice(False, False, False, Lattice.shared(symbols)).value == "gaussian"  # integers stored as floats
    assert kind_choice(True, False, True, Lattice.shared(symbols)).value == "binomial"
    many = np.arange(2 * (MAX_CATEGORIES + 1)).reshape(-1, 2) % (MAX_CATEGORIES + 1)
    assert kind_choice(False, False, True, Lattice.shared(many)).value == "gaussian"  # an ordinal lattice
    assert kind_choice(False, False, True, Lattice.shared(many[:, :1] % MAX_CATEGORIES)).value == "categorical"
    spaced = np.array([[0.0, 5.0], [10.0, 5.0]])  # symbols 0, 5, 10: three categories of step 5
    assert Lattice.shared(spaced).count == [3, 3] and Lattice.shared(spaced).step == [5.0, 5.0]
    assert Lattice.shared(np.array([[0.0, 1.0], [2.5, 1.0]])) is None  # not whole multiples of one gap
    assert kind_choice(False, True, True, None).value == "gaussian"  # 8-bit images


def test_cli_train_evaluate_sample_on_integer_symbols(tiny_config, cli, tmp_path):
    x = correlated_symbols(400, 2) * 2 + 1  # symbols 1, 3, 5
    path = tmp_path / "ints.npy"
    np.save(path, x)
    run = tmp_path / "run"
    r = cli("train", tiny_config, "--data", path, "--out", run, "--steps", "4", "--quiet", "--json",
            "--set", "diffusion.kind=auto", "--set", "diffusion.parameterization=auto", "--set", "diffusion.decoder=auto",
            "--set", "diffusion.schedule=auto", "--set", "model.network=resmlp")
    assert r.rc == 0, r
    summary = r.json()
    assert summary["data"]["kind"] == "categorical" and summary["auto_choices"]["diffusion.kind"].startswith("categorical")
    assert summary["data"]["scaling"] == {"shift": [1.0], "scale": [2.0], "rotation": None}  # indices 0..2

    r = cli("evaluate", run, "--json", "--quiet", "--max-examples", "0")
    assert r.rc == 0, r
    e = r.json()
    _, test_idx = split(400, TINY_TEST_FRACTION, TINY_SEED)
    assert e["diffusion"] == "CategoricalDiffusion" and e["n_examples"] == len(test_idx)
    assert e["L_null_bits"] == pytest.approx(-4 * math.log2(3), rel=1e-12)  # the uniform null over 3 symbols
    assert e["log_det_scaling_bits"] == 0.0 and e["K_original_units_bits"] == e["K_bits"]
    assert len(e["per_timestep_bits"]) == e["T"] + 1

    r = cli("sample", run, "-n", "30", "--out", tmp_path / "s.npy", "--quiet", "--json")
    assert r.rc == 0, r
    s = np.load(tmp_path / "s.npy")
    assert s.shape == (30, 4) and np.isin(s, (1.0, 3.0, 5.0)).all()

    np.save(tmp_path / "other.npy", x[:5] + 2)  # 7 is no symbol of the run
    assert_one_line_error(cli("evaluate", run, "--data", tmp_path / "other.npy", "--quiet"), "other.npy", "categories")


def test_categorical_can_be_asked_for_and_refused(tiny_config, cli, tmp_path):
    floats = tmp_path / "floats.npy"
    np.save(floats, correlated_symbols(200, 3).astype(np.float64))  # integers stored as floats: an ordinal lattice
    r = cli("train", tiny_config, "--data", floats, "--out", tmp_path / "run", "--steps", "2", "--quiet", "--json",
            "--set", "diffusion.kind=categorical", "--set", "diffusion.parameterization=x0", "--set", "diffusion.decoder=learned",
            "--set", "diffusion.schedule=erase", "--set", "diffusion.kernel=absorbing", "--set", "model.network=mlp")
    assert r.rc == 0, r
    assert r.json()["data"]["kind"] == "categorical"
    noise = tmp_path / "noise.npy"
    np.save(noise, np.random.default_rng(0).random((50, 3)))
    assert_one_line_error(cli("train", tiny_config, "--data", noise, "--out", tmp_path / "r2", "--steps", "2", "--quiet",
                              "--set", "diffusion.kind=categorical"), "noise.npy", "categorical")


def test_the_bound_of_symbol_images_is_that_of_their_flattened_vectors():
    """The process is shape-generic: images of symbols (N, C, H, W) and the same symbols as vectors
    (N, C H W), under the same model, have the same bound (whose vector form is checked against
    enumeration above), term by term."""
    diffusion = process("custom3", "marginal", "learned")
    torch.manual_seed(0)
    weights = torch.randn(K * 4, 4 * (len(diffusion.m)) + 1, dtype=torch.float64)

    def vector_model(x_t, t):  # any function of the whole x_t and t, here a fixed random map
        codes = torch.nn.functional.one_hot(x_t.round().long(), len(diffusion.m)).flatten(1).double()
        features = torch.cat([codes, t.double()[:, None] / diffusion.T], 1)
        return (features @ weights.T).reshape(len(x_t), K, 4)

    def image_model(x_t, t):
        return vector_model(x_t.flatten(1), t).reshape(len(x_t), K, 1, 2, 2)

    x = torch.tensor([[0.0, 2.0, 1.0, 1.0], [2.0, 2.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    vectors = exact_bound(diffusion, vector_model, [x], 1, torch.Generator().manual_seed(3))
    images = exact_bound(diffusion, image_model, [x.reshape(3, 1, 2, 2)], 1, torch.Generator().manual_seed(3))
    torch.testing.assert_close(images.per_example, vectors.per_example)


def test_unet_feeds_one_hot_states():
    from thermodiff.nets.unet import build_unet

    net = build_unet("cpu", 2, 8, K, 10, one_hot_states=K + 1, base_channels=8, channel_mults=(1, 2), groups=4)
    assert net.stem.in_channels == 2 * (K + 1)
    x = torch.arange(4.0).repeat(2, 2, 8, 2)  # (2, 2, 8, 8) states 0..3
    seen = []
    net.stem.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    assert net(x, torch.tensor([1, 7])).shape == (2, K, 2, 8, 8)
    codes = torch.nn.functional.one_hot(x.long(), K + 1).permute(0, 1, 4, 2, 3).reshape(2, 2 * (K + 1), 8, 8)
    torch.testing.assert_close(seen[0], codes.float())  # channel c S + s: state s of channel c


def test_cli_categorical_images_through_the_unet(cli, tmp_path):
    """`thermodiff train images --data SYMBOLS.npy --set diffusion.kind=categorical`: images of a few
    symbols, not dequantised, modelled by categorical diffusion with a U-Net on one-hot states;
    evaluated in bits per symbol, sampled on the alphabet, drawn with the symbols spread over the
    grey levels."""
    rng = np.random.default_rng(0)
    symbols = np.repeat(rng.integers(0, 3, (40, 1, 4, 1)), 8, axis=3).repeat(2, axis=2).astype(np.uint8)  # (40, 1, 8, 8)
    np.save(tmp_path / "symbols.npy", symbols)
    run = tmp_path / "run"
    r = cli("train", "images", "--data", tmp_path / "symbols.npy", "--out", run, "--steps", 2, "--quiet", "--json",
            "--set", "diffusion.kind=categorical", "--set", "diffusion.T=20", "--set", "model.unet.base_channels=8",
            "--set", "model.unet.channel_mults=[1, 2]", "--set", "model.unet.groups=4")
    assert r.rc == 0, r
    config = json.loads((run / "config.json").read_text())
    assert (config["diffusion"]["kind"], config["diffusion"]["schedule"], config["diffusion"]["decoder"]) == (
        "categorical", "erase", "learned")
    e = cli("evaluate", run, "--json", "--quiet")
    assert e.rc == 0, e
    result = e.json()
    assert result["nll_bound"] == "symbols" and result["nll_bits_per_dim"] == pytest.approx(-result["K_bits"] / 64)
    assert -result["L_null_bits"] / 64 == pytest.approx(math.log2(3))  # the null model: uniform over 3 symbols
    assert "bits/symbol" in cli("evaluate", run, "--quiet").out
    assert cli("evaluate", run, "--data", tmp_path / "symbols.npy", "--quiet").rc == 0  # other images of the symbols
    stranger = symbols.copy()
    stranger[0, 0, 0, 0] = 5
    np.save(tmp_path / "stranger.npy", stranger)
    assert_one_line_error(cli("evaluate", run, "--data", tmp_path / "stranger.npy", "--quiet"), "stranger.npy", "categories")
    assert cli("sample", run, "-n", 3, "--out", tmp_path / "s.npy", "--quiet").rc == 0
    assert set(np.unique(np.load(tmp_path / "s.npy"))) <= {0.0, 1.0, 2.0}
    assert cli("sample", run, "-n", 3, "--out", tmp_path / "s.png", "--quiet").rc == 0
    grey = np.asarray(Image.open(tmp_path / "s.png"))
    assert set(np.unique(grey)) <= {0, 128, 255}  # symbols 0, 1, 2 spread over 0..255 (and the grid's padding)
    assert_one_line_error(cli("train", "images", "--data", tmp_path / "symbols.npy", "--out", tmp_path / "conv",
                              "--steps", 1, "--quiet", "--set", "diffusion.kind=categorical",
                              "--set", "model.network=conv"), "unet")
