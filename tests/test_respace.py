"""Respaced chains: the kept steps (improved-diffusion's on every count), stride 1 reproducing the
full chain (samples and bound), the eps kernels against improved-diffusion's respacing, the exact
reverse means of Gaussian data, and the --respace option of evaluate and sample."""

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import TINY_N, TINY_TEST_FRACTION, assert_one_line_error

from linear_gaussian import analytic_model, exact_eps_model, true_reverse, wavy_model
from thermodiff import BinomialDiffusion, GaussianDiffusion, ancestral_sample, exact_bound, make_schedule
from thermodiff.process.vdm import VDM
from thermodiff.process.respace import (RespacedDiffusion, VarianceFit, VarianceRule, candidate_steps, cheapest_path,
                                        evenly_spaced, fitted_transition_kl, fitted_x0_errors, respace,
                                        respaced_timesteps, spacing_of)
from thermodiff.tasks.evaluation import FIT_EXAMPLES
from thermodiff.tasks.options import VARIANCE_RULES

PARAMETERIZATIONS = ["reference", "paper", "eps", "eps_learned_var"]


def space_timesteps_one_section(T: int, count: int) -> list[int]:
    """improved-diffusion's ``space_timesteps(T, [count])`` restated (0-based steps): the section's
    fractional stride (T - 1) / (count - 1), or 1 for a single step, added up in floating point
    from 0.0, Python's round of every partial sum kept, as a set."""
    stride = (T - 1) / (count - 1) if count > 1 else 1
    kept, position = set(), 0.0
    for _ in range(count):
        kept.add(round(position))
        position += stride
    return sorted(kept)


@pytest.mark.parametrize("T", [6, 40, 1000])
def test_evenly_spaced_steps_are_improved_diffusions_on_every_count(T):
    assert space_timesteps_one_section(T, 1) == [0]  # a single step is no chain from 1 to T
    with pytest.raises(ValueError, match="2.."):
        respaced_timesteps(T, 1)
    for count in range(2, T + 1):
        assert respaced_timesteps(T, count) == [s + 1 for s in space_timesteps_one_section(T, count)], count
    if T == 40:  # 7 * 39 / 14 = 19.5 is a tie: the accumulated stride falls just short of it
        assert respaced_timesteps(40, 15)[7] == 20


@pytest.mark.parametrize("T", [6, 40, 1000])
def test_quadratic_steps_are_a_squared_grid_from_1_to_T(T):
    for count in range(2, min(T, 60) + 1):
        steps = respaced_timesteps(T, f"quad{count}")
        assert len(steps) == count and steps[0] == 1 and steps[-1] == T
        assert all(b > a for a, b in zip(steps, steps[1:])), (count, steps)
        # each step is its rounded grid point, or (where rounding would repeat a step) one past the step before
        rounded = 1 + np.rint((T - 1) * (np.arange(count) / (count - 1)) ** 2).astype(int)
        pushed = np.asarray(steps) != rounded
        assert (np.asarray(steps) >= rounded).all() and (np.diff(steps)[pushed[1:]] == 1).all(), (count, steps)
        if (np.diff(rounded) > 0).all():
            assert not pushed.any(), (count, steps)
    assert respaced_timesteps(T, f"quad{T}") == list(range(1, T + 1))  # every step kept: the chain itself
    assert spacing_of(f"quad{min(T, 5)}") == "quadratic"


def test_quadratic_steps_of_the_20_step_chain_and_bad_specs():
    assert respaced_timesteps(1000, "quad20") == [1, 4, 12, 26, 45, 70, 101, 137, 178, 225, 278, 336, 399, 469, 543,
                                                  624, 709, 801, 898, 1000]
    with pytest.raises(ValueError, match="quadN"):
        respaced_timesteps(1000, "quadtwenty")
    with pytest.raises(ValueError, match="2..40"):
        respaced_timesteps(40, "quad41")


def test_cli_quadratic_steps_are_recorded_as_such(cli, trained_run, tmp_path):
    e = cli("evaluate", trained_run["run_dir"], "--respace", "quad4", "--quiet", "--json").json()
    assert e["respaced_timesteps"] == [1, 2, 3, 6] and e["spacing"] == "quadratic" and e["T"] == 4
    s = cli("sample", trained_run["run_dir"], "--steps", "quad4", "-n", "3", "--out", tmp_path / "s.npy", "--json").json()
    assert s["respaced_timesteps"] == [1, 2, 3, 6] and s["spacing"] == "quadratic"


