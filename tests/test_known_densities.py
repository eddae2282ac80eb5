"""The known-likelihood battery, every case checked independently of how it was built.

Normalisation: quadrature over a grid chosen from the samples (continuous cases of dimension
<= 3), exact enumeration (binary and integer cases, or a small variant built by the same code),
a Monte Carlo estimate with its standard error (the discontinuous box).
Samples against log_prob: Monte Carlo entropy -mean log p(samples) against an independent value
(closed form, quadrature or enumeration), Kolmogorov-Smirnov tests of 1-D and radial laws,
mixture responsibilities (E_x[p(k | x)] = w_k), marginal moments.
Log-densities against torch.distributions wherever torch has the family.
Statistical checks pass at 4 standard errors, Bonferroni-corrected to the same family-wise level
when several quantities are checked together; quadrature checks at a floor justified by the
agreement of two resolutions.
"""

import math
import re
from dataclasses import replace
from functools import cache, reduce

import numpy as np
import pytest
import torch
from torch import distributions as D

from thermodiff.data import known_densities as kd

N = 20000  # Monte Carlo draws per case
NAMES = [case.name for case in kd.BATTERY]
TAIL_4SD = 0.5 * math.erfc(4 / math.sqrt(2))  # P(Z > 4): the level of one 4-standard-error check
KS_CRIT = math.sqrt(-0.5 * math.log(0.001 / 2))  # Kolmogorov's sqrt(n) D at alpha = 0.001 (1.95)


@cache
def draws(name: str, n: int = N) -> np.ndarray:
    x = kd.by_name(name).sample(n, np.random.default_rng([7, NAMES.index(name)]))
    x.flags.writeable = False
    return x


@cache
def log_probs(name: str) -> np.ndarray:
    return kd.by_name(name).log_prob(draws(name))


def z_crit(m: int) -> float:
    """Two-sided bound on m z-scores at the family-wise level of one 4-standard-error check."""
    normal = D.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    return float(normal.icdf(torch.tensor(1 - TAIL_4SD / m, dtype=torch.float64)))


