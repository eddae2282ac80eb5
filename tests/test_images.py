"""Images end to end: tiny 8 x 8 train -> evaluate -> sample -> plot in seconds, and the
bits/pixel and 8-bit bits/dim conversions against a hand computation for a model whose
likelihood is known in closed form."""

import json
import math

import numpy as np
import pytest
import torch

from thermodiff.cli import main
from thermodiff.process.bound import exact_bound
from thermodiff.run.config import load_config
from thermodiff.run.experiment import Run, build_diffusion, prepare_dataset
from thermodiff.tasks.evaluation import evaluate


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def test_tiny_images_train_evaluate_sample_plot(tiny_images, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("train", tiny_images, "--out", run, "--quiet", "--device", "cpu") == 0
    capsys.readouterr()
    assert run_cli("evaluate", run, "--quiet", "--json") == 0
    e = json.loads(capsys.readouterr().out)
    assert e["unit"] == "bits/image" and e["n_examples"] == 12 and e["dim"] == 64
    assert e["K_bits_per_pixel"] == pytest.approx(e["K_bits"] / 64)  # one channel: a pixel is a dimension
    assert e["nll_bits_per_dim"] == pytest.approx(-e["K_original_units_bits"] / 64)
    assert run_cli("sample", run, "-n", "5", "--out", tmp_path / "s.npy", "--quiet") == 0
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (5, 1, 8, 8) and samples.dtype == np.uint8
    assert run_cli("sample", run, "-n", "5", "--out", tmp_path / "s.png", "--quiet") == 0
    from PIL import Image

    assert Image.open(tmp_path / "s.png").size == (3 * 9 - 1, 2 * 9 - 1)  # 3 x 2 tiles, 1-pixel gaps
    assert run_cli("plot", run, "--quiet") == 0
    assert (run / "samples.png").stat().st_size > 0 and not (run / "figure1.png").exists()


def test_vector_network_on_images_is_a_one_line_error(tiny_images, tmp_path, capsys):
    assert run_cli("train", tiny_images, "--set", "model.network=mlp", "--out", tmp_path / "r", "--quiet") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "images of shape" in err and "'mlp'" in err


def test_bits_per_pixel_and_per_dim_by_hand(tiny_images, tmp_path):
    """With the zero model the reverse kernels equal the forward ones, so the model's density is
    exactly N(0, I) on the scaled data and K = log N(x; 0, I) on average. In pixel units
    w = v + u - 0.5 that is N(w; 255 m, (255 s)^2) per pixel: compare with a hand computation."""
    cfg = load_config(str(tiny_images))
    dataset, kind = prepare_dataset(cfg)
    diffusion = build_diffusion(cfg, kind, 0.0)
    zero = lambda x, t: torch.zeros(len(x), 2, *x.shape[1:])  # noqa: E731

    x = dataset.to_model(dataset.test, torch.Generator().manual_seed(5))
    u = torch.rand(dataset.test.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).numpy()
    w = dataset.test.astype(np.float64) + u - 0.5  # the same dequantisation, in pixel units
    mean_pixel, std_pixel = 255 * dataset.scaling.shift[0], 255 * dataset.scaling.scale[0]
    log_p = -0.5 * ((w - mean_pixel) / std_pixel) ** 2 - math.log(std_pixel) - 0.5 * math.log(2 * math.pi)
    log_p_bits = log_p.reshape(len(w), -1).sum(1) / math.log(2)

    estimate = exact_bound(diffusion, zero, [x], n_draws=8, generator=torch.Generator().manual_seed(6))
    k_pixel_bits = (estimate.per_example.numpy() + dataset.log_det()) / math.log(2)
    gap = k_pixel_bits - log_p_bits
    assert abs(gap.mean()) < 4 * gap.std(ddof=1) / math.sqrt(len(gap))  # a slip in log 255 or s is 64x larger

    n_pixels = 64
    result = evaluate(Run(tmp_path, cfg, dataset, diffusion, zero, step=0, meta={}), n_draws=1, progress=False)
    assert result["log_det_scaling_bits"] == pytest.approx(-n_pixels * math.log2(std_pixel), rel=1e-12)
    assert result["K_original_units_bits"] == pytest.approx(result["K_bits"] + result["log_det_scaling_bits"])
    assert result["nll_bits_per_dim"] == pytest.approx(-result["K_original_units_bits"] / n_pixels)
    assert result["K_bits_per_pixel"] == pytest.approx(result["K_bits"] / n_pixels)