def test_respaced_timesteps():
    assert respaced_timesteps(40, 10) == [1, 5, 10, 14, 18, 23, 27, 31, 36, 40]
    assert respaced_timesteps(40, "4") == [1, 14, 27, 40]
    assert respaced_timesteps(40, 40) == list(range(1, 41))
    assert respaced_timesteps(40, "1,20,40") == [1, 20, 40]
    for bad in (1, 41, "0", "2,20,40", "1,20,39", "1,20,20,40", "ten"):
        with pytest.raises(ValueError):
            respaced_timesteps(40, bad)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("decoder", ["forward", "learned"])
def test_stride_one_reproduces_the_full_chain(parameterization, decoder):
    T = 10
    diffusion = GaussianDiffusion(make_schedule("learned", T, beta_1=1e-4), parameterization, decoder)
    same = respace(diffusion, T)
    torch.testing.assert_close(same.schedule.betas(), diffusion.schedule.betas().detach(), rtol=1e-12, atol=0)
    x0 = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = exact_bound(diffusion, wavy_model, [x0], 2, torch.Generator().manual_seed(1))
    respaced = exact_bound(same, wavy_model, [x0], 2, torch.Generator().manual_seed(1))
    torch.testing.assert_close(respaced.per_example, full.per_example, rtol=1e-10, atol=1e-10)
    shape = (200, 2)
    torch.testing.assert_close(ancestral_sample(same, wavy_model, shape, torch.Generator().manual_seed(2)),
                               ancestral_sample(diffusion, wavy_model, shape, torch.Generator().manual_seed(2)),
                               rtol=1e-5, atol=1e-6)  # float32 states, kernels equal to ~1e-15


def test_respaced_chain_is_the_diffusion_on_the_kept_steps_and_calls_the_network_at_them():
    diffusion = GaussianDiffusion(make_schedule("cosine", 40), "eps")
    chain = respace(diffusion, 10)
    abar = torch.cumprod(1 - diffusion.schedule.betas(), 0)
    kept = torch.tensor(respaced_timesteps(40, 10))
    torch.testing.assert_close(torch.cumprod(1 - chain.schedule.betas(), 0), abar[kept - 1], rtol=1e-12, atol=0)
    assert chain.T == 10 and torch.equal(chain.timesteps, kept)
    seen = []

    def recording_model(x, t):
        seen.append(int(t[0]))
        return wavy_model(x, t)

    ancestral_sample(chain, recording_model, (3, 2), torch.Generator().manual_seed(3))
    assert seen == kept.flip(0).tolist()[:-1]  # the forward decoder needs no network at t = 1


@pytest.mark.parametrize("parameterization, eps_variance, rule", [
    ("eps", None, "moments"), ("eps", "beta", "interpolate"), ("eps_learned_var", None, "interpolate")])
def test_eps_kernels_are_improved_diffusions_respacing(parameterization, eps_variance, rule):
    """improved-diffusion's SpacedDiffusion: new betas from the abar subsequence, x_0 from the
    predicted noise at the original t, the posterior mean and the variance choice of the new chain
    (for beta-tilde, the moments rule's; for beta and learned variances, the interpolation rule's)."""
    T, kept = 20, [1, 4, 9, 15, 20]
    diffusion = GaussianDiffusion(make_schedule("cosine", T), parameterization, eps_variance=eps_variance)
    chain = RespacedDiffusion(diffusion, kept, rule)
    abar = np.cumprod(1 - diffusion.schedule.betas().numpy())[np.array(kept) - 1]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    betas = 1 - abar / abar_prev
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    small = np.concatenate([beta_tilde[1:2], beta_tilde[1:]])
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    z = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    k = torch.arange(1, 6)
    mean, var = chain.p_mean_var(lambda x_t, t: z if torch.equal(t, torch.tensor(kept)) else None, x, k)
    i = (k - 1).numpy()[:, None]
    x0 = (x.numpy() - np.sqrt(1 - abar[i]) * z[:, 0].numpy()) / np.sqrt(abar[i])
    expected_mean = (np.sqrt(abar_prev[i]) * betas[i] * x0 + np.sqrt(1 - betas[i]) * (1 - abar_prev[i]) * x.numpy()) / (1 - abar[i])
    np.testing.assert_allclose(mean[1:].numpy(), expected_mean[1:], rtol=1e-9, atol=1e-10)
    if parameterization == "eps_learned_var":
        v = (z[:, 1].numpy() + 1) / 2
        expected_var = np.exp(v * np.log(betas[i]) + (1 - v) * np.log(small[i]))
    else:
        expected_var = np.broadcast_to((betas if eps_variance == "beta" else small)[i], (5, 3))
    np.testing.assert_allclose(var[1:].numpy(), expected_var[1:], rtol=1e-9)
    # the first step is the network's own kernel at t = 1
    first_mean, first_var = diffusion.p_mean_var(lambda *_: z[:1], x[:1], torch.tensor([1]))
    torch.testing.assert_close((mean[:1], var[:1]), (first_mean, first_var))