def assert_means(values: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Column means of ``values`` (n, m) equal ``expected`` (m,) within z_crit(m) standard errors."""
    values = values.reshape(len(values), -1)
    diff, se = values.mean(0) - np.ravel(expected), values.std(0, ddof=1) / math.sqrt(len(values))
    with np.errstate(divide="ignore", invalid="ignore"):  # a constant column must match exactly
        z = np.where(se > 0, diff / se, np.where(np.abs(diff) < 1e-12, 0.0, np.inf))
    assert np.all(np.abs(z) < z_crit(values.shape[1])), f"{what}: worst z-score {np.abs(z).max():.2f}"


def assert_entropy(name: str, exact: float, floor: float = 0.0) -> None:
    """-mean log p(samples) within 4 standard errors (+ floor, a quadrature error) of ``exact``."""
    lp = log_probs(name)
    se = lp.std(ddof=1) / math.sqrt(len(lp))
    assert abs(-lp.mean() - exact) < 4 * se + floor, (name, -lp.mean(), exact, se)


def ks_sqrt_n_d(samples: np.ndarray, cdf) -> float:
    x = np.sort(samples)
    f, i, n = cdf(x), np.arange(1, len(x) + 1), len(x)
    return math.sqrt(n) * max(np.max(i / n - f), np.max(f - (i - 1) / n))


# --------------------------------------------------------------------------- the contract


def test_battery_listing():
    assert len(kd.BATTERY) >= 14
    assert len(set(NAMES)) == len(NAMES)
    for case in kd.BATTERY:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", case.name), case.name
        assert case.kind in {"continuous", "binary", "integer"}
        assert case.description and "\n" not in case.description
        assert kd.by_name(case.name) is case
        assert kd.construction(case.name).dim == case.dim
    with pytest.raises(ValueError) as error:
        kd.by_name("no_such_case")
    assert all(name in str(error.value) for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_case_contract(name):
    case = kd.by_name(name)
    x = case.sample(64, np.random.default_rng(1))
    assert x.shape == (64, case.dim) and x.dtype == np.float64
    np.testing.assert_array_equal(x, case.sample(64, np.random.default_rng(1)))
    lp = case.log_prob(x)
    assert lp.shape == (64,) and lp.dtype == np.float64 and np.all(np.isfinite(lp))
    if case.kind == "binary":
        assert set(np.unique(x)) == {0.0, 1.0}
    elif case.kind == "integer":
        assert np.all(x == np.round(x)) and np.all(x >= 0) and len(np.unique(x)) > 2
    else:
        assert np.all(x != np.round(x))
    with pytest.raises(ValueError):
        case.log_prob(x[:, :-1] if case.dim > 1 else x[:, 0])


@pytest.mark.parametrize("name", NAMES)
def test_make_split(name):
    case = kd.by_name(name)
    train, test = kd.make_split(case, 300, 200, seed=5)
    assert train.shape == (300, case.dim) and test.shape == (200, case.dim)
    again_train, again_test = kd.make_split(name, 300, 200, seed=5)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(test, again_test)
    assert not np.array_equal(train[:200], test)
    assert not np.array_equal(kd.make_split(case, 300, 200, seed=6)[0], train)


def _off_support(case: kd.KnownDensity, x: np.ndarray) -> np.ndarray:
    """Copies of x with one coordinate moved off the support (a non-bit, non-integer, negative value)."""
    bad = np.repeat(x[:1], 3, axis=0)
    bad[0, 0], bad[1, -1], bad[2, 0] = 0.5, -1.0, 2.0 if case.kind == "binary" else 1.5
    return bad


@pytest.mark.parametrize("name", [c.name for c in kd.BATTERY if c.kind != "continuous"] + ["gamma_mix_2d"])
def test_log_prob_off_support(name):
    case = kd.by_name(name)
    bad = _off_support(case, draws(name)[:1])
    if case.kind == "continuous":
        bad = bad[1:2]  # gamma: a negative coordinate
    assert np.all(case.log_prob(bad) == -np.inf)


# --------------------------------------------------------------------------- quadrature


def midpoint(lo: float, hi: float, step: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nodes, weights, cell edges) of the midpoint rule on [lo, hi]."""
    edges = np.linspace(lo, hi, int(np.ceil((hi - lo) / step)) + 1)
    return (edges[1:] + edges[:-1]) / 2, np.diff(edges), edges


def sinh_rule(centre: float, width: float, step: float):
    """x = centre + width sinh(v), midpoint rule in v on [-10, 10]: |x - centre| up to 11000 widths,
    where a polynomial tail (Student-t, nu >= 3) has mass < 1e-11, and the integrand decays
    exponentially in v (so the rule converges spectrally)."""
    v, w, edges = midpoint(-10.0, 10.0, step)
    return centre + width * np.sinh(v), w * width * np.cosh(v), centre + width * np.sinh(edges)


def log_rule(lo_u: float, hi_u: float, step: float):
    """x = exp(u), midpoint rule in u: the half-line x > 0."""
    u, w, edges = midpoint(lo_u, hi_u, step)
    return np.exp(u), w * np.exp(u), np.exp(edges)


# name: (rule, margin, (coarse, fine) resolution). "linear" grids reach `margin` beyond the sample
# range: at least 10 noise std for the narrow cases (0.05-0.1), 4 std of gmm_1d's broadest (2)
# component beyond its ~4 std sample range. Steps are at most the narrowest std, where the
# midpoint rule's error on a Gaussian is below exp(-2 pi^2) ~ 3e-9 and falls fast with the step.
QUADRATURE = {
    "gmm_1d": ("linear", 8.0, (0.01, 0.007)),
    "student_t_1d": ("sinh", None, (0.01, 0.007)),
    "ring_2d": ("linear", 1.0, (0.04, 0.03)),
    "circle_2d": ("linear", 1.0, (0.04, 0.03)),
    "spiral_2d": ("linear", 1.0, (0.1, 0.07)),
    "student_t_2d": ("sinh", None, (0.04, 0.03)),
    "gamma_mix_2d": ("log", None, (0.03, 0.02)),
    "sphere_3d": ("linear", 1.0, (0.1, 0.075)),
}


def axis_rule(name: str, column: np.ndarray, fine: bool):
    rule, margin, resolutions = QUADRATURE[name]
    resolution = resolutions[fine]
    if rule == "linear":
        return midpoint(column.min() - margin, column.max() + margin, resolution)
    if rule == "sinh":  # centred on the median, width the semi-interquartile range
        q1, median, q3 = np.percentile(column, [25, 50, 75])
        return sinh_rule(median, (q3 - q1) / 2, resolution)
    # log: e^-8 below the smallest draw (Gamma shapes >= 1.5: mass there < 1e-9), e^1.5 above the largest
    return log_rule(math.log(column.min()) - 8.0, math.log(column.max()) + 1.5, resolution)


def grid_integrals(log_prob, rules) -> tuple[float, float]:
    """(Z, H) = (sum w p, -sum w p log p) over the tensor grid of the 1-D rules."""
    mesh = np.meshgrid(*[r[0] for r in rules], indexing="ij")
    points = np.stack([m.ravel() for m in mesh], axis=1)
    weights = reduce(np.multiply.outer, [r[1] for r in rules]).ravel()
    lp = np.concatenate([log_prob(points[i : i + 2**17]) for i in range(0, len(points), 2**17)])
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        return float(weights @ p), float(-(weights @ np.where(p > 0, p * lp, 0.0)))


@pytest.mark.parametrize("name", list(QUADRATURE))
def test_normalised_and_entropy_by_quadrature(name):
    """Z = 1 and H = -int p log p on two grids; the two agree to 1e-8, well inside the 1e-6
    floor of the check against 1; -mean log p(samples) matches H (sampler vs density)."""
    case, x = kd.by_name(name), draws(name)
    (z_coarse, h_coarse), (z_fine, h_fine) = (
        grid_integrals(case.log_prob, [axis_rule(name, x[:, j], fine) for j in range(case.dim)]) for fine in (0, 1)
    )
    assert abs(z_coarse - z_fine) < 1e-8 and abs(h_coarse - h_fine) < 1e-7, (z_coarse, z_fine, h_coarse, h_fine)
    assert abs(z_fine - 1) < 1e-6, z_fine
    assert_entropy(name, h_fine, floor=1e-6)


@pytest.mark.parametrize("name", ["gmm_1d", "student_t_1d"])
def test_1d_samples_follow_the_density(name):
    """KS test of the draws against the CDF integrated (midpoint rule) from exp(log_prob)."""
    case, x = kd.by_name(name), draws(name)[:, 0]
    nodes, weights, edges = axis_rule(name, x, fine=True)
    cdf_at_edges = np.cumsum(weights * np.exp(case.log_prob(nodes[:, None])))
    finite = np.isfinite(edges[1:])
    cdf = lambda t: np.interp(t, edges[1:][finite], cdf_at_edges[finite])  # noqa: E731
    assert ks_sqrt_n_d(x, cdf) < KS_CRIT


# --------------------------------------------------------------------------- Gaussians, Student-t, box


def t(a) -> torch.Tensor:
    """A float64 torch copy of ``a``."""
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def torch_mixture(c) -> D.MixtureSameFamily:
    """The torch twin of a GaussianMixture or ProductMixture, from its parameters."""
    if isinstance(c, kd.GaussianMixture):
        comp = D.MultivariateNormal(t(c.means), covariance_matrix=t(c.covs))
    else:
        family = {
            "bernoulli": lambda p: D.Bernoulli(probs=t(p)),
            "poisson": lambda rate: D.Poisson(t(rate)),
            "binomial": lambda m, p: D.Binomial(total_count=t(m), probs=t(p)),
            "gamma": lambda shape, scale: D.Gamma(t(shape), 1 / t(scale)),
        }[c.family]
        comp = D.Independent(family(*c.params), 1)
    return D.MixtureSameFamily(D.Categorical(probs=t(c.weights)), comp)


MIXTURES = [c.name for c in kd.BATTERY if isinstance(kd.construction(c.name), (kd.GaussianMixture, kd.ProductMixture))]


def _other_points(case: kd.KnownDensity, x: np.ndarray) -> np.ndarray:
    """Points that are not draws: shuffled coordinates (discrete) or jittered draws (continuous)."""
    rng = np.random.default_rng(3)
    if case.kind != "continuous":
        return np.stack([rng.permutation(col) for col in x.T], axis=1)
    y = x + rng.standard_normal(x.shape) * x.std(0)
    return np.abs(y) if np.all(x > 0) else y


@pytest.mark.parametrize("name", MIXTURES)
def test_mixture_matches_torch(name):
    """log_prob equals torch's MixtureSameFamily; E_x[p(k | x)] = w_k; E[x] = sum_k w_k E_k[x]."""
    case, x = kd.by_name(name), draws(name)
    twin = torch_mixture(kd.construction(name))
    for points in (x[:2000], _other_points(case, x[:2000])):
        expected = twin.log_prob(t(points)).numpy()
        np.testing.assert_allclose(case.log_prob(points), expected, rtol=1e-10, atol=1e-10)
    comp = twin.component_distribution.log_prob(t(x)[:, None, :]).numpy()
    joint = np.log(twin.mixture_distribution.probs.numpy()) + comp
    assert_means(np.exp(joint - kd.logsumexp(joint, axis=1)[:, None]), twin.mixture_distribution.probs.numpy(), name)
    assert_means(x, twin.mean.numpy(), f"{name} mean")


@pytest.mark.parametrize("name", ["gauss_10d", "gauss_50d"])
def test_gaussian_entropy_and_whitened_draws(name):
    """H = (d log(2 pi e) + log det Sigma) / 2; L^-1 (x - mu) has zero means and unit variances."""
    g = kd.construction(name)
    assert len(g.weights) == 1
    cov = g.covs[0]
    assert_entropy(name, 0.5 * (g.dim * math.log(2 * math.pi * math.e) + np.linalg.slogdet(cov)[1]))
    eigenvalues = np.linalg.eigvalsh(cov)
    assert 200 < eigenvalues.max() / eigenvalues.min() < 2000  # the stated spread (300x, 1000x)
    z = np.linalg.solve(np.linalg.cholesky(cov), (draws(name) - g.means[0]).T).T
    assert_means(np.concatenate([z, z**2], axis=1), np.r_[np.zeros(g.dim), np.ones(g.dim)], name)


def student_t_entropy(df: float, scale: np.ndarray) -> float:
    """(1/2) log det S + log((nu pi)^(d/2) G(nu/2) / G((nu+d)/2)) + (nu+d)/2 (psi((nu+d)/2) - psi(nu/2))."""
    d = len(scale)
    psi = lambda a: float(torch.special.digamma(torch.tensor(a, dtype=torch.float64)))  # noqa: E731
    return (0.5 * np.linalg.slogdet(scale)[1] + d / 2 * math.log(df * math.pi) + math.lgamma(df / 2)
            - math.lgamma((df + d) / 2) + (df + d) / 2 * (psi((df + d) / 2) - psi(df / 2)))


@pytest.mark.parametrize("name", ["student_t_1d", "student_t_2d"])
def test_student_t(name):
    st = kd.construction(name)
    exact = student_t_entropy(st.df, st.scale)
    if st.dim == 1:  # the formula above, and log_prob, against torch's univariate Student-t
        twin = D.StudentT(t(st.df), t(st.loc[0]), t(math.sqrt(st.scale[0, 0])))
        assert abs(exact - float(twin.entropy())) < 1e-12
        x = np.concatenate([draws(name)[:1000], np.linspace(-1e3, 1e3, 101)[:, None]])
        np.testing.assert_allclose(st.log_prob(x), twin.log_prob(t(x[:, 0])).numpy(), rtol=1e-12, atol=1e-12)
    assert_entropy(name, exact)


def test_box_3d():
    """Density 1 / volume inside (faces included), -inf outside, mass 1, uniform marginals."""
    box, case, x = kd.construction("box_3d"), kd.by_name("box_3d"), draws("box_3d")
    volume = float(np.prod(box.high - box.low))
    assert volume == 2.0  # [0, 1] x [-2, 2] x [5, 5.5], as described
    assert np.all(log_probs("box_3d") == -math.log(volume))
    corners = np.stack([box.low, box.high])
    assert np.all(case.log_prob(corners) == -math.log(volume))
    for j in range(3):
        for face, step in ((box.low, -1e-9), (box.high, 1e-9)):
            outside = corners.copy()
            outside[:, j] = face[j] + step
            assert np.all(case.log_prob(outside) == -np.inf)
        width = box.high[j] - box.low[j]
        assert ks_sqrt_n_d(x[:, j], lambda t, j=j, width=width: (t - box.low[j]) / width) < KS_CRIT
    # Monte Carlo mass over a bounding box of the draws, 0.1 wider on every side
    lo, hi = x.min(0) - 0.1, x.max(0) + 0.1
    u = lo + (hi - lo) * np.random.default_rng(4).random((200_000, 3))
    mass = np.prod(hi - lo) * np.exp(case.log_prob(u))
    assert abs(mass.mean() - 1) < 4 * mass.std(ddof=1) / math.sqrt(len(mass))


# --------------------------------------------------------------------------- circle, sphere, spiral


def test_log_i0e_against_quadrature():
    """log(e^-z I0(z)) = log((1/2 pi) int exp(z (cos a - 1)) da), periodic trapezoid (4096 nodes:
    error ~ exp(-4096^2 / 2z), nil up to z = 1e5), across the switch at z = 30."""
    z = np.concatenate([[0.0, 1e-8, 29.999999, 30.0, 30.000001], np.geomspace(1e-3, 1e5, 200)])
    a = 2 * math.pi * np.arange(4096) / 4096
    quadrature = kd.logsumexp(z[:, None] * (np.cos(a) - 1), axis=1) - math.log(4096)
    np.testing.assert_allclose(kd.log_i0e(z), quadrature, rtol=0, atol=1e-12)


def _shell_points(shell: kd.NoisySphere, name: str) -> np.ndarray:
    """Draws, and points at radii 0..2R from the centre along random directions."""
    rng = np.random.default_rng(5)
    u = rng.standard_normal((300, shell.dim))
    radii = np.linspace(0, 2 * shell.radius, 300)[:, None]
    return np.concatenate([draws(name)[:300], shell.centre + radii * u / np.linalg.norm(u, axis=1, keepdims=True)])


def test_circle_against_angle_quadrature():
    """p(x) = (1/2 pi) int N(x; c + R (cos a, sin a), s^2 I) da, periodic trapezoid with 4096
    nodes (error ~ I_4096(z) / I_0(z), nil for z = r R / s^2 <= 1800 here)."""
    circle = kd.construction("circle_2d")
    x = _shell_points(circle, "circle_2d")
    a = 2 * math.pi * np.arange(4096) / 4096
    on_circle = circle.centre + circle.radius * np.stack([np.cos(a), np.sin(a)], axis=1)
    d2 = sum((x[:, j, None] - on_circle[None, :, j]) ** 2 for j in range(2))
    var = circle.noise**2
    quadrature = kd.logsumexp(-d2 / (2 * var), axis=1) - math.log(4096) - math.log(2 * math.pi * var)
    np.testing.assert_allclose(circle.log_prob(x), quadrature, rtol=0, atol=1e-10)


def test_sphere_against_polar_quadrature():
    """p(x) = (2 pi s^2)^(-3/2) (1/2) int_{-1}^{1} exp(-(r^2 + R^2 - 2 r R mu) / 2 s^2) d mu, by
    composite Gauss-Legendre (1000 panels x 8 nodes, panels narrower than the
    integrand's scale s^2 / rR >= 0.0022) in log space."""
    sphere = kd.construction("sphere_3d")
    x = _shell_points(sphere, "sphere_3d")
    r = np.linalg.norm(x - sphere.centre, axis=1)
    nodes, weights = np.polynomial.legendre.leggauss(8)
    edges = np.linspace(-1, 1, 1001)
    half = np.diff(edges)[:, None] / 2
    mu, w = (edges[:-1, None] + half * (nodes + 1)).ravel(), (half * weights).ravel()
    var, big_r = sphere.noise**2, sphere.radius
    exponent = -(r[:, None] ** 2 + big_r**2 - 2 * r[:, None] * big_r * mu) / (2 * var)
    quadrature = kd.logsumexp(exponent + np.log(w / 2), axis=1) - 1.5 * math.log(2 * math.pi * var)
    np.testing.assert_allclose(sphere.log_prob(x), quadrature, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["circle_2d", "sphere_3d"])
def test_radial_law(name):
    """q(r) = |S^(d-1)| r^(d-1) p(c + r e) integrates to 1 over r (midpoint rule, step s/20, to
    R + 15 s), and the draws' radii pass a KS test against its integral."""
    shell = kd.construction(name)
    surface = 2 * math.pi if shell.dim == 2 else 4 * math.pi
    r, w, edges = midpoint(0.0, shell.radius + 15 * shell.noise, shell.noise / 20)
    direction = np.eye(shell.dim)[0]
    q = surface * r ** (shell.dim - 1) * np.exp(shell.log_prob(shell.centre + r[:, None] * direction))
    assert abs(np.sum(w * q) - 1) < 1e-8
    radii = np.linalg.norm(draws(name) - shell.centre, axis=1)
    assert ks_sqrt_n_d(radii, lambda t: np.interp(t, edges[1:], np.cumsum(w * q))) < KS_CRIT


def test_spiral_against_finer_quadrature():
    """The spiral's quadrature (300 panels x 8 nodes) against 10x as many panels, at draws and
    at points up to ~10 noise std away from the curve."""
    spiral = kd.construction("spiral_2d")
    finer = replace(spiral, panels=10 * spiral.panels)
    x = draws("spiral_2d")[:200]
    x = np.concatenate([x, x + np.random.default_rng(6).normal(0.0, 3 * spiral.noise, x.shape)])
    np.testing.assert_allclose(spiral.log_prob(x), finer.log_prob(x), rtol=0, atol=1e-8)


# --------------------------------------------------------------------------- binary and integer cases


def all_bits(d: int) -> np.ndarray:
    return ((np.arange(2**d)[:, None] >> np.arange(d)) & 1).astype(np.float64)


def product_grid(highs) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(h + 1.0) for h in highs], indexing="ij"), -1).reshape(-1, len(highs))


