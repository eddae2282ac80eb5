"""The MCGSM baseline (nets/mcgsm.py) against independent computations: its neighbourhoods
against a loop over pixels, each conditional against torch.distributions' mixture and a quadrature
of its density, the whole image's likelihood and samples of a one-component model against the
Gaussian they form (torch.distributions' MultivariateNormal; the sample covariance within its
error bars), and the model through the CLI beside a diffusion run of the same data."""

import math

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, load_benchmark
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal, Normal

from thermodiff.data.images import dead_leaves
from thermodiff.nets.mcgsm import MCGSM, MCGSMNet, causal_size


def random_net(radius: int, components: int, scales: int, features: int, shape=(1, 4, 5), seed: int = 0) -> MCGSMNet:
    """An MCGSM with every parameter drawn at random (not the initialisation's special values)."""
    torch.manual_seed(seed)
    net = MCGSMNet(shape, radius, components, scales, features).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return net


def test_neighbourhoods_are_the_causal_pixels_before_each_pixel_zero_outside():
    net = random_net(2, 1, 1, 1, shape=(1, 5, 6))
    images = torch.randn(3, 1, 5, 6, dtype=torch.float64)
    found = net.neighbourhoods(images)
    offsets = [(di, dj) for di in (-2, -1) for dj in range(-2, 3)] + [(0, -2), (0, -1)]  # raster order
    assert found.shape == (3, 30, causal_size(2)) and len(offsets) == causal_size(2)
    for i in range(5):
        for j in range(6):
            expected = [images[:, 0, i + di, j + dj] if 0 <= i + di and 0 <= j + dj < 6 else torch.zeros(3)
                        for di, dj in offsets]
            assert torch.equal(found[:, i * 6 + j], torch.stack(expected, 1).double())


def test_each_conditional_is_the_mixture_that_torch_distributions_computes():
    net, mcgsm = random_net(1, 3, 2, 4), MCGSM()
    x, y = torch.randn(50, causal_size(1), dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    log_gate, means, log_precision = net.conditional(x)
    mixture = MixtureSameFamily(Categorical(logits=log_gate.flatten(1)),
                                Normal(means.repeat_interleave(2, 1), (-0.5 * log_precision).exp().flatten()))
    assert torch.allclose(mcgsm.pixel_log_prob(net, x, y), mixture.log_prob(y), atol=1e-12)


def test_each_conditional_integrates_to_one():
    net, mcgsm = random_net(1, 3, 2, 4), MCGSM()
    grid = torch.linspace(-60, 60, 400_001, dtype=torch.float64)
    for x in torch.randn(3, causal_size(1), dtype=torch.float64):
        with torch.no_grad():
            density = mcgsm.pixel_log_prob(net, x.expand(len(grid), -1), grid).exp()
        assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-6)


def one_component_model(radius: int, height: int, width: int) -> tuple[MCGSMNet, torch.Tensor]:
    """A one-component, one-scale MCGSM, y_k = a . x_k + e_k with e_k ~ N(0, s^2): a linear Gaussian
    autoregression, so the image is Gaussian with covariance s^2 (I - A)^-1 (I - A)^-T, A the
    strictly lower triangular matrix of the predictors over the raster order. Returns the net and
    that covariance, built from the offsets by a loop (not from the net's neighbourhoods)."""
    net = random_net(radius, 1, 1, 2, shape=(1, height, width), seed=1)
    with torch.no_grad():
        net.predictors.copy_(0.3 * torch.randn_like(net.predictors))
    n = height * width
    offsets = [(di, dj) for di in range(-radius, 0) for dj in range(-radius, radius + 1)] + [(0, -d) for d in
                                                                                             range(radius, 0, -1)]
    a = torch.zeros(n, n, dtype=torch.float64)
    for i in range(height):
        for j in range(width):
            for (di, dj), w in zip(offsets, net.predictors[:, 0].detach()):
                if 0 <= i + di and 0 <= j + dj < width:
                    a[i * width + j, (i + di) * width + j + dj] = w
    variance = float((-(net.log_scales + net.log_precisions[:, None])).exp().detach())
    inverse = torch.linalg.inv(torch.eye(n, dtype=torch.float64) - a)
    return net, variance * inverse @ inverse.T


def test_a_one_component_model_is_the_gaussian_its_autoregression_forms():
    net, covariance = one_component_model(2, 4, 5)
    images = torch.randn(20, 1, 4, 5, dtype=torch.float64)
    gaussian = MultivariateNormal(torch.zeros(20, dtype=torch.float64), covariance)
    assert torch.allclose(MCGSM().log_likelihood(net, images), gaussian.log_prob(images.flatten(1)), atol=1e-9)


def test_samples_of_a_one_component_model_have_its_covariance():
    net, covariance = one_component_model(1, 3, 3)
    mcgsm, generator = MCGSM(), torch.Generator().manual_seed(0)
    noise = mcgsm.sample_prior((20000, 1, 3, 3), generator).double()
    x = mcgsm.p_sample(net, noise, 1, generator).flatten(1)
    products = x[:, :, None] * x[:, None, :]
    stderr = products.std(0) / math.sqrt(len(x))
    assert torch.all((products.mean(0) - covariance).abs() < 5 * stderr)  # 81 entries at 5 standard errors
    assert torch.all(x.mean(0).abs() < 5 * x.std(0) / math.sqrt(len(x)))