@pytest.mark.parametrize("parameterization", ["reference", "paper"])
def test_true_reverse_kernels_respace_to_the_true_respaced_kernels(parameterization):
    """For data N(0, s^2) and the model whose kernels are the true reverse conditionals, the
    moments rule gives the true reverse conditionals of the respaced process, mean and variance,
    whatever parameterisation carries them; and a bound near log p(x_0)."""
    T, s, kept = 16, 0.7, [1, 3, 8, 9, 16]
    diffusion = GaussianDiffusion(make_schedule("reference", T), parameterization, "learned")
    model = analytic_model(diffusion.schedule.betas().tolist(), s, parameterization)
    chain = RespacedDiffusion(diffusion, kept)
    a, r, _ = true_reverse(chain.schedule.betas().tolist(), s)
    x = torch.linspace(-2, 2, 5, dtype=torch.float64)[:, None]
    for k in range(1, len(kept) + 1):
        mean, var = chain.p_mean_var(model, x, torch.full((5,), k))
        torch.testing.assert_close(mean, a[k - 1] * x, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(var, torch.full_like(var, r[k - 1]), rtol=1e-9, atol=0)
    x0 = torch.randn(2000, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * s
    k = exact_bound(chain, model, [x0], 1, torch.Generator().manual_seed(6))
    log_p = float((-0.5 * (math.log(2 * math.pi * s * s) + x0**2 / (s * s))).mean())
    assert log_p - 0.05 < k.mean < log_p + 4 * k.stderr


@pytest.mark.parametrize("parameterization", ["eps", "reference"])
def test_fitted_variances_of_exact_means_are_the_true_reverse_variances(parameterization):
    """Data N(0, s^2) and a network with the exact reverse mean: the fitted variance of every
    respaced step but the decoder's is the true reverse variance of the respaced process
    (Analytic-DPM's case), whether the network's own variance says so (reference) or not (eps,
    whose fixed beta-tilde the moments rule carries over); within 5 standard errors of the fit's
    Monte Carlo estimate of E Var[x_0 | x_t] (an average of N squared Gaussian errors: relative
    standard error sqrt(2 / N))."""
    T, s, kept, n = 16, 0.7, [1, 3, 8, 9, 16], 100_000
    diffusion = GaussianDiffusion(make_schedule("reference", T), parameterization, "learned")
    betas = diffusion.schedule.betas().tolist()
    model = exact_eps_model(betas, s) if parameterization == "eps" else analytic_model(betas, s, parameterization)
    x0 = torch.randn(n, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * s
    chain = respace(diffusion, kept, "fitted", VarianceFit(model, torch.split(x0, 25_000), torch.Generator().manual_seed(8)))
    a, r, _ = true_reverse(chain.schedule.betas().tolist(), s)
    abar = torch.cumprod(1 - chain.schedule.betas(), 0)
    x0_var = s * s * (1 - abar) / (abar * s * s + 1 - abar)  # Var[x_0 | x_t], the same at every x_t
    c0 = chain.posterior_tables()[0]
    x = torch.linspace(-2, 2, 5, dtype=torch.float64)[:, None]
    for k in range(2, len(kept) + 1):
        mean, var = chain.p_mean_var(model, x, torch.full((5,), k))
        torch.testing.assert_close(mean, a[k - 1] * x, rtol=1e-9, atol=1e-12)
        tolerance = 5 * float(c0[k - 1] ** 2 * x0_var[k - 1]) * math.sqrt(2 / n)
        assert abs(float(var[0, 0]) - r[k - 1]) < tolerance, (k, float(var[0, 0]), r[k - 1])
    moments = respace(diffusion, kept)
    _, narrow = moments.p_mean_var(model, x, torch.full((5,), 3))
    assert (parameterization == "eps") == bool(narrow[0, 0] < 0.5 * r[2])  # beta-tilde' where the network says nothing


def test_fitted_variances_maximise_the_bound_for_an_imperfect_mean():
    """A network whose mean is wrong (wavy_model as noise prediction): scaling the fitted squared
    errors up or down lowers the bound on the data the fit saw, by more than three standard errors
    of the per-example differences (the same forward draws for all three chains, so paired): the
    fit minimises each step's expected KL."""
    T, kept = 20, [1, 6, 11, 20]
    diffusion = GaussianDiffusion(make_schedule("cosine", T), "eps")
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    errors = fitted_x0_errors(diffusion, VarianceFit(wavy_model, [x0], torch.Generator().manual_seed(10)), kept)
    assert errors[0] == 0 and bool((errors[1:] > 0).all())

    def bound(scale: float) -> torch.Tensor:
        chain = RespacedDiffusion(diffusion, kept, "fitted", errors * scale)
        return exact_bound(chain, wavy_model, [x0], 1, torch.Generator().manual_seed(11)).per_example

    best = bound(1.0)
    for scale in (0.7, 1.3):
        gain = best - bound(scale)
        assert float(gain.mean()) > 3 * float(gain.std()) / math.sqrt(len(gain)), scale


def test_fitted_transition_kl_is_the_mean_kl_of_the_two_gaussians():
    """The closed form against torch.distributions: the KL from q(x_s | x_t, x_0) to the fitted
    kernel, c0 and beta-tilde read off a respaced chain's posterior tables, averaged over residuals
    x_0 - x0_hat ~ N(0, e) (Monte Carlo, within 5 standard errors), for short and long steps."""
    diffusion = GaussianDiffusion(make_schedule("cosine", 50), "eps")
    log_abar = diffusion.log_alphas_cumprod()
    generator = torch.Generator().manual_seed(12)
    for s, t, e in ((1, 2, 0.3), (1, 30, 0.05), (7, 8, 1.0), (12, 50, 0.8), (40, 41, 0.01)):
        kept = sorted({1, s, t, 50})  # the chain's step kept.index(t) goes from t down to s
        c0, _, beta_tilde = (table[kept.index(t)] for table in RespacedDiffusion(diffusion, kept).posterior_tables())
        residual = torch.randn(200_000, generator=generator, dtype=torch.float64) * math.sqrt(e)
        q = torch.distributions.Normal(c0 * residual, beta_tilde.sqrt())
        p = torch.distributions.Normal(torch.zeros_like(residual), (beta_tilde + c0**2 * e).sqrt())
        kl = torch.distributions.kl_divergence(q, p)
        closed = float(fitted_transition_kl(log_abar[s - 1], log_abar[t - 1], torch.tensor(e, dtype=torch.float64)))
        assert abs(float(kl.mean()) - closed) < 5 * float(kl.std()) / math.sqrt(len(kl)), (s, t, e)


@pytest.mark.parametrize("count", [2, 3, 4, 6])
def test_cheapest_path_is_the_cheapest_of_all_subsequences(count):
    """Dynamic programming against enumeration: random step costs on 7 candidates, every
    subsequence from the first to the last of ``count`` candidates."""
    M = 7
    costs = torch.rand(M, M, generator=torch.Generator().manual_seed(count), dtype=torch.float64)
    costs = costs.masked_fill(~torch.ones(M, M, dtype=torch.bool).triu(1), math.inf)
    total = lambda path: sum(float(costs[a, b]) for a, b in zip(path, path[1:]))  # noqa: E731
    paths = [[0, *middle, M - 1] for middle in itertools.combinations(range(1, M - 1), count - 2)]
    best = min(paths, key=total)
    assert cheapest_path(costs, count) == best
    with pytest.raises(ValueError, match="2..7"):
        cheapest_path(costs, 8)


def test_optimal_steps_beat_even_steps_by_their_expected_kls():
    """An imperfect network (wavy_model as noise prediction) on 2-D data: the optimal 5 of 100
    steps beat the even 5, paired on the same held-out data, by more than 4 standard errors, and
    by what their steps' expected KLs predict (each the KL from q(x_s | x_t, x_0) to the chain's
    kernel, the x_0 error from a second, independent fit of 200000 examples, torch.distributions'
    KL of a mean off by that error), within 4 standard errors. Gaussian data with the exact network
    cannot tell spacings apart: every chain's KLs then telescope to the same sum."""
    T, dim, n = 100, 2, 20_000
    diffusion = GaussianDiffusion(make_schedule("linear", T), "eps")
    draw = lambda seed, n=n: torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.3  # noqa: E731
    fit = VarianceFit(wavy_model, [draw(13)], torch.Generator().manual_seed(14))
    optimal, even = respace(diffusion, "optimal5", "fitted", fit), respace(diffusion, 5, "fitted", fit)
    assert optimal.timesteps.tolist() != even.timesteps.tolist() and len(optimal.timesteps) == 5

    def expected_kl(chain) -> float:  # per example, nats
        errors = fitted_x0_errors(diffusion, VarianceFit(wavy_model, [draw(17, 200_000)], torch.Generator().manual_seed(18)),
                                  chain.timesteps.tolist())
        c0, _, beta_tilde = chain.posterior_tables()
        kernel_variance = beta_tilde + c0**2 * chain.x0_errors
        q = torch.distributions.Normal((c0**2 * errors).sqrt()[1:], beta_tilde.sqrt()[1:])
        return dim * float(torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, kernel_variance.sqrt()[1:])).sum())

    x0 = draw(15)
    gain = (exact_bound(optimal, wavy_model, [x0], 1, torch.Generator().manual_seed(16)).per_example
            - exact_bound(even, wavy_model, [x0], 1, torch.Generator().manual_seed(16)).per_example)
    stderr = float(gain.std()) / math.sqrt(n)
    assert float(gain.mean()) > 4 * stderr
    assert abs(float(gain.mean()) - (expected_kl(even) - expected_kl(optimal))) < 4 * stderr


def test_optimal_spacing_checks_its_inputs():
    diffusion = GaussianDiffusion(make_schedule("cosine", 20), "eps")
    fit = VarianceFit(wavy_model, [torch.zeros(4, 1, dtype=torch.float64)])
    with pytest.raises(ValueError, match="fitted variance rule"):
        respace(diffusion, "optimal5", "moments", fit)
    with pytest.raises(ValueError, match="optimalN"):
        respace(diffusion, "optimalfive", "fitted", fit)
    with pytest.raises(ValueError, match="2..20"):
        respace(diffusion, "optimal21", "fitted", fit)
    with pytest.raises(ValueError, match="not fitted"):
        respace(VDM(10, "learned", 1e-4), "optimal5", "fitted", fit)
    assert candidate_steps(20, 5) == list(range(1, 21))
    steps = candidate_steps(1000, 20)
    assert steps[:6] == [1, 2, 3, 4, 5, 6] and steps[-1] == 1000 and set(evenly_spaced(1000, 20)) <= set(steps)
    assert [spacing_of(spec) for spec in (None, 5, "5", "optimal5", "1,3,5", [1, 3, 5])] == \
        ["even", "even", "even", "optimal", "listed", "listed"]


def test_fitted_rule_checks_its_inputs():
    assert VARIANCE_RULES == tuple(rule.value for rule in VarianceRule)  # the command line's choices
    diffusion = GaussianDiffusion(make_schedule("cosine", 20), "eps")
    with pytest.raises(ValueError, match="needs the network"):
        respace(diffusion, 5, "fitted")
    with pytest.raises(ValueError, match="only it"):
        RespacedDiffusion(diffusion, [1, 10, 20], "moments", torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="one per kept step"):
        RespacedDiffusion(diffusion, [1, 10, 20], "fitted", torch.zeros(4, dtype=torch.float64))


def test_vdm_chains_take_no_fitted_variances():
    x0 = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="not fitted"):
        respace(VDM(10, "learned", 1e-4), 5, "fitted", VarianceFit(wavy_model, [x0]))