# name: every state with non-negligible mass. Poisson rates <= 25: P(X > 80) < 1e-17.
ENUMERABLE = {
    "binary_protos_16d": lambda: all_bits(16),
    "poisson_mix_3d": lambda: product_grid([80, 80, 80]),
    "binomial_counts_5d": lambda: product_grid([10] * 5),
}


@pytest.mark.parametrize("name", list(ENUMERABLE))
def test_enumerated_pmf(name):
    """The pmf sums to 1 over the support; enumerated entropy and means match the draws."""
    states = ENUMERABLE[name]()
    lp = kd.by_name(name).log_prob(states)
    p = np.exp(lp)
    assert abs(p.sum() - 1) < 1e-12
    assert_entropy(name, float(-(p @ lp)))
    assert_means(draws(name), p @ states, name)


@pytest.mark.parametrize("build", [
    lambda rng: kd.prototype_mixture(5, 10, 0.05, rng),
    lambda rng: kd.prototype_mixture(8, 10, 0.1, rng),
    lambda rng: kd.bernoulli_mixture(10, 10, rng),
])
def test_small_bernoulli_mixtures_sum_to_one(build):
    """The builders of the 16-, 64- and 100-D binary cases, at dimension 10: 1024 states."""
    mixture = build(np.random.default_rng(0))
    assert abs(np.exp(mixture.log_prob(all_bits(10))).sum() - 1) < 1e-12


