"""Known-likelihood battery: distributions whose exact log-likelihood is known.

Each case is a :class:`KnownDensity`: a sampler and an exact ``log_prob``, computed in closed
form, by exact enumeration (sums over mixture components, the transfer matrix of an Ising chain)
or, for the noisy spiral only, by a 1-D Gauss-Legendre quadrature accurate to far better than
1e-6 nats. The battery measures how close a density model's lower bound gets to the true test
log-likelihood, so exactness is the point; ``tests/test_known_densities.py`` checks every case
independently (normalisation by quadrature or enumeration, samples against log-densities,
log-densities against torch.distributions).

Samples are in "user units": different scales, offsets and correlations across dimensions are
deliberate, and a model must standardise or whiten them itself. Every parameter is a constant,
drawn once from a generator seeded with :data:`PARAM_SEED` and the case's own number, so the
battery is the same on every call and machine.

Densities are per unit of Lebesgue measure in user units (``kind == "continuous"``) or log-pmfs
(``"binary"``: values in {0, 1}; ``"integer"``: non-negative integers), in nats. Points outside
the support get ``-inf``. Pure NumPy (``math.lgamma`` for log-Gamma, ``np.i0`` for small Bessel
arguments); no SciPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Callable

import numpy as np

__all__ = [
    "BATTERY",
    "GaussianMixture",
    "IsingChain",
    "KnownDensity",
    "NoisyCurve",
    "NoisySphere",
    "PARAM_SEED",
    "ProductMixture",
    "StudentT",
    "UniformBox",
    "archimedean_spiral",
    "bernoulli_mixture",
    "by_name",
    "construction",
    "log_i0e",
    "logsumexp",
    "make_split",
    "prototype_mixture",
]

LOG_2PI = math.log(2.0 * math.pi)
PARAM_SEED = 2015  # with each case's own number, fixes every random parameter of the battery
_CHUNK = 1024  # rows per block where a log_prob builds an (n, nodes, dim) array


@dataclass(frozen=True)
class KnownDensity:
    """One case of the battery: a sampler and its exact log-density (or log-pmf), in nats."""

    name: str  # short snake_case id, e.g. "ring_2d"
    description: str  # one line for a results table
    kind: str  # "continuous" | "binary" ({0,1} values) | "integer" (log_prob is a log-pmf)
    dim: int
    sample: Callable[[int, np.random.Generator], np.ndarray]  # (n, dim) float64
    log_prob: Callable[[np.ndarray], np.ndarray]  # (n, dim) -> (n,)


# ----------------------------------------------------------------------------- small helpers


def logsumexp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(sum(exp(a), axis)), stable; -inf where every term is -inf."""
    a = np.asarray(a, dtype=np.float64)
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(top, axis=axis) + np.log(np.sum(np.exp(a - top), axis=axis))


def _lgamma(a: np.ndarray) -> np.ndarray:
    """math.lgamma elementwise (evaluated once per distinct value: counts repeat a lot)."""
    a = np.asarray(a, dtype=np.float64)
    values, inverse = np.unique(a, return_inverse=True)
    return np.array([math.lgamma(v) for v in values])[inverse].reshape(a.shape)


def _as_points(x: np.ndarray, dim: int) -> np.ndarray:
    """x as a float64 (n, dim) array, or a ValueError naming the shape."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected an (n, {dim}) array, got shape {x.shape}")
    return x


def _random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def _rotated_covariance(variances: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Q diag(variances) Q^T for a random rotation Q (exactly symmetric)."""
    q = _random_rotation(len(variances), rng)
    cov = (q * variances) @ q.T
    return (cov + cov.T) / 2


def _mixture_log_prob(weights: np.ndarray, component_log_probs: np.ndarray) -> np.ndarray:
    """log sum_k w_k p_k(x) from the (n, K) array of log p_k(x)."""
    with np.errstate(divide="ignore"):
        return logsumexp(np.log(weights) + component_log_probs, axis=1)


def _normalised(weights) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    return weights / weights.sum()