def test_cli_fitted_variances(cli, copy_run, tmp_path):
    """--variance fitted on evaluate (a respaced chain, or all T steps) and sample: recorded as
    such, fitted on the run's training data, and the run's own evaluation.json left alone."""
    run = copy_run()
    cli("evaluate", run, "--quiet")
    saved = (run / "evaluation.json").read_text()
    fitted = cli("evaluate", run, "--quiet", "--json", "--respace", "3", "--variance", "fitted").json()
    assert (fitted["variance_rule"], fitted["respaced_timesteps"]) == ("fitted", [1, 3, 6])
    n_train = TINY_N - round(TINY_N * TINY_TEST_FRACTION)  # the tiny run's training split, all of it fitted on
    assert fitted["variance_fit_examples"] == min(FIT_EXAMPLES, n_train) and math.isfinite(fitted["K_bits"])
    whole = cli("evaluate", run, "--quiet", "--json", "--variance", "fitted").json()
    assert whole["respaced_timesteps"] == [1, 2, 3, 4, 5, 6] and whole["T"] == 6
    assert (run / "evaluation.json").read_text() == saved
    assert "respaced from 6 (even steps), fitted variances" in cli("evaluate", run, "--quiet", "--respace", "3", "--variance",
                                                      "fitted").out
    out = cli("sample", run, "-n", "5", "--out", tmp_path / "s.npy", "--quiet", "--respace", "3", "--variance", "fitted")
    assert out.rc == 0 and np.load(tmp_path / "s.npy").shape == (5, 2)
    assert_one_line_error(cli("evaluate", run, "--variance", "wide"), "--variance", "fitted")
    np.save(tmp_path / "other.npy", np.zeros((10, 2)))
    assert_one_line_error(cli("evaluate", run, "--data", tmp_path / "other.npy", "--respace", "3", "--variance", "fitted"),
                          "--variance fitted", "training data")
    assert_one_line_error(cli("sample", run, "-n", "5", "--out", tmp_path / "d.npy", "--sampler", "ddim", "--variance",
                              "fitted"), "--variance fitted", "ancestral")