def chain_moments(n: int, j: float, h: float) -> tuple[float, np.ndarray, np.ndarray]:
    """(log Z, E[sigma_i], E[sigma_i sigma_i+1]) of the open chain by plain transfer matrices."""
    s = np.array([-1.0, 1.0])
    t, f = np.exp(j * np.outer(s, s)), np.exp(h * s)
    alpha, beta = [f], [np.ones(2)]
    for _ in range(n - 1):
        alpha.append((alpha[-1] @ t) * f)
        beta.insert(0, t @ (f * beta[0]))
    z = alpha[-1].sum()
    means = np.array([a * b @ s for a, b in zip(alpha, beta)]) / z
    pairs = np.array([alpha[i] @ (np.outer(s, s) * t) @ (f * beta[i + 1]) for i in range(n - 1)]) / z
    return math.log(z), means, pairs


def test_ising_against_brute_force():
    """n = 10 (same class): log Z and moments by summing all 1024 states, and the pmf sums to 1."""
    chain = kd.IsingChain(10, 0.8, 0.1)
    x = all_bits(10)
    s = 2 * x - 1
    energy = 0.8 * np.sum(s[:, 1:] * s[:, :-1], axis=1) + 0.1 * s.sum(1)
    assert abs(chain.log_z - kd.logsumexp(energy)) < 1e-12
    assert abs(kd.logsumexp(chain.log_prob(x))) < 1e-12
    log_z, means, pairs = chain_moments(10, 0.8, 0.1)
    p = np.exp(chain.log_prob(x))
    assert abs(log_z - chain.log_z) < 1e-12
    np.testing.assert_allclose(means, p @ s, atol=1e-12)
    np.testing.assert_allclose(pairs, p @ (s[:, 1:] * s[:, :-1]), atol=1e-12)


def test_ising_chain_32():
    """log Z, the draws' spin means and neighbour correlations, and the entropy
    H = log Z - J sum E[s_i s_i+1] - h sum E[s_i], all against plain transfer matrices."""
    chain = kd.construction("ising_chain_32")
    log_z, means, pairs = chain_moments(chain.n_spins, chain.coupling, chain.field)
    assert abs(log_z - chain.log_z) < 1e-10
    s = 2 * draws("ising_chain_32") - 1
    assert_means(np.concatenate([s, s[:, 1:] * s[:, :-1]], axis=1), np.r_[means, pairs], "ising")
    assert_entropy("ising_chain_32", log_z - chain.coupling * pairs.sum() - chain.field * means.sum())
