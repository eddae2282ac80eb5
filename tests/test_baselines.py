"""Baselines (baselines.py): a VAE's ELBO and importance-weighted bound against the exact
log-likelihood of a linear-Gaussian model (equal with the exact posterior as encoder, below it
otherwise), its Bernoulli likelihood against torch.distributions; a DAE's shapes and a few
training steps; both through the CLI on vectors and images, on the same splits as a diffusion run."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TOML, assert_one_line_error, write_tiny_config
from torch import nn
from torch.distributions import Bernoulli, MultivariateNormal

from thermodiff.data.images import dead_leaves
from thermodiff.nets.baselines import DAE, VAE, DenoiserNet, VAENet

D, LATENT, NOISE_VAR = 3, 2, 0.3


class LinearGaussian(nn.Module):
    """p(z) = N(0, I), p(x | z) = N(W z + b, s^2 I) with orthogonal columns of W, so that the
    exact posterior N(M^-1 W^T (x - b) / s^2, M^-1), M = I + W^T W / s^2, is diagonal. With
    ``exact`` the encoder is that posterior; otherwise a deliberately wrong one."""

    def __init__(self, exact: bool = True):
        super().__init__()
        torch.manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(D, LATENT, dtype=torch.float64))
        self.W, self.b = q * torch.tensor([2.0, 0.7], dtype=torch.float64), torch.randn(D, dtype=torch.float64)
        self.exact = exact

    def marginal(self) -> MultivariateNormal:
        return MultivariateNormal(self.b, self.W @ self.W.T + NOISE_VAR * torch.eye(D, dtype=torch.float64))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        precision = 1 + (self.W**2).sum(0) / NOISE_VAR  # diagonal of M
        mean = (x - self.b) @ self.W / NOISE_VAR / precision
        if not self.exact:
            mean, precision = 0.5 * mean + 0.3, 3 * precision
        return torch.stack([mean, -torch.log(precision).expand_as(mean)], 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raw_var = math.log(math.expm1(NOISE_VAR))  # softplus(raw) = s^2, with min_var = 0
        return torch.stack([z @ self.W.T + self.b, torch.full((len(z), D), raw_var, dtype=torch.float64)], 1)


def test_vae_bounds_equal_the_exact_log_likelihood_with_the_exact_posterior():
    model, vae = LinearGaussian(exact=True), VAE(LATENT, bernoulli=False, min_var=0.0)
    torch.manual_seed(1)
    x = model.marginal().sample((20,))
    log_p = model.marginal().log_prob(x)
    # log p(x, z) / q(z | x) = log p(x) for every z: the importance-weighted bound is exact draw by draw
    torch.testing.assert_close(vae.importance_weighted_bound(model, x, 8), log_p)
    # the ELBO (its KL in closed form) on average over draws of z
    draws = 20000
    elbo = vae.elbo(model, x.repeat(draws, 1), torch.randn(draws * 20, LATENT, dtype=torch.float64))
    torch.testing.assert_close(elbo.reshape(draws, 20).mean(0), log_p, atol=0.03, rtol=0)


def test_vae_bounds_lie_below_the_exact_log_likelihood_otherwise():
    model, vae = LinearGaussian(exact=False), VAE(LATENT, bernoulli=False, min_var=0.0)
    torch.manual_seed(1)
    x = model.marginal().sample((4000,))
    log_p = float(model.marginal().log_prob(x).mean())
    elbo = vae.elbo(model, x, torch.randn(4000, LATENT, dtype=torch.float64))
    iw = vae.importance_weighted_bound(model, x, 64)
    assert float(elbo.mean()) + 0.1 < float(iw.mean()) < log_p  # ELBO < IWAE_64 < log p(x)


def test_bernoulli_likelihood_against_torch_distributions():
    vae = VAE(LATENT, bernoulli=True, null_p=0.2)
    logits = 8 * torch.randn(30, 1, 20, dtype=torch.float64)
    x = torch.bernoulli(torch.full((30, 20), 0.3, dtype=torch.float64))
    torch.testing.assert_close(vae.log_likelihood(x, logits), Bernoulli(logits=logits[:, 0]).log_prob(x).sum(1))
    torch.testing.assert_close(vae.null_log_likelihood(x), Bernoulli(probs=torch.tensor(0.2)).log_prob(x).sum(1).double())


@pytest.mark.parametrize("shape", [(5,), (1, 4, 4)])
def test_networks_keep_the_example_shape(shape):
    x = torch.randn(7, *shape)
    assert DenoiserNet(shape, 16, 2, "tanh")(x).shape == x.shape
    net = VAENet(shape, 3, 2, 16, 2, "tanh")
    assert net.encode(x).shape == (7, 2, 3) and net.decode(torch.randn(7, 3)).shape == (7, 2, *shape)
    vae = VAE(3, bernoulli=False)
    assert vae.p_sample(net, vae.sample_prior((7, *shape)), 1).shape == x.shape


def few_steps(objective, model, x: torch.Tensor, steps: int = 150) -> tuple[float, float]:
    """The loss on fixed draws before and after ``steps`` Adam steps on fresh ones."""
    fixed = objective.training_draws(x, torch.Generator().manual_seed(0))
    before = float(objective.training_loss(model, x, fixed)[0].detach())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss, _ = objective.training_loss(model, x, objective.training_draws(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, float(objective.training_loss(model, x, fixed)[0].detach())


def test_a_few_training_steps_reduce_the_dae_and_vae_losses():
    torch.manual_seed(0)
    u = torch.randn(256, 1)
    x = torch.cat([u, 2 * u, -u], 1) / 1.5  # data on a line: much to gain from denoising
    dae_before, dae_after = few_steps(DAE(1.0), DenoiserNet((3,), 32, 2, "tanh"), x)
    assert dae_after < 0.7 * dae_before
    vae_before, vae_after = few_steps(VAE(1, bernoulli=False, min_var=1e-3), VAENet((3,), 1, 2, 32, 2, "tanh"), x)
    assert vae_after < vae_before - 1.0


def baseline_toml(kind: str) -> str:
    return TINY_TOML.replace('network = "rbf"', 'network = "mlp"\nlayers = 2') + f'\n[baseline]\nkind = "{kind}"\n'


def test_vae_and_dae_runs_through_the_cli(cli, tmp_path, trained_run):
    vae_run, dae_run = tmp_path / "vae", tmp_path / "dae"
    assert cli("train", write_tiny_config(tmp_path, baseline_toml("vae")), "--out", vae_run, "--quiet").rc == 0
    assert cli("train", write_tiny_config(tmp_path, baseline_toml("dae")), "--out", dae_run, "--quiet").rc == 0
    v = cli("evaluate", vae_run, "--json", "--quiet").json()
    k = cli("evaluate", trained_run["run_dir"], "--json", "--quiet").json()
    assert v["model"] == "vae" and v["n_examples"] == k["n_examples"] and v["unit"] == k["unit"]
    assert v["L_null_bits"] == pytest.approx(k["L_null_bits"])  # the same held-out examples, the same null model
    assert math.isfinite(v["K_bits"]) and math.isfinite(v["K_iw_bits"]) and v["n_importance"] == 64
    assert "ELBO" in cli("evaluate", vae_run, "--quiet").out
    cli("evaluate", vae_run, "--quiet", "--per-example", tmp_path / "v_elbo.npy")
    assert np.load(tmp_path / "v_elbo.npy").mean() == pytest.approx(v["K_original_units_bits"], rel=1e-9)
    assert cli("sample", vae_run, "-n", 6, "--out", tmp_path / "v.npy", "--quiet").rc == 0
    assert np.load(tmp_path / "v.npy").shape == (6, 2)
    assert_one_line_error(cli("denoise", vae_run, "--input", tmp_path / "v.npy", "--sigma", 0.1), "vae baseline")
    d = cli("evaluate", dae_run, "--json", "--quiet").json()
    assert d["model"] == "dae" and d["output_mse"] > 0 and d["noisy_input_mse"] > 0 and "K_bits" not in d
    assert_one_line_error(cli("sample", dae_run, "-n", 2, "--out", tmp_path / "d.npy"), "not a generative model")
    assert_one_line_error(cli("evaluate", dae_run, "--per-example", tmp_path / "d.npy"), "--per-example")
    assert not (tmp_path / "d.npy").exists()
    assert_one_line_error(cli("plot", vae_run), "vae baseline")
    assert_one_line_error(cli("train", write_tiny_config(tmp_path, baseline_toml("gan")), "--out", tmp_path / "g"),
                          "baseline.kind")


def image_baseline_config(folder, kind: str, data: str = "test_fraction = 0.25") -> Path:
    """A config of a ``kind`` baseline on 40 dead-leaves images of 8 x 8 (written into ``folder``), with
    ``data`` lines in its [data] table."""
    np.savez(folder / "images.npz", images=dead_leaves(40, size=8, seed=3)[:, 0])
    config = folder / f"{kind}.toml"
    config.write_text(f'name = "{kind}"\n[data]\nsource = "{folder / "images.npz"}"\n{data}\n'
                      f'[model]\nhidden = 16\n[train]\nsteps = 3\nbatch_size = 8\n[baseline]\nkind = "{kind}"\n')
    return config


def test_baselines_on_images_report_bits_per_dim_and_psnr(cli, tmp_path):
    for kind in ("vae", "dae"):
        assert cli("train", image_baseline_config(tmp_path, kind), "--out", tmp_path / kind, "--quiet").rc == 0
    v = cli("evaluate", tmp_path / "vae", "--json", "--quiet").json()
    assert v["dim"] == 64 and v["nll_bound"] == "dequantized" and math.isfinite(v["nll_bits_per_dim"])
    d = cli("evaluate", tmp_path / "dae", "--json", "--quiet").json()
    assert d["n_examples"] == 10 and d["noisy_input_psnr_db"] < 20 and math.isfinite(d["output_psnr_db"])
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert saved["baseline"]["kind"] == "vae"


def test_a_baseline_with_a_validation_split_is_refused_before_any_work(cli, tmp_path):
    """The validator scores checkpoints by a diffusion's bound, which a baseline has not."""
    for kind in ("vae", "mcgsm"):
        config = image_baseline_config(tmp_path, kind, "val_fraction = 0.2")
        assert_one_line_error(cli("train", config, "--out", tmp_path / kind), "data.val_fraction", kind)
        assert not (tmp_path / kind).exists()