def test_cli_optimal_steps(cli, copy_run, tmp_path):
    """--respace/--steps optimalN on evaluate and sample: fitted variances unless asked otherwise
    (then a one-line error), the steps recorded as optimal, N of them from 1 to T."""
    run = copy_run()
    optimal = cli("evaluate", run, "--quiet", "--json", "--respace", "optimal3").json()
    assert (optimal["variance_rule"], optimal["spacing"], len(optimal["respaced_timesteps"])) == ("fitted", "optimal", 3)
    assert optimal["respaced_timesteps"][::2] == [1, 6] and math.isfinite(optimal["K_bits"])
    assert "(optimal steps), fitted variances" in cli("evaluate", run, "--quiet", "--respace", "optimal3").out
    assert cli("evaluate", run, "--quiet", "--json", "--respace", "3", "--variance", "fitted").json()["spacing"] == "even"
    out = cli("sample", run, "-n", "5", "--out", tmp_path / "s.npy", "--quiet", "--json", "--steps", "optimal3").json()
    assert (out["spacing"], out["variance_rule"], out["steps"]) == ("optimal", "fitted", 3)
    assert np.load(tmp_path / "s.npy").shape == (5, 2)
    assert_one_line_error(cli("evaluate", run, "--respace", "optimal3", "--variance", "moments"), "--respace",
                          "--variance fitted")
    assert_one_line_error(cli("evaluate", run, "--respace", "optimalx"), "--respace", "optimalN")
    assert_one_line_error(cli("sample", run, "-n", "5", "--out", tmp_path / "d.npy", "--steps", "optimal3",
                              "--sampler", "ddim"), "--steps optimal3", "ancestral")


