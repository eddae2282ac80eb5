"""DDIM, Heun and DPM-Solver++(2M) samplers (process/samplers.py): on Gaussian data with the exact
denoiser (closed form) DDIM with eta = 0 maps the prior to the data's distribution and is
deterministic, Heun's and DPM-Solver++(2M)'s errors fall as the square of the step and Euler's
(DDIM, eta = 0) as the step; DDIM with eta = 1
is the ancestral sampler of the respaced chain; and ``thermodiff sample --sampler``."""

import math

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error

from linear_gaussian import analytic_model, true_reverse, wavy_model
from thermodiff import BinomialDiffusion, GaussianDiffusion, ancestral_sample, make_schedule, respace
from thermodiff.process.samplers import CountingModel, Sampler, sample, sample_ddim, sample_dpm_solver_2m, sample_heun
from thermodiff.process.schedules import log_snr_betas
from thermodiff.process.vdm import VDM
from thermodiff.tasks.options import SAMPLERS

MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
ROTATION = torch.tensor([[math.cos(0.5), -math.sin(0.5)], [math.sin(0.5), math.cos(0.5)]], dtype=torch.float64)
EIGENVALUES = torch.tensor([4.0, 0.09], dtype=torch.float64)
COVARIANCE = ROTATION @ torch.diag(EIGENVALUES) @ ROTATION.T


def exact_denoiser(log_abar: torch.Tensor):
    """E[x_0 | x_k] for x_0 ~ N(MEAN, COVARIANCE), x_k = a x_0 + sqrt(1 - a^2) eps, a^2 = abar_k:
    MEAN + a S (a^2 S + (1 - a^2) I)^-1 (x_k - a MEAN), in S's eigenbasis."""
    def denoiser(x: torch.Tensor, k: int) -> torch.Tensor:
        abar = log_abar[k - 1].exp()
        gain = abar.sqrt() * EIGENVALUES / (abar * EIGENVALUES + 1 - abar)
        return MEAN + ((x.double() - abar.sqrt() * MEAN) @ ROTATION * gain) @ ROTATION.T

    return denoiser