def test_samples_follow_the_mixture_gate():
    """A first pixel (no neighbours: x = 0) is drawn from the mixture of the gate's priors: its
    distribution function at a few points against the mixture's, within the binomial error."""
    net, mcgsm = random_net(1, 3, 2, 2, shape=(1, 1, 1)), MCGSM()
    generator = torch.Generator().manual_seed(0)
    y = mcgsm.p_sample(net, mcgsm.sample_prior((40000, 1, 1, 1), generator).double(), 1, generator).flatten()
    log_gate, means, log_precision = net.conditional(torch.zeros(1, causal_size(1), dtype=torch.float64))
    mixture = MixtureSameFamily(Categorical(logits=log_gate.flatten()),
                                Normal(means[0].repeat_interleave(2), (-0.5 * log_precision).exp().flatten()))
    for point in torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64):
        expected = float(mixture.cdf(point).detach())
        assert float((y <= point).double().mean()) == pytest.approx(expected, abs=5 * math.sqrt(expected * (1 - expected) / len(y)))


def test_training_raises_the_likelihood():
    images = torch.from_numpy(dead_leaves(64, size=8, seed=0)).double() / 255
    images = (images - images.mean()) / images.std()
    net, mcgsm = MCGSMNet((1, 8, 8), 1, 2, 2, 4).double(), MCGSM()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = float(mcgsm.log_likelihood(net, images).mean().detach())
    for _ in range(30):
        optimizer.zero_grad()
        mcgsm.training_loss(net, images, mcgsm.training_draws(images))[0].backward()
        optimizer.step()
    assert float(mcgsm.log_likelihood(net, images).mean().detach()) > before + 10  # nats per image


MCGSM_TOML = """name = "{name}"
seed = 1
[data]
source = "{source}"
test_fraction = 0.25
[train]
steps = 5
batch_size = 8
[baseline]
kind = "mcgsm"
radius = 1
components = 2
scales = 2
features = 3
"""


def test_mcgsm_runs_through_the_cli_in_the_units_of_a_diffusion_run(cli, tmp_path, tiny_images):
    config = tmp_path / "mcgsm.toml"  # on the data of the tiny_images config, which the fixture wrote beside it
    config.write_text(MCGSM_TOML.format(name="mcgsm", source=tiny_images.parent / "images.npz"))
    assert cli("train", config, "--out", tmp_path / "m", "--quiet").rc == 0
    assert cli("train", tiny_images, "--out", tmp_path / "d", "--quiet").rc == 0
    m = cli("evaluate", tmp_path / "m", "--json", "--quiet").json()
    d = cli("evaluate", tmp_path / "d", "--json", "--quiet").json()
    assert m["model"] == "mcgsm" and m["likelihood"] == "exact (autoregressive)"
    assert m["n_examples"] == d["n_examples"] == 12 and m["dim"] == d["dim"] == 64
    assert m["L_null_bits"] == pytest.approx(d["L_null_bits"], rel=1e-12)  # the same images, the same dequantisation
    assert m["nll_bound"] == "dequantized" and math.isfinite(m["nll_bits_per_dim"])
    assert "exact" in cli("evaluate", tmp_path / "m", "--quiet").out
    per = cli("evaluate", tmp_path / "m", "--json", "--quiet", "--per-example", tmp_path / "m.npy").json()
    assert np.load(tmp_path / "m.npy").mean() == pytest.approx(per["K_original_units_bits"], rel=1e-9)
    assert cli("sample", tmp_path / "m", "-n", 3, "--out", tmp_path / "s.npy", "--quiet").rc == 0
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (3, 1, 8, 8) and samples.dtype == np.uint8
    paired = load_benchmark("paired")  # benchmarks/paired.py: the diffusion run and the MCGSM, image by image
    (m_eval, m_k, _), (d_eval, d_k, _) = (paired.evaluate(tmp_path / name, 12, "importance") for name in "md")
    paired.same_images(d_eval, m_eval, tmp_path / "m")
    diff = paired.paired(m_k, d_k, d_eval["pixels"])
    assert d_eval["pixels"] == 64 and diff["images"] == 12
    assert diff["K_difference_bits_per_pixel"] == pytest.approx(m_eval["K_bits_per_pixel"] - d_eval["K_bits_per_pixel"])
    assert_one_line_error(cli("denoise", tmp_path / "m", "--input", tmp_path / "s.npy", "--sigma", 10, "--quiet"),
                          "mcgsm baseline")
    np.save(tmp_path / "mask.npy", np.ones((1, 8, 8)) * (np.arange(8) < 4)[:, None])
    assert_one_line_error(cli("inpaint", tmp_path / "m", "--input", tmp_path / "s.npy", "--mask", tmp_path / "mask.npy",
                              "--quiet"), "mcgsm baseline")


def test_mcgsm_refuses_colour_and_binary_data(cli, tmp_path):
    rng = np.random.default_rng(0)
    for name, images in (("colour", rng.integers(0, 256, (20, 3, 4, 4), dtype=np.uint8)),
                         ("binary", rng.integers(0, 2, (20, 16)).astype(np.float64))):
        np.save(tmp_path / f"{name}.npy", images)
        config = tmp_path / f"{name}.toml"
        config.write_text(MCGSM_TOML.format(name=name, source=tmp_path / f"{name}.npy"))
        message = "grey images" if name == "colour" else "binary"
        assert_one_line_error(cli("train", config, "--out", tmp_path / name), message)
        assert not (tmp_path / name).exists()
