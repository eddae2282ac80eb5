"""The exact log-likelihood through the probability-flow ODE (process/ode.py, ``evaluate --ode``).

Against independent computations: for Gaussian data N(mu, Sigma) and the exact score of the diffused
marginal N(sqrt(abar) mu, abar Sigma + (1 - abar) I), the ODE's log p(x) is the closed-form density
of the data blurred at the flow's start, log N(x; mu, Sigma + (1 - abar_0) / abar_0 I)
(torch.distributions), to within the error the solver's tolerance allows; Hutchinson's trace agrees
with the exact one within its Monte Carlo error; the network's score at a step is its kernel's; the
interpolated schedule is SciPy's monotone cubic; and trained runs (discrete-time, VDM, images) report
it through the command line.
"""

import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

from conftest import TINY_TOML, assert_one_line_error, write_tiny_config
from test_vdm import VDM_TOML
from thermodiff.nets.vector import build_vector_net
from thermodiff.process.binomial import BinomialDiffusion
from thermodiff.process.gaussian import GaussianDiffusion, GaussianParameterization
from thermodiff.process.ode import Trace, flow_log_likelihood
from thermodiff.process.schedules import Schedule, invert_increasing, log_snr_betas, make_schedule, monotone_cubic
from thermodiff.process.vdm import VDM, NoiseSchedule

BETA_1 = 1e-2  # a coarse resolution, so that the start's blur and scaling are far above the tolerance
GAMMA_END = 30.0  # -log SNR where the flow ends: abar = 1e-13, so the prior N(0, I) is the marginal there
TOL = 1e-6


