"""Posterior sampling by multiplying every reverse kernel by a factor r (paper section 4)."""

import math

import pytest
import torch

from linear_gaussian import analytic_model
from thermodiff.errors import UserError
from thermodiff.process.binomial import BinomialDiffusion
from thermodiff.process.gaussian import GaussianDiffusion
from thermodiff.process.posterior import Clamp, GaussianObservation, Product, SmoothFactor
from thermodiff.process.sampling import ancestral_sample
from thermodiff.process.schedules import make_schedule


def zero_model(k: int):
    return lambda x, t: torch.zeros(len(x), k, *x.shape[1:])


def test_gaussian_observation_matches_the_closed_form_of_the_perturbed_chain():
    """With the zero model every kernel is N(a_t x, b_t); times N(y; x, s^2) it stays linear-
    Gaussian, so the distribution of x_0 follows from a two-number recursion written here."""
    T, y, noise_var = 12, 1.5, 0.5
    diffusion = GaussianDiffusion(make_schedule("reference", T))
    betas = diffusion.schedule.betas().tolist()
    mean, var = 0.0, 1.0  # x_T ~ N(0, 1)
    for t in range(T, 0, -1):
        b = betas[t - 1]
        a = math.sqrt(1 - b)
        v = 1 / (1 / b + 1 / noise_var)
        mean, var = v * (a * mean / b + y / noise_var), (v * a / b) ** 2 * var + v
    n = 40000
    x = ancestral_sample(diffusion, zero_model(2), (n, 1), torch.Generator().manual_seed(0),
                         factor=GaussianObservation(torch.tensor(y), noise_var)).double()
    se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / (n - 1))
    assert abs(float(x.mean()) - mean) < 4 * se_mean
    assert abs(float(x.var()) - var) < 4 * se_var


def test_gaussian_observation_is_the_product_of_gaussians():
    mean, var = torch.tensor([0.3, -1.0]), torch.tensor([0.2, 0.5])
    y, s2 = torch.tensor([1.0, 2.0]), 0.25
    new_mean, new_var = GaussianObservation(y, s2, mask=torch.tensor([True, False])).gaussian(mean, var, 3, None)
    # by hand, observed entry: precision-weighted average; unobserved entry unchanged
    assert new_var[0].item() == pytest.approx(1 / (1 / 0.2 + 1 / 0.25))
    assert new_mean[0].item() == pytest.approx(new_var[0].item() * (0.3 / 0.2 + 1.0 / 0.25))
    assert (new_mean[1].item(), new_var[1].item()) == (pytest.approx(-1.0), pytest.approx(0.5))


def test_smooth_factor_shifts_the_mean_by_sigma_grad_log_r():
    y, s2 = torch.tensor([0.7, -0.2]), 0.3
    mean, var = torch.tensor([0.1, 0.4], dtype=torch.float64), torch.tensor([1e-3, 2e-3], dtype=torch.float64)
    new_mean, new_var = SmoothFactor(lambda x: -((x - y) ** 2) / (2 * s2)).gaussian(mean, var, 5, None)
    torch.testing.assert_close(new_mean, mean + var * (y.double() - mean) / s2)
    torch.testing.assert_close(new_var, var)


@pytest.mark.parametrize("kind", ["gaussian", "binomial"])
def test_clamped_values_are_exactly_preserved(kind):
    T, n, d = 8, 500, 6
    mask = torch.tensor([True, False, True, False, False, True])
    if kind == "gaussian":
        diffusion, model = GaussianDiffusion(make_schedule("reference", T)), zero_model(2)
        values = torch.tensor([0.5, 0.0, -1.25, 0.0, 0.0, 2.0])
    else:
        diffusion, model = BinomialDiffusion(make_schedule("erase", T), 0.3), zero_model(1)
        values = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    states = []
    x = ancestral_sample(diffusion, model, (n, d), torch.Generator().manual_seed(1), factor=Clamp(values, mask),
                         callback=lambda t, x: states.append(x.clone()) if t < T else None)
    for state in [*states, x]:  # every state after the first step, and the output
        assert torch.equal(state[:, mask], values[mask].expand(n, -1).to(state.dtype))
    assert x[:, ~mask].std() > 0.1  # the free entries are still sampled