def test_binomial_chains_are_not_respaced():
    with pytest.raises(ValueError, match="Gaussian"):
        respace(BinomialDiffusion(make_schedule("erase", 10), 0.3), 5)


def test_cli_evaluate_and_sample_respaced(cli, copy_run, tmp_path):
    run = copy_run()
    full = cli("evaluate", run, "--quiet", "--json").json()
    saved = (run / "evaluation.json").read_text()
    r = cli("evaluate", run, "--quiet", "--json", "--respace", "3")
    e = r.json()
    assert (e["T"], e["T_trained"], e["respaced_timesteps"]) == (3, 6, [1, 3, 6])  # as improved-diffusion's
    assert len(e["per_timestep_bits"]) == 4 and math.isfinite(e["K_bits"])
    assert (run / "evaluation.json").read_text() == saved  # the full chain's record stays
    same = cli("evaluate", run, "--quiet", "--json", "--respace", "1,2,3,4,5,6").json()
    assert same["K_bits"] == pytest.approx(full["K_bits"], rel=1e-9)
    text = cli("evaluate", run, "--quiet", "--respace", "3").out
    assert "T = 3 respaced from 6 (even steps)" in text
    r = cli("sample", run, "-n", "7", "--out", tmp_path / "s.npy", "--quiet", "--json", "--respace", "2")
    out = r.json()
    assert out["steps"] == 2 and np.load(tmp_path / "s.npy").shape == (7, 2)
    assert out["sample_wall_s"] >= 0
    assert_one_line_error(cli("sample", run, "-n", "7", "--out", tmp_path / "t.npy", "--respace", "9"), "--respace", "2..6")
    assert_one_line_error(cli("evaluate", run, "--respace", "2,6"), "--respace", "from 1 to T")