# ----------------------------------------------------------------------------- constructions


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """p(x) = sum_k w_k N(x; mu_k, Sigma_k), full covariances; one component is a Gaussian.

    log N(x; mu, Sigma) = -(d log 2 pi + log det Sigma + |L^-1 (x - mu)|^2) / 2, Sigma = L L^T.
    """

    weights: np.ndarray  # (K,), sums to 1
    means: np.ndarray  # (K, d)
    covs: np.ndarray  # (K, d, d)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @cached_property
    def cholesky(self) -> np.ndarray:
        return np.linalg.cholesky(self.covs)

    def component_log_probs(self, x: np.ndarray) -> np.ndarray:
        """(n, K) array of log N(x; mu_k, Sigma_k)."""
        x = _as_points(x, self.dim)
        out = np.empty((len(x), len(self.weights)))
        for k, (mean, chol) in enumerate(zip(self.means, self.cholesky)):
            z = np.linalg.solve(chol, (x - mean).T)  # L^-1 (x - mu), column per point
            log_det = 2.0 * np.sum(np.log(np.diag(chol)))
            out[:, k] = -0.5 * (self.dim * LOG_2PI + log_det + np.sum(z**2, axis=0))
        return out

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return _mixture_log_prob(self.weights, self.component_log_probs(x))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        labels = rng.choice(len(self.weights), size=n, p=self.weights)
        z = rng.standard_normal((n, self.dim))
        x = np.empty((n, self.dim))
        for k, (mean, chol) in enumerate(zip(self.means, self.cholesky)):
            x[labels == k] = mean + z[labels == k] @ chol.T
        return x


@dataclass(frozen=True, eq=False)
class StudentT:
    """Multivariate Student-t with ``df`` = nu degrees of freedom, location mu, scale matrix S:

    log p(x) = lgamma((nu + d)/2) - lgamma(nu/2) - (d/2) log(nu pi) - (1/2) log det S
               - ((nu + d)/2) log(1 + (x - mu)^T S^-1 (x - mu) / nu).
    Sampled as mu + L z / sqrt(g / nu), z ~ N(0, I), g ~ chi^2_nu, S = L L^T.
    """

    df: float
    loc: np.ndarray  # (d,)
    scale: np.ndarray  # (d, d) scale matrix S (covariance S nu / (nu - 2) for nu > 2)

    @property
    def dim(self) -> int:
        return len(self.loc)

    @cached_property
    def cholesky(self) -> np.ndarray:
        return np.linalg.cholesky(self.scale)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        x = _as_points(x, self.dim)
        nu, d = self.df, self.dim
        z = np.linalg.solve(self.cholesky, (x - self.loc).T)
        log_det = 2.0 * np.sum(np.log(np.diag(self.cholesky)))
        const = math.lgamma((nu + d) / 2) - math.lgamma(nu / 2) - d / 2 * math.log(nu * math.pi)
        return const - 0.5 * log_det - (nu + d) / 2 * np.log1p(np.sum(z**2, axis=0) / nu)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        z = rng.standard_normal((n, self.dim))
        g = rng.chisquare(self.df, size=n)
        return self.loc + (z @ self.cholesky.T) / np.sqrt(g / self.df)[:, None]


def log_i0e(z: np.ndarray) -> np.ndarray:
    """log(exp(-z) I0(z)) for z >= 0, stable for any z.

    z < 30: log(np.i0(z)) - z (numpy's Clenshaw-Chebyshev I0, peak relative error 5.8e-16 on
    [0, 30]). z >= 30: the asymptotic series exp(-z) I0(z) = (2 pi z)^-1/2 sum_k a_k (8 z)^-k,
    a_k = ((2k-1)!!)^2 / k!, to k = 30; the first omitted term is below 1e-20 there and the
    exponentially small remainder below exp(-2z) < 1e-26.
    """
    z = np.asarray(z, dtype=np.float64)
    small = z < 30.0
    out = np.empty_like(z)
    out[small] = np.log(np.i0(z[small])) - z[small]
    big = z[~small]
    term, series = np.ones_like(big), np.ones_like(big)
    for k in range(1, 31):
        term = term * (2 * k - 1) ** 2 / (k * 8.0 * big)
        series = series + term
    out[~small] = np.log(series) - 0.5 * np.log(2.0 * math.pi * big)
    return out


