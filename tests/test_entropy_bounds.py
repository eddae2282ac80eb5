"""The paper's bounds on the entropy of each reverse step (section 2.6, App. A), checked against
independent computations: the exact H_q(X_{t-1}|X_t) of Gaussian data with a known covariance (the
joint of x_{t-1} and x_t is Gaussian) and its Monte Carlo estimate, Gaussian entropies from
torch.distributions, and binomial chains of 1 and 2 bits enumerated state by state. None of the
reference computations call the process's entropy math."""

import functools
import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_MAX_EXAMPLES
from torch.distributions import Bernoulli, MultivariateNormal, Normal

from thermodiff.process.binomial import BinomialDiffusion, BinomialParameterization
from thermodiff.process.categorical import CategoricalDiffusion
from thermodiff.process.gaussian import FixedVariance, GaussianDiffusion, GaussianParameterization
from thermodiff.process.schedules import Schedule, make_schedule
from thermodiff.process.vdm import VDM
from thermodiff.tasks.entropy import entropy_report, entropy_steps

LN2 = math.log(2.0)
# a covariance with eigenvalues below 1 (data carrying less entropy than N(0, I), the stationary
# distribution), rotated so that no dimension is independent of the others
EIGENVALUES = torch.tensor([0.9, 0.3, 0.05], dtype=torch.float64)
ROTATION = torch.linalg.qr(torch.tensor([[1.0, 0.4, -0.3], [0.2, 1.0, 0.5], [-0.6, 0.1, 1.0]], dtype=torch.float64))[0]
COVARIANCE = ROTATION @ torch.diag(EIGENVALUES) @ ROTATION.T
D = 3


def gaussian_processes() -> list:
    return [GaussianDiffusion(make_schedule("linear", 20)), GaussianDiffusion(make_schedule("log_snr", 12, beta_1=1e-3)),
            VDM(10, schedule="linear")]


def tables(process) -> tuple[torch.Tensor, torch.Tensor]:
    """beta_t and abar_t, t = 1..T, of the process's forward chain."""
    return process.schedule.betas().detach(), process.log_alphas_cumprod().detach().exp()