def gaussian_data(dim: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mu, a correlated Sigma, and n draws of N(mu, Sigma) (float64)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    sigma = a @ a.T / dim + 0.2 * torch.eye(dim, dtype=torch.float64)
    mu = torch.randn(dim, generator=g, dtype=torch.float64)
    return mu, sigma, MultivariateNormal(mu, sigma).sample((n,))


def exact_eps(x: torch.Tensor, abar: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t] = -sqrt(1 - abar) score of N(sqrt(abar) mu, abar Sigma + (1 - abar) I) at x."""
    cov = abar * sigma + (1 - abar) * torch.eye(len(mu), dtype=torch.float64)
    return (1 - abar).sqrt() * torch.linalg.solve(cov, (x - abar.sqrt() * mu).T).T


def exact_model(process, mu, sigma):
    """The exact noise prediction as a network of ``process`` (called at continuous times s)."""
    if process.continuous_time:
        return lambda x, s: exact_eps(x, torch.sigmoid(-process.gamma(s[:1]))[0], mu, sigma)[:, None]
    T = process.T

    def model(x, s):
        eps = exact_eps(x, process.continuous_log_alpha_bar(1 + s[0] * (T - 1)).exp(), mu, sigma)
        return torch.stack([eps, torch.zeros_like(eps)], 1)

    return model


def exact_processes() -> dict:
    """A discrete-time chain (T = 50, equal steps of log SNR) and a VDM (linear gamma), from the
    resolution BETA_1 to -log SNR = GAMMA_END."""
    vdm = VDM(10, "linear", BETA_1)
    vdm.gamma = NoiseSchedule(math.log(BETA_1 / (1 - BETA_1)), GAMMA_END, learn=False)
    return {"gaussian": GaussianDiffusion(Schedule(log_snr_betas(50, BETA_1, -GAMMA_END)), "eps"), "vdm": vdm}


@pytest.mark.parametrize("kind", ["gaussian", "vdm"])
@pytest.mark.parametrize("dim", [2, 5])
def test_ode_log_likelihood_of_gaussian_data_with_the_exact_score_is_the_closed_form(kind, dim):
    process = exact_processes()[kind]
    mu, sigma, x = gaussian_data(dim, 40)
    result = flow_log_likelihood(process, exact_model(process, mu, sigma), x, TOL, TOL, Trace.EXACT)
    blur = BETA_1 / (1 - BETA_1)  # (1 - abar) / abar at the start, where x enters as sqrt(abar) x
    closed = MultivariateNormal(mu, sigma + blur * torch.eye(dim, dtype=torch.float64)).log_prob(x)
    # dopri5 keeps each step's local error within atol + rtol |y| of the state (x, int div f); at
    # most the sum over its steps (6 evaluations each) reaches log p
    steps = result.nfe / 6
    bound = steps * (TOL + TOL * (closed.abs() + x.abs().sum(1)))
    assert (result.per_example - closed).abs().le(bound).all(), (result.per_example - closed).abs().max()
    assert result.nfe > 0


@pytest.mark.parametrize("kind", ["gaussian", "vdm"])
def test_hutchinson_trace_agrees_with_the_exact_trace_within_its_monte_carlo_error(kind):
    process = exact_processes()[kind]
    mu, sigma, x = gaussian_data(3, 300, seed=1)
    model = exact_model(process, mu, sigma)
    exact = flow_log_likelihood(process, model, x, 1e-5, 1e-5, Trace.EXACT).per_example
    hutchinson = flow_log_likelihood(process, model, x, 1e-5, 1e-5, Trace.HUTCHINSON, torch.Generator().manual_seed(2))
    difference = hutchinson.per_example - exact
    stderr = difference.std() / math.sqrt(len(difference))
    assert stderr > 1e-3  # a correlated Sigma: the estimate is noisy per example
    assert abs(float(difference.mean())) < 4 * stderr


@pytest.mark.parametrize("parameterization", list(GaussianParameterization))
def test_the_flows_score_at_a_step_is_the_kernels_of_that_step(parameterization):
    torch.manual_seed(0)
    T = 20
    diffusion = GaussianDiffusion(make_schedule("linear", T), parameterization)
    net = build_vector_net("mlp", 3, 2, T, 16).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    log_abar = diffusion.log_alphas_cumprod()
    for t in (2, 11, T):
        gamma = torch.log(-torch.expm1(log_abar[t - 1])) - log_abar[t - 1]
        x0 = diffusion.expected_x0(net, x, t)  # the x_0 that the kernel's mean implies (posterior tables)
        implied = (x - log_abar[t - 1].exp().sqrt() * x0) / (-torch.expm1(log_abar[t - 1])).sqrt()
        torch.testing.assert_close(diffusion.flow_eps(net, x, gamma), implied, rtol=1e-6, atol=1e-8)


def test_vdm_flow_calls_its_network_at_the_time_of_the_noise_level():
    vdm = VDM(6, "learned", 1e-4)
    net = build_vector_net("mlp", 2, 1, 6, 8).double()
    x, s = torch.randn(5, 2, dtype=torch.float64), torch.tensor(0.37, dtype=torch.float64)
    gamma = vdm.gamma(s.reshape(1)).detach()[0]
    torch.testing.assert_close(vdm.flow_eps(net, x, gamma), vdm.eps_hat(net, x, s.expand(5), x.dtype), rtol=1e-7, atol=1e-9)


def test_the_continuous_schedule_is_the_monotone_cubic_through_every_step():
    interpolate = pytest.importorskip("scipy.interpolate")
    diffusion = GaussianDiffusion(make_schedule("cosine", 12))
    knots = torch.cat([torch.zeros(1, dtype=torch.float64), diffusion.log_alphas_cumprod()])
    u = torch.linspace(1, 11, 101, dtype=torch.float64)  # SciPy's end slopes differ: the inner segments
    expected = interpolate.PchipInterpolator(range(13), knots.numpy())(u.numpy())
    torch.testing.assert_close(diffusion.continuous_log_alpha_bar(u), torch.as_tensor(expected), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(monotone_cubic(knots, torch.arange(13.0)), knots)
    assert bool((torch.diff(diffusion.continuous_log_alpha_bar(torch.linspace(0, 12, 500))) < 0).all())
    root = invert_increasing(torch.exp, torch.tensor(2.0, dtype=torch.float64), -3.0, 3.0)
    assert float(root) == pytest.approx(math.log(2.0), abs=1e-10)


def test_processes_without_an_ode_say_so():
    with pytest.raises(ValueError, match="Gaussian diffusion"):
        BinomialDiffusion(make_schedule("erase", 5), stationary_p=0.5).flow_gammas()
    with pytest.raises(ValueError, match="respacing"):
        GaussianDiffusion(make_schedule("linear", 10)).respaced([1, 5, 10], "moments").flow_gammas()


def check_ode_report(r: dict, examples: int) -> None:
    assert r["ode_n_examples"] == examples and r["ode_nfe"] > 0 and r["ode_rtol"] == 1e-4
    assert math.isfinite(r["ode_log_likelihood_bits"]) and r["ode_stderr_bits"] > 0
    # original units: the same scaling as K's
    shift = r["ode_log_likelihood_original_units_bits"] - r["ode_log_likelihood_bits"]
    assert shift == pytest.approx(r["K_original_units_bits"] - r["K_bits"], rel=1e-9, abs=1e-9)


BUMPS_TOML = TINY_TOML.replace('hidden = 8', 'hidden = 8\nreadout = "bumps"\nn_basis = 4')


def test_evaluate_ode_through_the_cli(cli, tmp_path):
    run = tmp_path / "run"
    assert cli("train", write_tiny_config(tmp_path, BUMPS_TOML), "--out", run, "--quiet").rc == 0
    r = cli("evaluate", run, "--ode", "--ode-rtol", 1e-4, "--ode-atol", 1e-4, "--max-examples", 12, "--json", "--quiet").json()
    check_ode_report(r, 12)
    assert r["ode_trace"] == "hutchinson" and r["ode_bound"] is None and "ode_nll_bits_per_dim" not in r
    exact = cli("evaluate", run, "--ode", "--ode-exact-trace", "--ode-rtol", 1e-4, "--ode-atol", 1e-4, "--max-examples", 12,
                "--per-example", tmp_path / "K.npy", "--json", "--quiet").json()
    assert exact["ode_trace"] == "exact"
    ode = np.load(exact["ode_per_example_file"])
    assert ode.shape == (12,) and float(ode.mean()) == pytest.approx(exact["ode_log_likelihood_original_units_bits"])
    assert_one_line_error(cli("evaluate", run, "--ode", "--ode-rtol", 0), "--ode-rtol", "positive")


def test_evaluate_ode_of_a_vdm_run(cli, tmp_path):
    run = tmp_path / "vdm"
    assert cli("train", write_tiny_config(tmp_path, VDM_TOML), "--out", run, "--quiet").rc == 0
    r = cli("evaluate", run, "--ode", "--ode-rtol", 1e-4, "--ode-atol", 1e-4, "--max-examples", 10, "--json", "--quiet").json()
    check_ode_report(r, 10)
    assert r["ode_gammas"][0] == pytest.approx(math.log(1e-4 / (1 - 1e-4)))


def test_evaluate_ode_of_an_image_run_is_an_nll_in_bits_per_dim(cli, tiny_images, tmp_path):
    run = tmp_path / "images"
    assert cli("train", tiny_images, "--out", run, "--quiet").rc == 0
    r = cli("evaluate", run, "--ode", "--ode-rtol", 1e-4, "--ode-atol", 1e-4, "--max-examples", 4, "--json", "--quiet").json()
    check_ode_report(r, 4)
    assert r["ode_bound"].startswith("discrete")
    assert r["ode_nll_bits_per_dim"] == pytest.approx(-r["ode_log_likelihood_original_units_bits"] / r["dim"])


def test_a_network_of_integer_steps_only_has_no_ode(cli, trained_run):
    # the tiny run's rbf network at T = 6 has a readout per step (autoconfig), defined at integer steps only
    assert_one_line_error(cli("evaluate", trained_run["run_dir"], "--ode", "--max-examples", 3, "--quiet"), "--ode", "bumps")