@dataclass(frozen=True, eq=False)
class NoisySphere:
    """A point uniform on the circle (d = 2) or sphere (d = 3) of radius R about c, plus
    N(0, s^2 I) noise. With r = |x - c|:

    d = 2: p(x) = exp(-(r^2 + R^2) / 2s^2) I0(r R / s^2) / (2 pi s^2)
                = exp(-(r - R)^2 / 2s^2) [exp(-z) I0(z)]_{z = rR/s^2} / (2 pi s^2);
    d = 3: p(x) = [exp(-(r - R)^2 / 2s^2) - exp(-(r + R)^2 / 2s^2)] / ((2 pi s^2)^1/2 4 pi R r).
    """

    centre: np.ndarray  # (d,), d in {2, 3}
    radius: float
    noise: float

    @property
    def dim(self) -> int:
        return len(self.centre)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        x = _as_points(x, self.dim)
        r = np.linalg.norm(x - self.centre, axis=1)
        big_r, var = self.radius, self.noise**2
        gauss = -((r - big_r) ** 2) / (2 * var)
        if self.dim == 2:
            return gauss + log_i0e(r * big_r / var) - math.log(2 * math.pi * var)
        # (1 - exp(-2 r R / s^2)) / r, and its limit 2R / s^2 at r = 0
        with np.errstate(divide="ignore", invalid="ignore"):
            shell = np.where(r > 0, np.log(-np.expm1(-2 * r * big_r / var)) - np.log(r), math.log(2 * big_r / var))
        return gauss + shell - 0.5 * math.log(2 * math.pi * var) - math.log(4 * math.pi * big_r)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        u = rng.standard_normal((n, self.dim))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        return self.centre + self.radius * u + self.noise * rng.standard_normal((n, self.dim))


@dataclass(frozen=True, eq=False)
class NoisyCurve:
    """t uniform on [t0, t1], x = c(t) + N(0, s^2 I) for a curve c (of non-uniform speed |c'(t)|):

    p(x) = (1 / (t1 - t0)) int_{t0}^{t1} N(x; c(t), s^2 I) dt,
    by composite Gauss-Legendre quadrature (``nodes_per_panel`` nodes on each of ``panels``
    panels of equal arc length), summed in log space. For spiral_2d (300 panels of arc length
    0.12 = 1.2 s, 8 nodes each) it agrees with 10x as many panels to ~1e-14 nats at the draws and
    ~1e-12 up to 10 s from the curve.
    """

    curve: Callable[[np.ndarray], np.ndarray]  # (m,) parameters -> (m, d) points
    t_range: tuple[float, float]
    noise: float
    panels: int
    nodes_per_panel: int = 8

    @property
    def dim(self) -> int:
        return self.curve(np.zeros(1)).shape[1]

    def _panel_edges(self) -> np.ndarray:
        """Parameters cutting the curve into ``panels`` pieces of (nearly) equal arc length."""
        t0, t1 = self.t_range
        fine = np.linspace(t0, t1, 64 * self.panels + 1)
        arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(self.curve(fine), axis=0), axis=1))])
        edges = np.interp(np.linspace(0.0, arc[-1], self.panels + 1), arc, fine)
        edges[0], edges[-1] = t0, t1
        return edges

    @cached_property
    def nodes(self) -> tuple[np.ndarray, np.ndarray]:
        """(points c(t_j) on the curve, log of their weights / (t1 - t0))."""
        x, w = np.polynomial.legendre.leggauss(self.nodes_per_panel)
        edges = self._panel_edges()
        half = np.diff(edges)[:, None] / 2
        t = (edges[:-1, None] + half * (x + 1)).ravel()
        return self.curve(t), np.log((half * w).ravel() / (self.t_range[1] - self.t_range[0]))

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        x = _as_points(x, self.dim)
        points, log_w = self.nodes
        var = self.noise**2
        out = np.empty(len(x))
        for start in range(0, len(x), _CHUNK):
            block = x[start : start + _CHUNK]
            log_terms = np.broadcast_to(log_w, (len(block), len(log_w))).copy()
            for j in range(self.dim):
                log_terms -= (block[:, j, None] - points[None, :, j]) ** 2 / (2 * var)
            out[start : start + _CHUNK] = logsumexp(log_terms, axis=1)
        return out - 0.5 * self.dim * math.log(2 * math.pi * var)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        t = rng.uniform(*self.t_range, size=n)
        return self.curve(t) + self.noise * rng.standard_normal((n, self.dim))