def test_clamp_and_observation_compose_and_bad_factors_are_refused():
    mask = torch.tensor([True, False])
    both = Product(Clamp(torch.tensor([1.0, 0.0]), mask), GaussianObservation(torch.tensor([0.0, 3.0]), 1e-6, ~mask))
    mean, var = both.gaussian(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), 1, None)
    assert mean[0].item() == 1.0 and var[0].item() == 0.0 and mean[1].item() == pytest.approx(3.0, rel=1e-5)
    with pytest.raises(UserError, match="no known"):
        Clamp(torch.zeros(3), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(UserError, match="positive"):
        GaussianObservation(torch.zeros(2), 0.0)
    with pytest.raises(UserError, match="Gaussian diffusion"):
        GaussianObservation(torch.zeros(2), 1.0).bernoulli(torch.full((2,), 0.5), 1, None)


# --------------------------------------------------------------------------- the CLI commands

def _cli(*args) -> int:
    from thermodiff.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny Swiss roll run and a tiny binary run (binomial diffusion)."""
    import numpy as np

    root = tmp_path_factory.mktemp("posterior_runs")
    bits = (np.random.default_rng(0).random((300, 10)) < 0.3).astype(float)
    np.save(root / "bits.npy", bits)
    common = ["--steps", "3", "--T", "5", "--quiet"]
    assert _cli("train", "swissroll_paper", "--set", "data.n=300", "--out", root / "roll", *common) == 0
    assert _cli("train", "vectors", "--data", root / "bits.npy", "--out", root / "bits", *common) == 0
    return root


def test_denoise_and_inpaint_commands(tiny_runs, tmp_path):
    import numpy as np

    np.save(tmp_path / "noisy.npy", np.array([[1.0, -2.0], [3.0, 0.5]]))
    for method in ("start", "product"):
        assert _cli("denoise", tiny_runs / "roll", "--input", tmp_path / "noisy.npy", "--sigma", "0.5", "-n", "3",
                    "--method", method, "--out", tmp_path / f"{method}.npz", "--quiet") == 0
        d = np.load(tmp_path / f"{method}.npz")
        assert d["samples"].shape == (3, 2, 2) and np.allclose(d["samples_mean"], d["samples"].mean(0))
        assert d["mean"].shape == (2, 2) and np.isfinite(d["mean"]).all()
    from thermodiff.run.experiment import load_run
    from thermodiff.tasks.conditioning import denoise_mean

    expected = denoise_mean(load_run(tiny_runs / "roll"), np.load(tmp_path / "noisy.npy"), 0.5, seed=0)
    assert np.allclose(np.load(tmp_path / "start.npz")["mean"], expected)  # start writes the one-call E[x | y]

    row = np.array([1, 0, 0, 1, 0, 0, 1, 0, 0, 1], dtype=float)
    mask = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=float)
    np.save(tmp_path / "row.npy", row)
    np.save(tmp_path / "mask.npy", mask)
    assert _cli("inpaint", tiny_runs / "bits", "--input", tmp_path / "row.npy", "--mask", tmp_path / "mask.npy",
                "-n", "5", "--out", tmp_path / "i.npz", "--quiet") == 0
    samples = np.load(tmp_path / "i.npz")["samples"]
    assert samples.shape == (5, 1, 10) and (samples[..., :4] == row[:4]).all()  # known bits kept exactly
    assert np.isin(samples, (0, 1)).all()


@pytest.mark.parametrize("case, needle", [
    ("wrong_mask_shape", "does not match"), ("empty_mask", "no known"), ("non_binary_known", "0 or 1"),
    ("full_mask", "nothing to fill"), ("other_data", "does not fit"), ("binomial_denoise", "binomial"),
    ("bad_sigma", "positive"), ("huge_sigma", "use --method product")])
def test_posterior_commands_refuse_bad_input(tiny_runs, tmp_path, capsys, case, needle):
    import numpy as np

    row = np.zeros(10)
    np.save(tmp_path / "row.npy", row)
    masks = {"wrong_mask_shape": np.ones(7), "empty_mask": np.zeros(10), "full_mask": np.ones(10)}
    np.save(tmp_path / "mask.npy", masks.get(case, np.r_[np.ones(3), np.zeros(7)]))
    if case == "non_binary_known":
        np.save(tmp_path / "row.npy", np.full(10, 0.5))
    if case == "other_data":
        np.save(tmp_path / "row.npy", np.zeros(3))
    if case in ("binomial_denoise", "bad_sigma", "huge_sigma"):
        run = tiny_runs / ("bits" if case == "binomial_denoise" else "roll")
        np.save(tmp_path / "row.npy", np.zeros(10 if case == "binomial_denoise" else 2))
        sigma = {"binomial_denoise": "1", "bad_sigma": "0", "huge_sigma": "1e9"}[case]
        args = ["denoise", run, "--input", tmp_path / "row.npy", "--sigma", sigma]
    else:
        args = ["inpaint", tiny_runs / "bits", "--input", tmp_path / "row.npy", "--mask", tmp_path / "mask.npy"]
    capsys.readouterr()
    assert _cli(*args, "--out", tmp_path / "o.npz", "--quiet") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "o.npz").exists()


def test_forward_clamp_follows_the_forward_posterior_and_ends_exactly():
    T = 10
    diffusion = GaussianDiffusion(make_schedule("reference", T))
    values, mask = torch.tensor([0.8, 0.0]), torch.tensor([True, False])
    clamp = Clamp(values, mask, forward=diffusion)
    x_t = torch.tensor([[0.3, -0.4]])
    t = 6
    b = diffusion.schedule.betas()
    abar = torch.cumprod(1 - b, 0)
    bt, a_t, a_prev = b[t - 1], abar[t - 1], abar[t - 2]
    # DDPM's form of q(x_{t-1} | x_t, x_0), written independently of the library's
    expected_mean = a_prev.sqrt() * bt / (1 - a_t) * 0.8 + (1 - bt).sqrt() * (1 - a_prev) / (1 - a_t) * 0.3
    expected_var = bt * (1 - a_prev) / (1 - a_t)
    mean, var = clamp.gaussian(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64), t, x_t)
    assert mean[0, 0].item() == pytest.approx(expected_mean.item()) and var[0, 0].item() == pytest.approx(expected_var.item())
    assert (mean[0, 1].item(), var[0, 1].item()) == (0.0, 1.0)  # unknown entries untouched
    mean, var = clamp.gaussian(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64), 1, x_t)
    assert (mean[0, 0].item(), var[0, 0].item()) == (pytest.approx(0.8), 0.0)  # the last step lands on the value
    x = ancestral_sample(diffusion, zero_model(2), (200, 2), torch.Generator().manual_seed(2), factor=clamp)
    assert torch.equal(x[:, 0], torch.full((200,), 0.8))

    bits = BinomialDiffusion(make_schedule("erase", T), 0.3)
    clamp = Clamp(torch.tensor([1.0, 0.0]), mask, forward=bits)
    x = ancestral_sample(bits, zero_model(1), (200, 2), torch.Generator().manual_seed(3), factor=clamp)
    assert torch.equal(x[:, 0], torch.ones(200))


@pytest.mark.parametrize("on_grid", [True, False])
def test_denoising_from_the_matching_step_samples_the_exact_posterior(on_grid):
    """Gaussian data N(0, s^2) and the true reverse kernels: starting the chain from the
    observation y = x_0 + N(0, sigma^2) at the step whose noise level rho_t reaches sigma^2
    samples p(x_0 | y) = N(s^2 y / (s^2 + sigma^2), s^2 sigma^2 / (s^2 + sigma^2)) exactly when
    sigma^2 = rho_t, and the posterior given y plus the gap's extra noise otherwise."""
    T, s, y = 20, 0.7, 1.3
    diffusion = GaussianDiffusion(make_schedule("reference", T), decoder="learned")
    abar = diffusion.log_alphas_cumprod().exp()
    rho = ((1 - abar) / abar).tolist()
    noise_var = rho[7] if on_grid else 0.5 * (rho[6] + rho[7])
    n = 40000
    t, x_t = diffusion.diffuse_observation(torch.full((n, 1), y, dtype=torch.float64), noise_var,
                                           torch.Generator().manual_seed(0))
    assert t == 8
    x = ancestral_sample(diffusion, analytic_model(diffusion.schedule.betas().tolist(), s, "reference"), (n, 1),
                         torch.Generator().manual_seed(1), start=(t, x_t)).double()
    level = rho[7]  # the observation as seen from step 8, extra noise included
    mean, var = s * s * y / (s * s + level), s * s * level / (s * s + level)
    extra = (level - noise_var) * (s * s / (s * s + level)) ** 2  # spread of the mean over the extra noise
    assert abs(float(x.mean()) - mean) < 4 * math.sqrt((var + extra) / n)
    assert abs(float(x.var()) - (var + extra)) < 4 * (var + extra) * math.sqrt(2 / (n - 1))


def test_observation_noisier_than_the_chain_is_refused():
    diffusion = GaussianDiffusion(make_schedule("reference", 10))
    with pytest.raises(ValueError, match="exceeds"):
        diffusion.diffuse_observation(torch.zeros(2, 1), 1e6)


def test_expected_x0_of_the_true_reverse_kernels_is_the_closed_form_posterior_mean():
    """Data N(0, s^2): E[x_0 | x_t] = sqrt(abar) s^2 x_t / (abar s^2 + 1 - abar)."""
    T, s = 15, 0.8
    diffusion = GaussianDiffusion(make_schedule("reference", T), decoder="learned")
    model = analytic_model(diffusion.schedule.betas().tolist(), s, "reference")
    x_t = torch.linspace(-2, 2, 7, dtype=torch.float64)[:, None]
    abar = diffusion.log_alphas_cumprod().exp()
    for t in (2, 8, T):
        a = float(abar[t - 1])
        expected = math.sqrt(a) * s * s * x_t / (a * s * s + 1 - a)
        assert torch.allclose(diffusion.expected_x0(model, x_t, t), expected, rtol=1e-9, atol=1e-12)
