"""The bound of models trained by other codebases (tasks/foreign.py, ``evaluate --diffusers``):
tiny diffusers models built and saved here, checked against diffusers' own scheduler and
torch.distributions, computed independently of thermodiff's bound."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from conftest import assert_one_line_error
from thermodiff import eps_model_bound
from thermodiff.errors import UserError
from thermodiff.nets.foreign import ForeignNoiseNet
from thermodiff.tasks.foreign import foreign_process, image_dataset

diffusers = pytest.importorskip("diffusers")

T = 12
SHAPE = (3, 8, 8)


def tiny_unet(out_channels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=out_channels, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def scheduler(**settings):
    return diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=1e-3, beta_end=0.2, **settings)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8)


def minus_one_to_one(v: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32) / 127.5 - 1


def unet_net(unet):
    return lambda x, t: unet(x.float(), t).sample


@pytest.fixture
def saved(tmp_path):
    """A DDPMPipeline saved in tmp_path, and an .npz of 8 x 8 colour test images."""
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=scheduler()).save_pretrained(tmp_path / "pipe")
    np.savez(tmp_path / "images.npz", x=images(5))
    return tmp_path


SETTINGS = [("epsilon", "fixed_small", False), ("sample", "fixed_large", True), ("v_prediction", "fixed_small", True),
            ("epsilon", "learned_range", True), ("v_prediction", "learned_range", False)]


@pytest.mark.parametrize("prediction,variance,clip", SETTINGS)
def test_reverse_kernels_are_diffusers_own(prediction, variance, clip):
    """The reverse kernel's mean and variance at every step t >= 2 (diffusers' t >= 1) are those that
    DDPMScheduler.step samples from (read off its draw with the same noise), so the bound is of
    the model diffusers samples."""
    sch = scheduler(prediction_type=prediction, variance_type=variance, clip_sample=clip, clip_sample_range=0.7)
    unet = tiny_unet(6 if variance == "learned_range" else 3)
    v0 = images(3)
    process = foreign_process(sch.betas.double(), variance, image_dataset(v0, "test"))
    model = ForeignNoiseNet(unet_net(unet), process, prediction, variance == "learned_range")
    process = process.clipped(-0.7, 0.7) if clip else process
    x_t = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1))
    for step in range(1, T):
        with torch.no_grad():
            out = unet(x_t, step).sample
            drawn = sch.step(out, step, x_t, generator=torch.Generator().manual_seed(2)).prev_sample.double()
            mean, var = process.p_mean_var(model, x_t, torch.full((3,), step + 1))
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(2)).double()
        assert torch.allclose(drawn, mean + var.sqrt() * noise, rtol=0, atol=2e-5), step


@pytest.mark.parametrize("prediction,variance,clip", SETTINGS)
def test_kl_terms_match_torch_distributions(prediction, variance, clip):
    """Each term KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) of the report's bound, recomputed with
    torch.distributions from the scheduler's betas (float64): alphas_cumprod, its posterior
    variance, diffusers' x_0 formulas; and the prior term."""
    sch = scheduler(prediction_type=prediction, variance_type=variance)
    unet = tiny_unet(6 if variance == "learned_range" else 3)
    v0 = images(4)
    x0 = minus_one_to_one(v0).double()
    clip_x0 = 0.8 if clip else None
    process = foreign_process(sch.betas.double(), variance, image_dataset(v0, "test"))
    model = ForeignNoiseNet(unet_net(unet), process, prediction, variance == "learned_range")
    process = process.clipped(-clip_x0, clip_x0) if clip else process
    betas = sch.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    for step in (1, 5, T - 1):  # diffusers' 0-based t; thermodiff's t = step + 1 >= 2
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        with torch.no_grad():
            ours = process.reverse_kl(model, x0.float(), torch.full((4,), step + 1), noise=noise)
            x_t = (abar[step].sqrt() * x0 + (1 - abar[step]).sqrt() * noise).float()
            out = unet(x_t, step).sample.double()
        x_t = x_t.double()
        if variance == "learned_range":
            out, frac = out[:, :3], (out[:, 3:] + 1) / 2
        a, s = abar[step].sqrt(), (1 - abar[step]).sqrt()
        x0_hat = {"epsilon": (x_t - s * out) / a, "sample": out, "v_prediction": a * x_t - s * out}[prediction]
        if clip_x0:
            x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
        beta_tilde = (1 - abar[step - 1]) / (1 - abar[step]) * betas[step]
        c0, c = abar[step - 1].sqrt() * betas[step] / (1 - abar[step]), (1 - betas[step]).sqrt() * (1 - abar[step - 1]) / (1 - abar[step])
        var_p = {"fixed_small": beta_tilde, "fixed_large": betas[step]}.get(variance)
        if var_p is None:
            var_p = torch.exp(frac * betas[step].log() + (1 - frac) * beta_tilde.log())
        q = Normal(c0 * x0 + c * x_t, beta_tilde.sqrt())
        p = Normal(c0 * x0_hat + c * x_t, torch.as_tensor(var_p).sqrt())
        expected = kl_divergence(q, p).flatten(1).sum(1)
        assert torch.allclose(ours, expected, rtol=1e-9, atol=1e-9), (step, ours, expected)
    prior = kl_divergence(Normal(abar[-1].sqrt() * x0, (1 - abar[-1]).sqrt()), Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(process.prior_kl(x0.float()), prior, rtol=1e-9, atol=0)


def test_decoder_term_is_the_discretized_gaussian():
    """-log p(x_0|x_1): each pixel's bin [v - 1/2, v + 1/2] / 127.5 - 1 under N(mean, var) (the edge
    bins taking the tails), through torch.distributions.Normal's cdf, at the fixed_small decoder."""
    sch, unet, v0 = scheduler(), tiny_unet(), images(2)
    process = foreign_process(sch.betas.double(), "fixed_small", image_dataset(v0, "test"))
    model = ForeignNoiseNet(unet_net(unet), process, "epsilon", False)
    x0 = minus_one_to_one(v0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ours = process.decoder_log_likelihood(model, x0, noise=noise)
        x_1 = process.q_sample(x0, torch.ones(2, dtype=torch.long), noise=noise)
        mean, var = process.p_mean_var(model, x_1, torch.ones(2, dtype=torch.long))
    normal, v = Normal(mean, var.sqrt()), torch.as_tensor(v0, dtype=torch.float64)
    upper = torch.where(v == 255, torch.ones_like(mean), normal.cdf((v + 0.5) / 127.5 - 1))
    lower = torch.where(v == 0, torch.zeros_like(mean), normal.cdf((v - 0.5) / 127.5 - 1))
    expected = torch.log(upper - lower).flatten(1).sum(1)
    assert torch.allclose(ours, expected, rtol=1e-6, atol=0), (ours, expected)


def test_epsilon_sample_and_v_models_of_one_function_have_one_bound():
    """Three networks that predict eps, x_0 and v of the same eps function: the same bound, term by term."""
    betas = scheduler(beta_schedule="squaredcos_cap_v2").betas.double()
    abar = torch.cumprod(1 - betas, 0)

    def eps(x, t):
        return 0.5 * x + 0.1 * torch.cos(t.double() / 3).reshape(-1, 1, 1, 1)

    def x0(x, t):
        a = abar[t].reshape(-1, 1, 1, 1)
        return (x - (1 - a).sqrt() * eps(x, t)) / a.sqrt()

    def v(x, t):
        a = abar[t].reshape(-1, 1, 1, 1)
        return a.sqrt() * eps(x, t) - (1 - a).sqrt() * x0(x, t)

    x = minus_one_to_one(images(6))
    reports = [eps_model_bound(f, betas, x, prediction_type=p, t_samples=0, clip_x0=0.9)
               for f, p in ((eps, "epsilon"), (x0, "sample"), (v, "v_prediction"))]
    for r in reports[1:]:
        assert r["nll_bits_per_dim"] == pytest.approx(reports[0]["nll_bits_per_dim"], rel=1e-10)
        assert np.allclose(r["per_timestep_bits"], reports[0]["per_timestep_bits"], rtol=1e-9, atol=1e-9)


def test_learned_range_at_its_ends_is_fixed_small_and_fixed_large():
    """v = -1 is beta-tilde (fixed_small), v = +1 beta (fixed_large), at every step, the decoder's
    included; and a variance in between gives another bound."""
    betas, x = scheduler().betas.double(), minus_one_to_one(images(4))

    def learned(v):
        return lambda x_t, t: torch.cat([0.3 * x_t, torch.full_like(x_t, v)], 1)

    def bound(model, variance):
        return eps_model_bound(model, betas, x, variance_type=variance, t_samples=0)["per_timestep_bits"]

    small, large = bound(lambda x_t, t: 0.3 * x_t, "fixed_small"), bound(lambda x_t, t: 0.3 * x_t, "fixed_large")
    assert np.allclose(bound(learned(-1.0), "learned_range"), small, rtol=1e-10)
    assert np.allclose(bound(learned(1.0), "learned_range"), large, rtol=1e-10)
    assert not np.allclose(small[1:T], large[1:T])
    assert not np.allclose(bound(learned(0.0), "learned_range")[1:T], small[1:T])


def test_stratified_estimate_agrees_with_the_sum_over_every_step():
    """The unbiased estimates from at most 3 stratified steps per image (uniform in equal strata, and
    in strata of equal pilot mass) and the exact sum over all T - 1 steps, on the same images: equal
    within their standard errors (4 sigma)."""
    unet, betas = tiny_unet(), scheduler().betas.double()
    x = minus_one_to_one(images(24))
    with torch.no_grad():
        exact = eps_model_bound(unet_net(unet), betas, x, t_samples=0, seed=1)
        assert exact["t_samples"] is None
        for t_sampling in ("uniform", "importance"):
            sampled = eps_model_bound(unet_net(unet), betas, x, t_samples=3, seed=2, t_sampling=t_sampling)
            assert sampled["t_sampling"] == t_sampling and 1 <= sampled["t_samples"] <= 3
            sigma = math.hypot(exact["nll_stderr_bits_per_dim"], sampled["nll_stderr_bits_per_dim"])
            assert abs(exact["nll_bits_per_dim"] - sampled["nll_bits_per_dim"]) < 4 * sigma


def test_cli_evaluates_a_saved_pipeline(cli, saved):
    """--json: one object with the bound, its standard error, T + 1 terms, n and T; the same figure
    as eps_model_bound on the UNet, the scheduler's betas and the same images; and a plain
    unet/ + scheduler/ folder (no model_index.json) loads too."""
    result = cli("evaluate", "--diffusers", saved / "pipe", "--data", saved / "images.npz", "--t-samples", "0", "--json")
    assert result.rc == 0, result
    r = result.json()
    assert (r["n_examples"], r["T"], len(r["per_timestep_bits"])) == (5, T, T + 1)
    assert r["nll_stderr_bits_per_dim"] > 0 and r["clip_x0"] == 1.0 and r["prediction_type"] == "epsilon"
    direct = eps_model_bound(unet_net(diffusers.UNet2DModel.from_pretrained(saved / "pipe" / "unet")),
                             scheduler().betas, minus_one_to_one(images(5)), clip_x0=1.0, t_samples=0)
    assert r["nll_bits_per_dim"] == pytest.approx(direct["nll_bits_per_dim"], rel=1e-6)
    (saved / "pipe" / "model_index.json").unlink()
    again = cli("evaluate", "--diffusers", saved / "pipe", "--data", saved / "images.npz", "--t-samples", "0", "--json")
    assert again.json()["nll_bits_per_dim"] == r["nll_bits_per_dim"]


def test_cli_refuses_bad_folders_in_one_line(cli, saved):
    data = ["--data", saved / "images.npz"]
    assert_one_line_error(cli("evaluate", "--diffusers", saved / "nothing", *data), "no such folder")
    (saved / "no_scheduler" / "unet").mkdir(parents=True)
    (saved / "no_scheduler" / "unet" / "config.json").write_text("{}")
    assert_one_line_error(cli("evaluate", "--diffusers", saved / "no_scheduler", *data), "scheduler_config.json")
    weights = saved / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    assert_one_line_error(cli("evaluate", "--diffusers", saved / "pipe", *data), ".bin", "never loads")
    assert_one_line_error(cli("evaluate", "--diffusers", saved / "pipe"), "--data")


def test_cli_refuses_images_the_unet_does_not_take(cli, saved):
    np.savez(saved / "big.npz", x=np.zeros((2, 3, 16, 16), np.uint8))
    assert_one_line_error(cli("evaluate", "--diffusers", saved / "pipe", "--data", saved / "big.npz"), "3 x 8 x 8")


def test_without_diffusers_the_cli_says_how_to_install_it(cli, saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    assert_one_line_error(cli("evaluate", "--diffusers", saved / "pipe", "--data", saved / "images.npz"),
                          "pip install thermodiff[diffusers]")


def test_images_off_the_8_bit_grid_are_refused():
    with pytest.raises(UserError, match="8-bit images"):
        eps_model_bound(lambda x, t: x, torch.linspace(1e-3, 0.2, T), torch.rand(2, *SHAPE))


def test_help_imports_neither_torch_nor_diffusers():
    code = ("import sys; from thermodiff.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_diffusers_flags_are_refused_for_a_run(cli, tmp_path):
    assert_one_line_error(cli("evaluate", tmp_path, "--data-dir", "somewhere"), "--data-dir", "--diffusers")
    assert_one_line_error(cli("evaluate"), "--diffusers DIR")