def archimedean_spiral(t: np.ndarray, centre: np.ndarray, growth: float) -> np.ndarray:
    """c(t) = centre + growth t (cos t, sin t): speed growth sqrt(1 + t^2) grows along it."""
    t = np.asarray(t, dtype=np.float64)
    return centre + growth * t[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1)


@dataclass(frozen=True, eq=False)
class UniformBox:
    """Uniform on the axis-aligned box prod_j [low_j, high_j] (closed): log p = -sum log(high - low)
    inside, -inf outside."""

    low: np.ndarray
    high: np.ndarray

    @property
    def dim(self) -> int:
        return len(self.low)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        x = _as_points(x, self.dim)
        inside = np.all((x >= self.low) & (x <= self.high), axis=1)
        return np.where(inside, -np.sum(np.log(self.high - self.low)), -np.inf)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.low + (self.high - self.low) * rng.random((n, self.dim))


# Elementwise log-probabilities (-inf off the support) and samplers of the product families.


def _bernoulli_log_pmf(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """log p^x (1 - p)^(1 - x), x in {0, 1}."""
    return np.where(x == 1, np.log(p), np.where(x == 0, np.log1p(-p), -np.inf))


def _integral_in(x: np.ndarray, high: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """(x is an integer in 0..high, x clipped into that range where it is not)."""
    ok = (x >= 0) & (x <= high) & (x == np.round(x))
    return ok, np.where(ok, x, 0.0)


def _poisson_log_pmf(x: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """x log(rate) - rate - log x!, x = 0, 1, 2, ..."""
    ok, x = _integral_in(x, np.inf)
    return np.where(ok, x * np.log(rate) - rate - _lgamma(x + 1), -np.inf)


def _binomial_log_pmf(x: np.ndarray, trials: np.ndarray, p: np.ndarray) -> np.ndarray:
    """log C(m, x) + x log p + (m - x) log(1 - p), x = 0..m (m = trials)."""
    ok, x = _integral_in(x, trials)
    log_choose = _lgamma(trials + 1) - _lgamma(x + 1) - _lgamma(trials - x + 1)
    return np.where(ok, log_choose + x * np.log(p) + (trials - x) * np.log1p(-p), -np.inf)


def _gamma_log_pdf(x: np.ndarray, shape: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(a - 1) log x - x / theta - lgamma(a) - a log theta, x > 0 (a = shape, theta = scale)."""
    ok = x > 0
    x = np.where(ok, x, 1.0)
    log_p = (shape - 1) * np.log(x) - x / scale - _lgamma(shape) - shape * np.log(scale)
    return np.where(ok, log_p, -np.inf)


_FAMILIES: dict[str, tuple[Callable[..., np.ndarray], Callable[..., np.ndarray]]] = {
    "bernoulli": (_bernoulli_log_pmf, lambda rng, p: (rng.random(p.shape) < p).astype(np.float64)),
    "poisson": (_poisson_log_pmf, lambda rng, rate: rng.poisson(rate).astype(np.float64)),
    "binomial": (_binomial_log_pmf, lambda rng, m, p: rng.binomial(m.astype(np.int64), p).astype(np.float64)),
    "gamma": (_gamma_log_pdf, lambda rng, shape, scale: rng.gamma(shape, scale)),
}


@dataclass(frozen=True, eq=False)
class ProductMixture:
    """p(x) = sum_k w_k prod_j f(x_j; theta_kj) for a one-dimensional family f (``family``:
    "bernoulli" (p), "poisson" (rate), "binomial" (trials, p) or "gamma" (shape, scale));
    ``params`` holds one (K, d) array per parameter of f, in that order."""

    family: str
    weights: np.ndarray  # (K,)
    params: tuple[np.ndarray, ...]  # each (K, d)

    @property
    def dim(self) -> int:
        return self.params[0].shape[1]

    def component_log_probs(self, x: np.ndarray) -> np.ndarray:
        """(n, K) array of log prod_j f(x_j; theta_kj)."""
        x = _as_points(x, self.dim)
        log_f = _FAMILIES[self.family][0]
        columns = [log_f(x, *(p[k] for p in self.params)).sum(axis=1) for k in range(len(self.weights))]
        return np.stack(columns, axis=1)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return _mixture_log_prob(self.weights, self.component_log_probs(x))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        labels = rng.choice(len(self.weights), size=n, p=self.weights)
        return _FAMILIES[self.family][1](rng, *(p[labels] for p in self.params))


@dataclass(frozen=True, eq=False)
class IsingChain:
    """Open chain of n spins x_i in {0, 1}, sigma_i = 2 x_i - 1 in {-1, +1}:

    p(x) = exp(J sum_{i<n-1} sigma_i sigma_{i+1} + h sum_i sigma_i) / Z.
    log Z by backward messages (the transfer matrix in log space); exact ancestral sampling,
    since the open chain is a Markov chain: sigma_0, then each sigma_{i+1} given sigma_i.
    """

    n_spins: int
    coupling: float  # J
    field: float  # h

    @property
    def dim(self) -> int:
        return self.n_spins

    @cached_property
    def messages(self) -> np.ndarray:
        """(n, 2): m[i, a] = log sum over sigma_{i+1..} of exp(terms right of i), sigma_i = (-1, +1)[a]."""
        spins = np.array([-1.0, 1.0])
        pair = self.coupling * np.outer(spins, spins) + self.field * spins  # [a, b]: J s_a s_b + h s_b
        m = np.zeros((self.n_spins, 2))
        for i in range(self.n_spins - 2, -1, -1):
            m[i] = logsumexp(pair + m[i + 1], axis=1)
        return m

    @cached_property
    def log_z(self) -> float:
        return float(logsumexp(self.field * np.array([-1.0, 1.0]) + self.messages[0]))

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        x = _as_points(x, self.dim)
        s = 2 * x - 1
        energy = self.coupling * np.sum(s[:, 1:] * s[:, :-1], axis=1) + self.field * np.sum(s, axis=1)
        binary = np.all((x == 0) | (x == 1), axis=1)
        return np.where(binary, energy - self.log_z, -np.inf)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """sigma_0 ~ exp(h s + m_0(s)), sigma_{i+1} | sigma_i ~ exp(J sigma_i s + h s + m_{i+1}(s))."""
        u = rng.random((n, self.n_spins))
        m, j, h = self.messages, self.coupling, self.field
        x = np.empty((n, self.n_spins))
        prev = np.zeros(n)  # sigma_{-1} = 0: no coupling into the first spin
        for i in range(self.n_spins):
            logit = 2 * j * prev + 2 * h + m[i, 1] - m[i, 0]  # log p(+1) - log p(-1)
            x[:, i] = u[:, i] < 1.0 / (1.0 + np.exp(-logit))
            prev = 2 * x[:, i] - 1
        return x


# ----------------------------------------------------------------------------- the battery


def _case(name: str, description: str, kind: str, construction) -> KnownDensity:
    return KnownDensity(name, description, kind, construction.dim, construction.sample, construction.log_prob)


def _param_rng(case_number: int) -> np.random.Generator:
    return np.random.default_rng([PARAM_SEED, case_number])


def _gaussian(mean: np.ndarray, variances: np.ndarray, rng: np.random.Generator) -> GaussianMixture:
    """N(mean, Q diag(variances) Q^T), Q a random rotation."""
    cov = _rotated_covariance(variances, rng)
    return GaussianMixture(np.ones(1), mean[None], cov[None])


def _gmm_1d() -> KnownDensity:
    g = GaussianMixture(np.array([0.25, 0.45, 0.30]), np.array([[1.3], [-0.8], [2.5]]),
                        np.array([0.02, 0.3, 2.0])[:, None, None] ** 2)
    return _case("gmm_1d", "1-D mixture of 3 Gaussians: std 0.02 / 0.3 / 2 at 1.3 / -0.8 / 2.5, weights .25 / .45 / .3",
                 "continuous", g)


def _ring_2d() -> KnownDensity:
    angles = 2 * math.pi * np.arange(8) / 8
    means = np.array([1.5, -0.5]) + 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    g = GaussianMixture(np.full(8, 1 / 8), means, np.tile(0.05**2 * np.eye(2), (8, 1, 1)))
    return _case("ring_2d", "2-D mixture of 8 Gaussians (std 0.05) on a ring of radius 2 about (1.5, -0.5)",
                 "continuous", g)


def _gmm_8d() -> KnownDensity:
    rng, d = _param_rng(3), 8
    units = rng.permutation(np.geomspace(0.2, 5.0, d))
    offset = rng.uniform(-10, 10, d)
    sizes = np.array([0.05, 0.1, 0.2, 0.6, 1.0, 1.5])
    means = offset + units * rng.normal(0.0, 1.5, (len(sizes), d))
    shapes = [_rotated_covariance(np.exp(rng.uniform(-1.1, 1.1, d)), rng) for _ in sizes]
    covs = np.stack([size**2 * shape * np.outer(units, units) for size, shape in zip(sizes, shapes)])
    g = GaussianMixture(_normalised(rng.dirichlet(2 * np.ones(len(sizes)))), means, covs)
    return _case("gmm_8d", "8-D mixture of 6 full-covariance Gaussians, sizes 0.05-1.5 x per-axis units 0.2-5, offsets up to 10",
                 "continuous", g)


def _gauss_10d() -> KnownDensity:
    rng = _param_rng(4)
    g = _gaussian(rng.normal(2.0, 3.0, 10), np.geomspace(0.05, 15.0, 10), rng)
    return _case("gauss_10d", "10-D correlated Gaussian (random rotation), variances 0.05-15 (300x), nonzero mean",
                 "continuous", g)


def _gauss_50d() -> KnownDensity:
    rng = _param_rng(5)
    g = _gaussian(rng.normal(-1.0, 2.0, 50), np.geomspace(0.01, 10.0, 50), rng)
    return _case("gauss_50d", "50-D correlated Gaussian (random rotation), variances log-spaced 0.01-10 (1000x), nonzero mean",
                 "continuous", g)


def _student_t_2d() -> KnownDensity:
    t = StudentT(4.0, np.array([2.0, -1.0]), np.array([[1.0, 0.4], [0.4, 0.25]]))
    return _case("student_t_2d", "2-D Student-t, nu = 4, location (2, -1), scale [[1, 0.4], [0.4, 0.25]] (corr 0.8)",
                 "continuous", t)


def _student_t_1d() -> KnownDensity:
    t = StudentT(3.0, np.array([-2.0]), np.array([[0.5**2]]))
    return _case("student_t_1d", "1-D Student-t, nu = 3 (heavy tails), location -2, scale 0.5", "continuous", t)


def _circle_2d() -> KnownDensity:
    c = NoisySphere(np.array([0.5, 1.0]), 1.5, 0.05)
    return _case("circle_2d", "2-D circle of radius 1.5 about (0.5, 1) blurred by N(0, 0.05^2 I); exact via Bessel I0",
                 "continuous", c)


def _sphere_3d() -> KnownDensity:
    s = NoisySphere(np.array([1.0, -2.0, 0.5]), 1.5, 0.1)
    return _case("sphere_3d", "3-D sphere of radius 1.5 about (1, -2, 0.5) blurred by N(0, 0.1^2 I); closed form",
                 "continuous", s)


def _spiral_2d() -> KnownDensity:
    curve = partial(archimedean_spiral, centre=np.array([-1.0, 2.0]), growth=0.3)
    s = NoisyCurve(curve, (0.5 * math.pi, 5.0 * math.pi), 0.1, panels=300)
    return _case("spiral_2d", "2-D spiral r = 0.3 t, t ~ U(pi/2, 5 pi) (speed varies 8x), noise std 0.1; exact to 1e-12 by quadrature",
                 "continuous", s)


def _box_3d() -> KnownDensity:
    b = UniformBox(np.array([0.0, -2.0, 5.0]), np.array([1.0, 2.0, 5.5]))
    return _case("box_3d", "3-D uniform on the box [0, 1] x [-2, 2] x [5, 5.5] (volume 2, discontinuous)", "continuous", b)


def _gamma_mix_2d() -> KnownDensity:
    shapes = np.array([[2.0, 5.0], [8.0, 1.5]])
    scales = np.array([[1.5, 0.4], [0.25, 2.0]])
    g = ProductMixture("gamma", np.array([0.6, 0.4]), (shapes, scales))
    return _case("gamma_mix_2d", "2-D mixture of 2 product-Gamma components (shapes 1.5-8, scales 0.25-2): skewed, positive",
                 "continuous", g)


def prototype_mixture(n_protos: int, dim: int, flip: float, rng: np.random.Generator) -> ProductMixture:
    """Random prototype bit-strings (Dirichlet(2) weights), each bit flipped independently with
    probability ``flip``: a Bernoulli mixture with p = 1 - flip on the prototype's ones, flip on its zeros."""
    protos = rng.random((n_protos, dim)) < 0.5
    weights = _normalised(rng.dirichlet(2 * np.ones(n_protos)))
    return ProductMixture("bernoulli", weights, (np.where(protos, 1 - flip, flip),))


def bernoulli_mixture(n_components: int, dim: int, rng: np.random.Generator) -> ProductMixture:
    """Product-Bernoulli components with probabilities Beta(0.5, 0.5), clipped to [0.005, 0.995]."""
    probs = np.clip(rng.beta(0.5, 0.5, (n_components, dim)), 0.005, 0.995)
    return ProductMixture("bernoulli", _normalised(rng.dirichlet(2 * np.ones(n_components))), (probs,))


def _binary_protos_16d() -> KnownDensity:
    return _case("binary_protos_16d", "16-D bits: 5 random prototypes, each bit flipped with probability 0.05",
                 "binary", prototype_mixture(5, 16, 0.05, _param_rng(13)))


def _bernoulli_mix_64d() -> KnownDensity:
    return _case("bernoulli_mix_64d", "64-D bits: mixture of 10 product-Bernoulli components, probabilities ~ Beta(0.5, 0.5)",
                 "binary", bernoulli_mixture(10, 64, _param_rng(14)))


def _binary_protos_100d() -> KnownDensity:
    return _case("binary_protos_100d", "100-D bits: 8 random prototypes, each bit flipped with probability 0.1",
                 "binary", prototype_mixture(8, 100, 0.1, _param_rng(15)))


def _ising_chain_32() -> KnownDensity:
    return _case("ising_chain_32", "32 {0,1} spins on an open Ising chain, coupling J = 0.8, field h = 0.1; exact log Z",
                 "binary", IsingChain(32, 0.8, 0.1))


def _poisson_mix_3d() -> KnownDensity:
    rates = np.array([[0.5, 20.0, 3.0], [8.0, 1.0, 15.0], [25.0, 4.0, 0.7]])
    p = ProductMixture("poisson", np.array([0.5, 0.3, 0.2]), (rates,))
    return _case("poisson_mix_3d", "3-D counts: mixture of 3 product-Poisson components, rates 0.5-25", "integer", p)


def _binomial_counts_5d() -> KnownDensity:
    rng = _param_rng(18)
    probs = np.clip(rng.beta(0.8, 0.8, (4, 5)), 0.01, 0.99)
    p = ProductMixture("binomial", _normalised(rng.dirichlet(2 * np.ones(4))), (np.full((4, 5), 10.0), probs))
    return _case("binomial_counts_5d", "5-D counts 0..10: mixture of 4 product-Binomial(10, p) components, p ~ Beta(0.8, 0.8)",
                 "integer", p)


BATTERY: tuple[KnownDensity, ...] = tuple(
    build()
    for build in (
        _gmm_1d, _student_t_1d, _ring_2d, _circle_2d, _spiral_2d, _student_t_2d, _gamma_mix_2d,
        _sphere_3d, _box_3d, _gmm_8d, _gauss_10d, _gauss_50d,
        _binary_protos_16d, _ising_chain_32, _bernoulli_mix_64d, _binary_protos_100d,
        _poisson_mix_3d, _binomial_counts_5d,
    )
)


def by_name(name: str) -> KnownDensity:
    """The case called ``name``; ValueError (listing the known names) if there is none."""
    for case in BATTERY:
        if case.name == name:
            return case
    raise ValueError(f"unknown known-density case {name!r}; known: {', '.join(c.name for c in BATTERY)}")


def construction(name: str):
    """The object behind a case (a GaussianMixture, StudentT, NoisySphere, NoisyCurve, UniformBox,
    ProductMixture or IsingChain), whose fields are the case's parameters."""
    return by_name(name).log_prob.__self__


def make_split(case: KnownDensity | str, n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent train and test draws: generators seeded [seed, 0] and [seed, 1]."""
    case = by_name(case) if isinstance(case, str) else case
    train = case.sample(n_train, np.random.default_rng([seed, 0]))
    test = case.sample(n_test, np.random.default_rng([seed, 1]))
    return train, test