def joint_covariances(betas, abar, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cov(x_{t-1}), Cov(x_{t-1}, x_t) and Cov(x_t) for x_0 ~ N(0, COVARIANCE), t >= 2."""
    eye = torch.eye(D, dtype=torch.float64)
    prev = abar[t - 2] * COVARIANCE + (1 - abar[t - 2]) * eye
    keep = (1 - betas[t - 1]).sqrt()
    return prev, keep * prev, keep**2 * prev + betas[t - 1] * eye


def exact_reverse_entropy(betas, abar, t: int) -> float:
    """H_q(X_{t-1} | X_t) in nats: the entropy of x_{t-1}'s Gaussian conditional on x_t."""
    prev, cross, cur = joint_covariances(betas, abar, t)
    conditional = prev - cross @ torch.linalg.solve(cur, cross.T)
    return float(MultivariateNormal(torch.zeros(D, dtype=torch.float64), conditional).entropy())


def normal_entropy(var) -> torch.Tensor:
    return Normal(torch.zeros_like(var), var.sqrt()).entropy()


@pytest.mark.parametrize("process", gaussian_processes(), ids=["linear", "log_snr", "vdm"])
def test_gaussian_bounds_are_the_papers_gaussian_entropies_and_hold_the_exact_entropy(process):
    betas, abar = tables(process)
    lower, upper = process.reverse_entropy_bounds(torch.zeros(5, D))
    assert lower.shape == upper.shape == (process.T - 1,)
    step = normal_entropy(betas[1:])  # H_q(X_t|X_{t-1}), t = 2..T, per dimension
    given_x0 = normal_entropy(1 - abar)  # H_q(X_t|X_0), t = 1..T
    torch.testing.assert_close(upper, D * step, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lower, D * (step + given_x0[:-1] - given_x0[1:]), rtol=1e-9, atol=1e-9)
    # the lower bound is H_q(X_{t-1} | X_t, X_0): the entropy of the forward posterior's variance
    beta_tilde = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
    torch.testing.assert_close(lower, D * normal_entropy(beta_tilde), rtol=1e-9, atol=1e-9)
    for t in range(2, process.T + 1):
        exact = exact_reverse_entropy(betas, abar, t)
        assert float(lower[t - 2]) < exact < float(upper[t - 2]), t


def fitted_conditional_entropy(x_prev: torch.Tensor, x_t: torch.Tensor) -> float:
    """H(X_{t-1} | X_t) of the zero-mean Gaussian fitted to the samples, with the bias of log det
    of a sample covariance removed exactly: for S = X^T X / n of n draws, n S is Wishart(n, Sigma),
    E log det S = log det Sigma + sum_{i=1..d} digamma((n - i + 1) / 2) + d log(2 / n)."""
    n = len(x_prev)

    def log_det(x):
        d = x.shape[1]
        bias = torch.special.digamma((n - torch.arange(d, dtype=torch.float64)) / 2).sum() + d * math.log(2 / n)
        return torch.logdet(x.T @ x / n) - bias

    joint = torch.cat([x_prev, x_t], 1)
    return float(0.5 * (log_det(joint) - log_det(x_t)) + 0.5 * D * (1 + math.log(2 * math.pi)))


@pytest.mark.parametrize("t", [2, 7, 15])
def test_gaussian_exact_entropy_matches_monte_carlo(t):
    """Samples of (x_{t-1}, x_t) from the forward process on N(0, COVARIANCE) data, the Gaussian fitted
    in 20 independent batches: their mean is within 4 standard errors of the closed form."""
    process = GaussianDiffusion(make_schedule("linear", 20))
    betas, abar = tables(process)
    generator = torch.Generator().manual_seed(t)
    estimates = []
    for _ in range(20):
        x0 = torch.randn(10000, D, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(COVARIANCE).T
        x_prev = process.q_sample(x0, torch.full((len(x0),), t - 1), generator)
        x_t = (1 - betas[t - 1]).sqrt() * x_prev + betas[t - 1].sqrt() * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        estimates.append(fitted_conditional_entropy(x_prev, x_t))
    estimates = torch.tensor(estimates, dtype=torch.float64)
    mean, stderr = float(estimates.mean()), float(estimates.std() / math.sqrt(len(estimates)))
    assert abs(mean - exact_reverse_entropy(betas, abar, t)) < 4 * stderr
    # late in the chain the exact value nears the lower bound, so the estimate is held to it within its error
    lower, upper = process.reverse_entropy_bounds(x0)
    assert float(lower[t - 2]) - 4 * stderr < mean < float(upper[t - 2]) + 4 * stderr


# --------------------------------------------------------------------------------- binomial chains


def chain_entropies(prior: np.ndarray, kernels: list[np.ndarray]) -> dict:
    """Per t = 1..T the entropies (nats) H(X_t|X_{t-1}), H(X_t|X_0), H(X_{t-1}|X_t), H(X_t) of the chain
    that starts at ``prior`` over the enumerated states and steps with the matrices ``kernels``
    (rows: from-state), from the joint distributions written out."""
    def h(probs):
        probs = probs[probs > 0]
        return float(-(probs * np.log(probs)).sum())

    from_x0, marginal, out = np.diag(prior), prior, {k: [] for k in ("step", "given_x0", "reverse", "marginal")}
    for kernel in kernels:
        joint = marginal[:, None] * kernel  # q(x_{t-1}, x_t)
        from_x0 = from_x0 @ kernel  # q(x_0, x_t)
        out["step"].append(h(joint) - h(marginal))
        out["reverse"].append(h(joint) - h(joint.sum(0)))
        out["given_x0"].append(h(from_x0) - h(prior))
        marginal = joint.sum(0)
        out["marginal"].append(h(marginal))
    return {k: np.array(v) for k, v in out.items()}


def data_distribution(data: np.ndarray, states: np.ndarray) -> np.ndarray:
    return np.array([np.mean((data == s).all(1)) for s in states])


def enumerate_chain(data: np.ndarray, betas: list[float], p: float) -> dict:
    """:func:`chain_entropies` of a chain of len(data[0]) bits over {0,1}^D, from the kernel's
    definition q(x_t = 1 | x_{t-1}) = x_{t-1} (1 - beta) + p beta."""
    states = np.array(list(itertools.product([0, 1], repeat=data.shape[1])))

    def kernel(beta):
        one = states * (1 - beta) + p * beta  # (from state, bit)
        return np.prod(np.where(states[None, :, :] == 1, one[:, None, :], 1 - one[:, None, :]), axis=2)

    return chain_entropies(data_distribution(data, states), [kernel(beta) for beta in betas])


# correlated bits, each a 1 with frequency 5/6
LOW_ENTROPY = np.array([[1, 1], [1, 1], [1, 0], [1, 1], [0, 1], [1, 1]])


@pytest.mark.parametrize("data", [LOW_ENTROPY[:, :1], LOW_ENTROPY], ids=["D=1", "D=2"])
@pytest.mark.parametrize("p", [0.5, 5 / 6], ids=["uniform", "data_mean"])
def test_binomial_bounds_match_enumeration_and_hold_the_exact_entropy(data, p):
    """Stationary at 1/2 (a kernel that never lowers entropy) or at the bits' own frequency (their
    marginals stay put and their dependence only decays, as for the heartbeat): the marginal entropy
    never falls, and the exact reverse entropy lies between the bounds."""
    betas = [0.05, 0.2, 0.4, 1.0]
    process = BinomialDiffusion(Schedule(np.array(betas)), p)
    lower, upper = process.reverse_entropy_bounds(torch.tensor(data, dtype=torch.float32))
    chain = enumerate_chain(data, betas, p)
    np.testing.assert_allclose(upper.numpy(), chain["step"][1:], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lower.numpy(), chain["step"][1:] + chain["given_x0"][:-1] - chain["given_x0"][1:],
                               rtol=1e-10, atol=1e-12)
    assert (np.diff(chain["marginal"]) >= -1e-12).all()  # the upper bound's premise: the marginal entropy never falls
    exact = chain["reverse"][1:]
    assert (lower.numpy() <= exact + 1e-12).all() and (exact <= upper.numpy() + 1e-12).all()
    assert (exact - lower.numpy()).max() > 1e-3  # the lower bound is not the value
    if p == 0.5 or len(data[0]) == 2:  # one bit at its own frequency: H(X_t) = H(X_{t-1}), the upper bound exact
        assert (upper.numpy() - exact).max() > 1e-3


def test_binomial_upper_bound_needs_a_marginal_entropy_that_never_falls():
    """Uniform 2-bit data under a chain stationary at p = 0.2: the marginal entropy falls, and at the
    step that erases everything (beta = 1) H(X_{t-1}|X_t) = H(X_{t-1}) exceeds the upper bound, while
    the lower bound (which holds for any data) holds; after a noisier start it crosses the upper one."""
    data = np.array(list(itertools.product([0, 1], repeat=2)))
    for betas, crossed in (([0.1, 0.3, 1.0], False), ([0.5, 0.9, 1.0], True)):
        process = BinomialDiffusion(Schedule(np.array(betas)), 0.2)
        lower, upper = process.reverse_entropy_bounds(torch.tensor(data, dtype=torch.float32))
        chain = enumerate_chain(data, betas, 0.2)
        exact = chain["reverse"][1:]
        assert np.diff(chain["marginal"])[-1] < 0
        assert (lower.numpy() <= exact + 1e-12).all()
        assert exact[-1] > float(upper[-1]) + 0.01
        assert (float(lower[-1]) > float(upper[-1])) == crossed


def enumerate_categorical_chain(data: np.ndarray, betas: list[float], m: np.ndarray) -> dict:
    """:func:`chain_entropies` of a chain over S = len(m) states per dimension, D = len(data[0]), from
    the kernel's definition q(x_t | x_{t-1}) = (1 - beta) [x_t = x_{t-1}] + beta m[x_t], one matrix per
    dimension and their Kronecker product for the joint state (itertools.product's order)."""
    states = np.array(list(itertools.product(range(len(m)), repeat=data.shape[1])))
    kernels = [functools.reduce(np.kron, [(1 - beta) * np.eye(len(m)) + beta * m[None, :]] * data.shape[1])
               for beta in betas]
    return chain_entropies(data_distribution(data, states), kernels)


# two dimensions of 3 categories, dependent and far from uniform
CATEGORIES = np.array([[0, 0], [0, 0], [2, 0], [0, 1], [1, 1], [0, 0], [2, 2]])


@pytest.mark.parametrize("kernel", ["uniform", "absorbing", "marginal"])
def test_categorical_bounds_match_enumeration(kernel):
    """The forward entropies of each kernel against the enumerated chain; the lower bound holds for
    any data and the upper one where its premise does (a uniform kernel is doubly stochastic, so the
    marginal entropy never falls), while the absorbing kernel, whose entropy falls into the mask state,
    ends above it."""
    betas = [0.1, 0.3, 0.5, 1.0]
    frequencies = np.bincount(CATEGORIES.ravel(), minlength=3) / CATEGORIES.size
    process = CategoricalDiffusion(Schedule(np.array(betas)), 3, kernel,
                                   frequencies=torch.tensor(frequencies) if kernel == "marginal" else None)
    lower, upper = process.reverse_entropy_bounds(torch.tensor(CATEGORIES, dtype=torch.float32))
    chain = enumerate_categorical_chain(CATEGORIES, betas, process.m.numpy())
    np.testing.assert_allclose(upper.numpy(), chain["step"][1:], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lower.numpy(), chain["step"][1:] + chain["given_x0"][:-1] - chain["given_x0"][1:],
                               rtol=1e-10, atol=1e-12)
    exact = chain["reverse"][1:]
    assert (lower.numpy() <= exact + 1e-12).all() and (exact - lower.numpy()).max() > 1e-3
    if kernel == "uniform":
        assert (np.diff(chain["marginal"]) >= -1e-12).all() and (exact <= upper.numpy() + 1e-12).all()
    if kernel == "absorbing":
        assert exact[-1] > float(upper[-1]) + 0.01  # beta_T = 1: the step into the mask has no entropy


# --------------------------------------------------------------------------------- learned kernels


def constant_net(z: list[float]):
    """A network whose output is the constant z per output channel, at every x_t and t."""
    def net(x, t):
        return torch.tensor(z, dtype=torch.float64).reshape(1, -1, *[1] * (x.ndim - 1)).expand(len(x), len(z), *x.shape[1:])
    return net


@pytest.mark.parametrize("variance, side", [(FixedVariance.BETA, 1), (FixedVariance.BETA_TILDE, 0)])
def test_a_fixed_variance_kernel_lies_on_a_bound_and_is_not_flagged(variance, side):
    """The eps kernel with variance beta_t has the upper bound's entropy, with beta-tilde_t the lower's."""
    process = GaussianDiffusion(make_schedule("linear", 10), GaussianParameterization.EPS, eps_variance=variance)
    x0 = torch.randn(50, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    betas, abar = tables(process)
    x_t = process.q_sample(x0, torch.full((50,), 4))
    var = betas[3] if variance is FixedVariance.BETA else betas[3] * (1 - abar[2]) / (1 - abar[3])
    torch.testing.assert_close(process.kernel_entropy(constant_net([0.3, 0.0]), x_t, 4),
                               D * normal_entropy(var).expand(50), rtol=1e-12, atol=1e-12)
    report = entropy_report(process, constant_net([0.3, 0.0]), x0, list(range(2, 11)), 16)
    assert report["n_outside"] == 0 and report["n_steps"] == 9 and report["n_bounds_crossed"] == 0
    assert report["largest_excursion_bits"] == 0.0 and report["largest_excursion_t"] is None
    for step in report["per_step"]:
        assert step["kernel_bits"] == pytest.approx([step["lower_bits"], step["upper_bits"]][side], rel=1e-9, abs=1e-9)
        assert step["kernel_stderr_bits"] < 1e-12  # the same variance at every x_t


def test_vdm_and_respaced_kernels_against_the_bounds_of_their_own_chains():
    """VDM's kernel q(z_s|z_u, x = x_hat) has the forward posterior's variance: on the lower bound of its
    chain, unflagged. A respaced eps kernel with variance beta (MOMENTS rule, no x_0 uncertainty added
    beyond the base's) has entropies within the respaced chain's bounds."""
    x0 = torch.randn(30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    vdm = VDM(10, schedule="linear")
    report = entropy_report(vdm, constant_net([0.0]), x0, list(range(2, 11)), 30)
    assert report["n_outside"] == 0
    for step in report["per_step"]:
        assert step["kernel_bits"] == pytest.approx(step["lower_bits"], rel=1e-9, abs=1e-9)
    base = GaussianDiffusion(make_schedule("linear", 40), GaussianParameterization.EPS, eps_variance=FixedVariance.BETA)
    respaced = base.respaced([1, 5, 10, 20, 30, 40], "moments")
    betas, abar = tables(respaced)
    lower, upper = respaced.reverse_entropy_bounds(x0)
    torch.testing.assert_close(lower, D * normal_entropy(betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])), rtol=1e-9, atol=1e-9)
    report = entropy_report(respaced, constant_net([0.0, 0.0]), x0, list(range(2, 7)), 30)
    assert report["n_steps"] == 5 and report["n_outside"] == 0


@pytest.mark.parametrize("z_sigma, where", [(30.0, "above"), (-30.0, "below")])
def test_a_kernel_outside_the_bounds_is_flagged(z_sigma, where):
    """The reference kernel with a variance far above beta_t (or far below beta-tilde_t) at every step."""
    process = GaussianDiffusion(make_schedule("reference", 8))
    x0 = torch.randn(40, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    report = entropy_report(process, constant_net([0.0, z_sigma]), x0, list(range(2, 9)), 40)
    assert report["n_outside"] == 7 and report[f"n_{where}"] == 7
    kernel = process.kernel_entropy(constant_net([0.0, z_sigma]), x0, 5)
    # sigmoid(z / sqrt(T) + logit(beta)): the variance the parameterisation gives, from torch.distributions
    var = torch.sigmoid(torch.tensor(z_sigma / 8**0.5, dtype=torch.float64) + torch.logit(process.schedule.betas()[4]))
    torch.testing.assert_close(kernel, D * normal_entropy(var).expand(40), rtol=1e-12, atol=1e-12)
    largest = max((s for s in report["per_step"] if s["outside"]), key=lambda s: abs(s["excursion_bits"]))
    assert report["largest_excursion_bits"] == largest["excursion_bits"] and (largest["excursion_bits"] > 0) == (where == "above")


def test_the_bayes_optimal_binomial_kernel_has_the_exact_reverse_entropy():
    """One bit, the x0 kernel with z = logit(frequency) - logit(p): P(x_0 | x_t) is the data's own
    posterior, so p(x_{t-1}|x_t) = q(x_{t-1}|x_t) and its entropy, averaged over x_t ~ q, is the
    enumerated H_q(X_{t-1}|X_t), within 4 standard errors, inside the bounds and not flagged (p = 1/2:
    the marginal entropy rises, so the upper bound holds)."""
    data = np.array([[1], [1], [1], [0]])
    betas, p = [0.05, 0.2, 0.4, 1.0], 0.5
    process = BinomialDiffusion(Schedule(np.array(betas)), p, BinomialParameterization.X0)
    net = constant_net([math.log(3) - math.log(p / (1 - p))])
    x0 = torch.tensor(np.tile(data, (250, 1)), dtype=torch.float32)  # its first 500 rows hold the data in proportion
    report = entropy_report(process, net, x0, [2, 3, 4], 1000, torch.Generator().manual_seed(2))
    exact = enumerate_chain(data, betas, p)["reverse"]
    assert report["n_examples"] == 500 and report["n_outside"] == 0
    for step in report["per_step"]:
        # (at t = T, beta = 1: x_t carries nothing, every kernel is the same, the standard error 0)
        assert abs(step["kernel_bits"] - exact[step["t"] - 1] / LN2) <= 4 * step["kernel_stderr_bits"] + 1e-12
    # the kernel's entropy at one x_t, from torch.distributions
    x_t = torch.tensor([[0.0], [1.0]])
    torch.testing.assert_close(process.kernel_entropy(net, x_t, 3),
                               Bernoulli(probs=process.step_distribution(net, x_t, 3)).entropy()[:, 0])


def test_entropy_steps():
    assert entropy_steps(6, None) == [2, 3, 4, 5, 6]
    assert entropy_steps(1000, 50)[:2] == [2, 22] and len(entropy_steps(1000, 50)) == 50 and entropy_steps(1000, 50)[-1] == 1000
    assert entropy_steps(6, 10) == [2, 3, 4, 5, 6]


# --------------------------------------------------------------------------------- the commands


def test_evaluate_and_plot_report_the_entropies(copy_run, cli, tmp_path):
    run = copy_run()
    r = cli("evaluate", run, "--json", "--quiet")
    assert r.rc == 0, r
    entropy = r.json()["entropy"]
    assert entropy["n_examples"] == TINY_MAX_EXAMPLES and [s["t"] for s in entropy["per_step"]] == [2, 3, 4, 5, 6]
    assert json.loads((run / "config.json").read_text())["diffusion"]["schedule"] == "reference"
    upper = 2 * normal_entropy(make_schedule("reference", 6).betas()[1:]) / LN2  # the tiny run's 2-D data, T = 6
    assert [s["upper_bits"] for s in entropy["per_step"]] == pytest.approx(upper.tolist(), rel=1e-12)
    assert entropy["n_outside"] == sum(s["outside"] for s in entropy["per_step"])
    for s in entropy["per_step"]:
        inside = s["lower_bits"] <= s["kernel_bits"] <= s["upper_bits"]
        assert (s["excursion_bits"] == 0) == inside
    text = cli("evaluate", run, "--quiet")
    assert f"{entropy['n_outside']} of 5 steps outside the paper's bounds" in text.out
    r = cli("plot", run, "--out", tmp_path / "figs", "--json", "--quiet")
    assert r.rc == 0, r
    assert (tmp_path / "figs" / "bound.png").stat().st_size > 0