def exact_flow(y: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """The probability-flow ODE of these data in y = x / sqrt(abar), sigma = sqrt((1 - abar) / abar),
    solved: y_sigma = MEAN + (S + sigma^2 I)^(1/2) (S + sigma_from^2 I)^(-1/2) (y - MEAN)."""
    gain = ((EIGENVALUES + sigma_to**2) / (EIGENVALUES + sigma_from**2)).sqrt()
    return MEAN + ((y - MEAN) @ ROTATION * gain) @ ROTATION.T


def test_ddim_eta_0_maps_the_prior_to_the_data_and_is_deterministic():
    n = 4000
    log_abar = torch.cumsum(torch.log1p(-torch.as_tensor(log_snr_betas(1000, 1e-4, -14.0))), 0)
    x_K = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state()
    x0 = sample_ddim(exact_denoiser(log_abar), x_K, log_abar, generator)
    assert torch.equal(generator.get_state(), state)  # no noise drawn
    assert torch.equal(sample_ddim(exact_denoiser(log_abar), x_K, log_abar, torch.Generator().manual_seed(2)), x0)
    # the sample mean and covariance against the data's, in units of their standard errors (Gaussian
    # data: Var of a sample covariance entry S_ij is (S_ii S_jj + S_ij^2) / n)
    mean_z = (x0.mean(0) - MEAN) / (COVARIANCE.diagonal() / n).sqrt()
    s = COVARIANCE
    cov_se = ((s.diagonal()[:, None] * s.diagonal()[None, :] + s**2) / n).sqrt()
    cov_z = (torch.cov(x0.T) - COVARIANCE) / cov_se
    assert mean_z.abs().max() < 4 and cov_z.abs().max() < 4, (mean_z, cov_z)


@pytest.mark.parametrize(("parameterization", "sampler"), [("reference", "ddim"), ("paper", "heun")])
def test_the_true_reverse_kernels_of_any_parameterization_give_the_data_through_the_contract(parameterization, sampler):
    """1-D data N(0, s^2) and a network whose kernels are the true reverse ones (linear_gaussian): the
    kernel mean read as x_0 (expected_x0) is E[x_0 | x_t], so the flow maps x_T ~ N(0, 1) to
    N(0, s^2 / v_T), v_T = Var q(x_T) (the flow is linear: x_0 = s / sqrt(v_T) x_T). Heun on a chain
    respaced to 100 of the 1000 steps (its discretisation error is then ~0.3% of the variance, Euler's
    ~0.5% on all 1000, against a standard error of 2.2%)."""
    s, n = 0.5, 4000
    diffusion = GaussianDiffusion(make_schedule("linear", 1000), parameterization)
    betas = diffusion.schedule.betas().numpy()
    v_T = true_reverse(betas, s)[2][-1]
    chain = diffusion if sampler == "ddim" else respace(diffusion, 100)
    x0 = sample(chain, analytic_model(betas, s, parameterization), (n, 1), torch.Generator().manual_seed(0),
                sampler=sampler).double()
    z_mean = float(x0.mean()) / math.sqrt(s * s / v_T / n)
    z_var = (float(x0.var()) - s * s / v_T) / (s * s / v_T * math.sqrt(2 / n))
    assert abs(z_mean) < 4 and abs(z_var) < 4, (z_mean, z_var)


def karras_log_abar(K: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """log abar_k, k = 1..K, of Karras et al.'s noise levels (their Eq. 5), abar = 1 / (1 + sigma^2)."""
    ramp = torch.linspace(0, 1, K, dtype=torch.float64)
    sigma = (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
    return -torch.log1p(sigma**2)


def error_at_sigma_min(sampler, K: int, y_K: torch.Tensor) -> float:
    """RMS distance of the sampler's state at k = 1 (sigma_min) from the exact flow's, from y_K at sigma_max."""
    log_abar = karras_log_abar(K)
    states = {}
    sampler(exact_denoiser(log_abar), y_K * (0.5 * log_abar[-1]).exp(), log_abar,
            callback=lambda k, x: states.setdefault(k, x))
    y_1 = states[1] / (0.5 * log_abar[0]).exp()
    return float(((y_1 - exact_flow(y_K, 80.0, 0.002)) ** 2).sum(1).mean().sqrt())


def euler(denoiser, x: torch.Tensor, log_abar: torch.Tensor, callback) -> None:
    """Euler's method on dy/dsigma = (y - x0_hat) / sigma, written out independently of DDIM."""
    sigma = torch.expm1(-log_abar).sqrt()
    y = x / (0.5 * log_abar[-1]).exp()
    for k in range(len(log_abar), 1, -1):
        y = y + (sigma[k - 2] - sigma[k - 1]) * (y - denoiser(y * (0.5 * log_abar[k - 1]).exp(), k)) / sigma[k - 1]
    callback(1, y * (0.5 * log_abar[0]).exp())


def test_heun_and_dpm_solver_converge_as_the_square_of_the_step_and_euler_as_the_step():
    y_K = MEAN + 80.0 * torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ddim = lambda *a, callback: sample_ddim(*a, callback=callback)  # noqa: E731 (eta = 0)
    counts = [32, 64, 128]
    errors = {name: [error_at_sigma_min(f, K, y_K) for K in counts]
              for name, f in (("euler", euler), ("ddim", ddim), ("heun", sample_heun), ("dpm2m", sample_dpm_solver_2m))}
    np.testing.assert_allclose(errors["ddim"], errors["euler"], rtol=1e-8)  # DDIM at eta 0 is Euler's method
    for name, order in (("euler", 1), ("heun", 2), ("dpm2m", 2)):
        observed = np.log2(np.array(errors[name][:-1]) / errors[name][1:])  # halving the step
        assert np.all(np.abs(observed - order) < 0.2), (name, observed)
    # at equal network calls (Heun: 2 K - 1; DPM-Solver++(2M) and Euler: K) both second-order methods
    # are the more accurate, and DPM-Solver++(2M) the most
    for K, heun_error, dpm_error in zip(counts[:-1], errors["heun"], errors["dpm2m"]):
        assert heun_error < error_at_sigma_min(euler, 2 * K - 1, y_K)
        assert dpm_error < error_at_sigma_min(sample_heun, K // 2, y_K)
    assert np.all(np.array(errors["dpm2m"]) < errors["euler"])


def test_dpm_solver_2m_first_step_is_ddims():
    """With no earlier x0_hat the update is DDIM's: a chain of two steps (one update, then x0_hat(x_1))
    gives DDIM's sample to rounding."""
    log_abar = karras_log_abar(2)
    x_K = torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    np.testing.assert_allclose(sample_dpm_solver_2m(exact_denoiser(log_abar), x_K, log_abar),
                               sample_ddim(exact_denoiser(log_abar), x_K, log_abar), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("process", ["eps", "vdm"])
def test_ddim_eta_1_is_the_ancestral_sampler_of_the_respaced_chain(process):
    base = GaussianDiffusion(make_schedule("cosine", 40), "eps") if process == "eps" else VDM(40, "linear")
    chain = respace(base, 7)
    shape, trajectories = (300, 2), {}
    for name in ("ancestral", "ddim"):
        states, generator = {}, torch.Generator().manual_seed(3)
        x0 = sample(chain, wavy_model, shape, generator, callback=lambda k, x: states.setdefault(k, x.clone()),
                    sampler=name, eta=1.0)
        trajectories[name] = states, x0, generator
    (ancestral, x0_ancestral, _), (ddim, x0_ddim, generator) = trajectories["ancestral"], trajectories["ddim"]
    assert sorted(ddim) == sorted(ancestral) == list(range(8))
    for k in range(7, 0, -1):  # float32 states, kernels equal to ~1e-15 in float64
        torch.testing.assert_close(ddim[k], ancestral[k], rtol=1e-5, atol=1e-5)
    # the last step: the ancestral sampler draws the decoder around the mean that DDIM returns
    mean, var = chain.step_distribution(wavy_model, ancestral[1], 1)
    torch.testing.assert_close(x0_ddim.double(), mean, rtol=1e-5, atol=1e-5)
    z = torch.randn(shape, generator=generator, dtype=torch.float64)  # the ancestral sampler's next draw
    torch.testing.assert_close(x0_ancestral.double(), mean + var.sqrt() * z, rtol=1e-5, atol=1e-5)


def test_network_calls_and_refusals():
    chain = respace(GaussianDiffusion(make_schedule("cosine", 40), "eps", "learned"), 5)
    for sampler, calls in (("ancestral", 5), ("ddim", 5), ("heun", 9), ("dpm2m", 5)):
        model = CountingModel(wavy_model)
        sample(chain, model, (3, 2), torch.Generator().manual_seed(0), sampler=sampler)
        assert model.calls == calls, sampler
    assert SAMPLERS == tuple(s.value for s in Sampler)
    with pytest.raises(ValueError, match="eta"):
        sample(chain, wavy_model, (3, 2), sampler="ddim", eta=1.5)
    binomial = BinomialDiffusion(make_schedule("erase", 5), 0.5)
    with pytest.raises(ValueError, match="Gaussian diffusion"):
        sample(binomial, lambda x, t: torch.zeros(len(x), 1, *x.shape[1:]), (3, 2), sampler="heun")


def test_cli_sample_with_each_sampler(cli, copy_run, tmp_path):
    run = copy_run()
    for i, (sampler, extra) in enumerate((("ancestral", []), ("ddim", ["--eta", "0"]), ("ddim", ["--eta", "0.5"]),
                                          ("heun", []), ("dpm2m", []))):
        path = tmp_path / f"{i}.npy"
        r = cli("sample", run, "-n", "7", "--out", path, "--quiet", "--json", "--sampler", sampler, "--steps", "4", *extra)
        assert r.rc == 0, r
        report = r.json()
        assert report["sampler"] == sampler and report["steps"] == 4 and report["shape"] == [7, 2]
        assert report["eta"] == (float(extra[1]) if extra else None)
        assert np.isfinite(np.load(path)).all()
    # Heun: two calls on each of the 3 steps, 1 decoder's mean, but the tiny run's decoder (the forward
    # step reversed) calls no network: at the end of the last step and after it
    assert cli("sample", run, "-n", "2", "--out", tmp_path / "h.npy", "--quiet", "--json", "--sampler", "heun",
               "--steps", "4").json()["network_calls_per_sample"] == 5
    precisions = [cli("sample", run, "-n", "2", "--out", tmp_path / f"p{i}.npy", "--quiet", "--json", *flags).json()
                  ["precision"] for i, flags in enumerate(([], ["--precision", "bf16"], ["--precision", "fp32"]))]
    assert precisions == ["fp32", "bf16", "fp32"]  # the tiny run trained in fp32
    again = cli("sample", run, "-n", "7", "--out", tmp_path / "again.npy", "--quiet", "--sampler", "ddim", "--steps", "4",
                "--seed", "5")
    assert again.rc == 0 and "ddim, eta 0" in again.out
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy").shape, (7, 2))
    bad = [(["--sampler", "ddim", "--eta", "1.5"], "--eta"), (["--sampler", "ddim", "--eta", "-0.1"], "--eta"),
           (["--sampler", "ddim", "--eta", "x"], "--eta"), (["--sampler", "heun", "--eta", "0.5"], "--eta"),
           (["--sampler", "ddim", "--steps", "9"], "--steps"), (["--sampler", "heun", "--steps", "0"], "--steps"),
           (["--sampler", "ddim", "--steps", "1,3,5"], "--steps"), (["--sampler", "euler"], "--sampler"),
           (["--steps", "3", "--respace", "3"], "--steps"), (["--precision", "fp16"], "--precision")]
    for flags, needle in bad:
        result = cli("sample", run, "-n", "2", "--out", tmp_path / "bad.npy", *flags)
        assert_one_line_error(result, needle)
        assert not (tmp_path / "bad.npy").exists()
