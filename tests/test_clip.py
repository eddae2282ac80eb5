"""Clipping the network's x_0 to the data's range (GaussianDiffusion.clipped, --clip-x0): the
kernels' means move to the posterior mean at the clipped x_0, so an exact network for data inside
the box is left as it is, every example's bound can only rise for data inside the box (each
kernel's KL is c0^2 |x_0 - x0_hat|^2 / 2 var plus terms clipping leaves alone, and clipping moves
x0_hat towards every x_0 in the box), the box is the data's own in model units, and the CLI
bounds and samples the clipped chain. tests/test_diffusers.py checks the clipped kernels against
diffusers' DDPMScheduler.step with clip_sample, draw for draw."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error

from linear_gaussian import wavy_model
from thermodiff import GaussianDiffusion, exact_bound, make_schedule
from thermodiff.data.dataset import Dataset, Lattice, Scaling
from thermodiff.errors import UserError
from thermodiff.process.respace import VarianceFit, respace
from thermodiff.process.samplers import sample
from thermodiff.process.vdm import VDM

POINTS = torch.tensor([[0.1, 0.9], [0.5, 0.2], [0.8, 0.7]], dtype=torch.float64)  # data inside [0, 1]^2


def mixture_eps_model(diffusion: GaussianDiffusion):
    """The exact noise prediction E[eps | x_t] for data spread evenly over :data:`POINTS`:
    (x_t - sqrt(abar_t) E[x_0 | x_t]) / sqrt(1 - abar_t), E[x_0 | x_t] the points weighted by
    their likelihoods N(x_t; sqrt(abar_t) x_0, 1 - abar_t): a convex combination of the points."""
    abar = diffusion.log_alphas_cumprod().exp()

    def model(x, t):
        a, var = abar[t - 1].sqrt()[:, None], (1 - abar[t - 1])[:, None]
        logits = -((x.double()[:, None, :] - a[:, None] * POINTS) ** 2).sum(-1) / (2 * var)
        x0 = torch.softmax(logits, 1) @ POINTS
        return torch.stack([(x.double() - a * x0) / var.sqrt(), torch.zeros_like(x0)], 1)

    return model


def test_clipping_leaves_an_exact_network_alone_inside_the_box_and_clips_outside_it():
    diffusion = GaussianDiffusion(make_schedule("cosine", 20), "eps")
    model = mixture_eps_model(diffusion)
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    for t in (2, 10, 20):
        tt = torch.full((len(x),), t)
        mean, var = diffusion.p_mean_var(model, x, tt)
        same, same_var = diffusion.clipped(0.0, 1.0).p_mean_var(model, x, tt)
        torch.testing.assert_close(same, mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(same_var, var, rtol=0, atol=0)
        narrow = diffusion.clipped(torch.tensor([0.0, 0.0]), torch.tensor([0.6, 1.0], dtype=torch.float64))  # the third point lies outside
        x0 = narrow.x0_from_posterior_mean(narrow.p_mean_var(model, x, tt)[0], x, tt)
        unclipped = diffusion.x0_from_posterior_mean(mean, x, tt)
        torch.testing.assert_close(x0, torch.stack([unclipped[:, 0].clamp(max=0.6), unclipped[:, 1]], 1))
        if t < 20:  # near the data some x_t point at the third point (at t = T every x_0 is near their average)
            assert int((unclipped[:, 0] > 0.6).sum()) > 10


@pytest.mark.parametrize("fitted", [False, True])
def test_clipping_raises_every_examples_bound_for_data_inside_the_box(fitted):
    """wavy_model as a noise prediction implies x_0 far outside [0, 1]^2 at noisy steps; clipped,
    each example's bound is at least the unclipped one (same forward draws), and higher on average
    by more than three standard errors. Also on a respaced chain of fitted variances, fitted on the
    clipped chain's own errors: the fit reads the clipped kernels."""
    diffusion = GaussianDiffusion(make_schedule("cosine", 20), "eps")
    x0 = torch.rand(2000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def chain(process):
        if not fitted:
            return process
        return respace(process, [1, 4, 9, 20], "fitted", VarianceFit(wavy_model, [x0], torch.Generator().manual_seed(3)))

    def bound(process):
        return exact_bound(process, wavy_model, [x0], 1, torch.Generator().manual_seed(4)).per_example

    plain, clipped = bound(chain(diffusion)), bound(chain(diffusion.clipped(0.0, 1.0)))
    gain = clipped - plain
    if not fitted:  # fitted variances differ between the chains, so only the average is ordered
        assert float(gain.min()) > -1e-9
    assert float(gain.mean()) > 3 * float(gain.std()) / math.sqrt(len(gain))


def test_clipped_ddim_samples_end_inside_the_box():
    """DDIM reads the clipped x_0 (expected_x0), so its deterministic last step lands in the box."""
    diffusion = GaussianDiffusion(make_schedule("cosine", 20), "eps", decoder="learned")
    shape, seed = (300, 2), 5
    plain = sample(diffusion, wavy_model, shape, torch.Generator().manual_seed(seed), sampler="ddim")
    clipped = sample(diffusion.clipped(0.0, 1.0), wavy_model, shape, torch.Generator().manual_seed(seed), sampler="ddim")
    assert float(plain.min()) < -0.1 or float(plain.max()) > 1.1  # without the clip it leaves the box
    assert float(clipped.min()) >= -1e-9 and float(clipped.max()) <= 1 + 1e-9


def test_model_bounds_are_the_datas_cells_in_model_units():
    images = np.random.default_rng(0).integers(0, 256, (30, 1, 4, 4), dtype=np.uint8)
    images[0, 0, 0, :2] = (0, 255)
    data = Dataset(images, images[:5], Scaling.fit(images / 255.0, "global"), False, "images.npz", dequantize=True)
    low, high = data.model_bounds()
    unit = data.scaling.invert(torch.stack([low, high]))
    torch.testing.assert_close(unit.flatten(), torch.tensor([-0.5 / 255, 255.5 / 255], dtype=torch.float64))
    x = data.to_model(images, torch.Generator().manual_seed(0)).double()
    assert float(x.min()) >= float(low) and float(x.max()) <= float(high)
    assert float(x.min()) < float(low) + 1.0 / 255 / data.scaling.scale[0]  # the pixels at 0 reach the cell's edge

    vectors = np.array([[0, 10], [2, 30], [4, 20], [0, 10]] * 5, dtype=np.float64)  # steps 2 and 10
    lattice = Lattice.detect(vectors)
    data = Dataset(vectors, vectors[:4], Scaling.fit(vectors, "per_dimension"), False, "v.csv", lattice=lattice)
    low, high = data.model_bounds()
    torch.testing.assert_close(data.scaling.invert(torch.stack([low, high])),
                               torch.tensor([[-1.0, 5.0], [5.0, 35.0]], dtype=torch.float64))
    continuous = Dataset(vectors + 0.5, vectors[:4], Scaling.fit(vectors, "global"), False, "c.csv")
    with pytest.raises(UserError, match="continuous data"):
        continuous.model_bounds()


def test_only_discrete_time_gaussian_chains_clip():
    with pytest.raises(ValueError, match="discrete-time Gaussian"):
        VDM(10, "learned", 1e-4).clipped(0.0, 1.0)


def test_cli_clip_x0(cli, tiny_images, tmp_path, copy_run):
    """evaluate, sample and parzen with --clip-x0: recorded with the box, the run's own
    evaluation.json left alone, samples in the data's range; one-line errors for --ode, for
    continuous vectors and for --diffusers."""
    run = tmp_path / "run"
    assert cli("train", tiny_images, "--out", run, "--quiet", "--device", "cpu").rc == 0
    cli("evaluate", run, "--quiet")
    saved = (run / "evaluation.json").read_text()
    clipped = cli("evaluate", run, "--quiet", "--json", "--clip-x0").json()
    assert clipped["T"] == 6 and "respaced_timesteps" not in clipped and math.isfinite(clipped["K_bits"])
    low, high = clipped["x0_clipped_to"]
    assert low[0] < 0 < high[0]
    assert (run / "evaluation.json").read_text() == saved
    assert "x_0 clipped" in cli("evaluate", run, "--quiet", "--respace", "3", "--clip-x0").out
    out = cli("sample", run, "-n", "6", "--out", tmp_path / "s.npy", "--quiet", "--json", "--steps", "3",
              "--clip-x0").json()
    assert out["x0_clipped_to"] == [low, high] and out["respaced_timesteps"] == [1, 3, 6]
    assert np.load(tmp_path / "s.npy").dtype == np.uint8
    parzen = cli("parzen", run, "--samples", 16, "--valid", 10, "--steps", "3", "--clip-x0", "--quiet", "--json").json()
    assert parzen["x0_clipped_to"] == [low, high] and "clipped" in parzen["protocol"]
    assert parzen["samples_kept"].split(" (")[0].endswith("-clip")
    assert json.loads((run / "parzen.json").read_text())["x0_clipped_to"] == [low, high]
    assert_one_line_error(cli("evaluate", run, "--ode", "--clip-x0"), "--ode", "--clip-x0")
    vectors = copy_run()
    assert_one_line_error(cli("sample", vectors, "-n", "5", "--out", tmp_path / "v.npy", "--clip-x0"),
                          "--clip-x0", "continuous data")
    assert_one_line_error(cli("evaluate", "--diffusers", tmp_path, "--data", "mnist", "--clip-x0"), "--clip-x0")
