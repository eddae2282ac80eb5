"""The Parzen-window protocol (paper Table 2): the estimator against brute force and the closed
form, bandwidth selection where the right bandwidth is known, batching, bad input, and the
``parzen`` command on a tiny image run (and its refusal of a vector run)."""

import errno
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error

from thermodiff.data.images import dead_leaves
from thermodiff.tasks.evaluation import ChainSpec
from thermodiff.tasks.parzen import DEFAULT_SIGMAS, parzen_log_likelihood, select_bandwidth


def brute_force(test: np.ndarray, samples: np.ndarray, sigma: float) -> np.ndarray:
    """log (1/N) sum_j prod_d N(x_d; s_jd, sigma^2), every (i, j, d) term materialised."""
    diff = test[:, None, :] - samples[None, :, :]
    log_k = (-0.5 * diff**2 / sigma**2 - 0.5 * np.log(2 * np.pi * sigma**2)).sum(2)
    peak = log_k.max(1, keepdims=True)
    return (peak + np.log(np.exp(log_k - peak).mean(1, keepdims=True)))[:, 0]


def test_matches_brute_force():
    rng = np.random.default_rng(0)
    test, samples = rng.random((7, 5)), rng.random((11, 5))
    for sigma in (0.05, 0.3, 2.0):  # 0.05: the kernels underflow without logsumexp's shift
        got = parzen_log_likelihood(torch.tensor(test), torch.tensor(samples), sigma)
        assert got.dtype == torch.float64 and got.shape == (7,)
        np.testing.assert_allclose(got.numpy(), brute_force(test, samples, sigma), rtol=1e-10, atol=1e-9)


def test_single_sample_is_the_gaussian_density():
    rng = np.random.default_rng(1)
    test, point, sigma = rng.random((6, 4)), rng.random((1, 4)), 0.2
    expected = -((test - point) ** 2).sum(1) / (2 * sigma**2) - 2 * math.log(2 * math.pi * sigma**2)  # D/2 = 2
    got = parzen_log_likelihood(torch.tensor(test), torch.tensor(point), sigma)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_batching_does_not_change_the_result():
    gen = torch.Generator().manual_seed(2)
    test, samples = torch.rand(23, 6, generator=gen), torch.rand(17, 6, generator=gen)
    full = parzen_log_likelihood(test, samples, 0.25, batch_size=1000)
    for batch_size in (1, 4, 23):
        torch.testing.assert_close(parzen_log_likelihood(test, samples, 0.25, batch_size), full, rtol=1e-12, atol=1e-12)


def test_bandwidth_recovers_the_true_window():
    """Validation points drawn from a Parzen window of width sigma0 around far-apart samples:
    the true density is the estimator at sigma0, so maximum likelihood picks sigma0 from the grid
    (its relative error, about 1/sqrt(2 M D) = 1.1%, is far below the grid's 29% spacing)."""
    rng = np.random.default_rng(3)
    sigma0, dim = DEFAULT_SIGMAS[4], 4
    samples = 100.0 * rng.standard_normal((5, dim))
    valid = samples[rng.integers(0, 5, 1000)] + sigma0 * rng.standard_normal((1000, dim))
    best, scores = select_bandwidth(torch.tensor(valid), torch.tensor(samples), DEFAULT_SIGMAS)
    assert best == DEFAULT_SIGMAS[4]
    brute = [brute_force(valid, samples, s).mean() for s in DEFAULT_SIGMAS]
    np.testing.assert_allclose(scores.numpy(), brute, rtol=1e-10)
    assert int(np.argmax(brute)) == 4


@pytest.mark.parametrize("test_shape, samples_shape, sigma", [((3, 4), (5, 3), 0.1), ((4,), (5, 4), 0.1),
                                                              ((3, 4), (0, 4), 0.1), ((3, 4), (5, 4), 0.0),
                                                              ((3, 4), (5, 4), float("nan"))])
def test_bad_input_raises(test_shape, samples_shape, sigma):
    with pytest.raises(ValueError):
        parzen_log_likelihood(torch.zeros(test_shape), torch.zeros(samples_shape), sigma)


def test_empty_bandwidth_grid_raises():
    with pytest.raises(ValueError):
        select_bandwidth(torch.zeros(3, 4), torch.zeros(5, 4), [])


TINY_IMAGE_RUN = """
name = "tiny_parzen"
seed = 0
[data]
source = "{source}"
test_fraction = 0.25
[diffusion]
T = 5
[model]
network = "conv"
preset = "small"
[train]
steps = 2
batch_size = 8
"""


def test_parzen_cli(cli, tmp_path):
    np.savez(tmp_path / "leaves.npz", images=dead_leaves(40, size=8))
    config = tmp_path / "tiny_parzen.toml"
    config.write_text(TINY_IMAGE_RUN.format(source=tmp_path / "leaves.npz"))
    run = tmp_path / "run"
    assert cli("train", config, "--out", run, "--quiet", "--device", "cpu").rc == 0
    r = cli("parzen", run, "--samples", 50, "--valid", 10, "--json", "--quiet")
    assert r.rc == 0, r
    result = r.json()
    assert {"parzen_bits", "parzen_stderr_bits", "parzen_nats", "sigma", "sigmas_scores", "n_samples", "n_valid",
            "n_test", "protocol", "samples_kept"} <= set(result)
    assert math.isfinite(result["parzen_bits"]) and math.isfinite(result["parzen_stderr_bits"])
    assert result["parzen_bits"] == pytest.approx(result["parzen_nats"] / math.log(2))
    assert (result["n_samples"], result["n_valid"], result["n_test"]) == (50, 10, 10)  # 40 images, 25% test
    assert result["sigma"] in DEFAULT_SIGMAS and len(result["sigmas_scores"]) == len(DEFAULT_SIGMAS)
    assert json.loads((run / "parzen.json").read_text()) == result
    assert_one_line_error(cli("parzen", run, "--samples", 5, "--valid", 31, "--quiet"), "1..30")
    again = cli("parzen", run, "--samples", 50, "--valid", 10, "--json", "--quiet").json()
    assert "batches reused" in again["samples_kept"] and again["parzen_bits"] == result["parzen_bits"]
    assert result["sampling_steps"] == result["T"]

    respaced = cli("parzen", run, "--samples", 20, "--valid", 10, "--steps", 3, "--json", "--quiet")
    assert respaced.rc == 0, respaced
    assert respaced.json()["sampling_steps"] == 3 and "3 steps of the run's" in respaced.json()["protocol"]
    assert_one_line_error(cli("parzen", run, "--samples", 5, "--valid", 10, "--steps", 0, "--quiet"), "--steps")
    solver = cli("parzen", run, "--samples", 20, "--valid", 10, "--steps", 3, "--sampler", "dpm2m", "--json", "--quiet")
    assert solver.rc == 0, solver
    assert solver.json()["sampler"] == "dpm2m" and "20 dpm2m samples" in solver.json()["protocol"]
    assert solver.json()["parzen_bits"] != respaced.json()["parzen_bits"]
    assert_one_line_error(cli("parzen", run, "--samples", 5, "--valid", 10, "--eta", 0.5, "--quiet"), "--eta", "ddim")

    vectors = tmp_path / "vectors"
    assert cli("train", "swissroll", "--steps", 2, "--set", "data.n=200", "--out", vectors, "--quiet").rc == 0
    assert_one_line_error(cli("parzen", vectors, "--quiet"), "image runs")


@pytest.fixture
def tiny_image_run(cli, tmp_path):
    """A 2-step image run whose evaluation batches hold 8 images."""
    np.savez(tmp_path / "leaves.npz", images=dead_leaves(40, size=8))
    config = tmp_path / "tiny_parzen.toml"
    config.write_text(TINY_IMAGE_RUN.format(source=tmp_path / "leaves.npz") + "[eval]\nbatch_size = 8\n")
    assert cli("train", config, "--out", tmp_path / "run", "--quiet", "--device", "cpu").rc == 0
    return tmp_path / "run"


def test_samples_are_kept_as_they_are_drawn_and_a_stopped_draw_resumes(tiny_image_run, monkeypatch):
    from thermodiff.process.respace import respaced_timesteps
    from thermodiff.run.experiment import load_run
    from thermodiff.tasks import parzen

    drawn = []

    def counted(*args, **kwargs):
        drawn.append(args[2][0])
        if len(drawn) == 3:
            raise KeyboardInterrupt  # a stop in the third batch
        return real(*args, **kwargs)

    real = parzen.sample
    monkeypatch.setattr(parzen, "sample", counted)
    run = load_run(tiny_image_run, split=True)
    with pytest.raises(KeyboardInterrupt):
        parzen.draw_kept_samples(run, ChainSpec(3), 30, seed=1, progress=False)
    drawn.clear()
    monkeypatch.setattr(parzen, "sample", lambda *a, **k: (drawn.append(a[2][0]), real(*a, **k))[1])
    resumed, kept = parzen.draw_kept_samples(run, ChainSpec(3), 30, seed=1, progress=False)[:2]
    assert drawn == [8, 6] and "2 of 4 batches reused" in kept  # batches of 8, 8, 8, 6: the first two were kept

    folder = Path(kept.split(" (")[0])
    shutil.rmtree(folder)
    drawn.clear()
    fresh = parzen.draw_kept_samples(run, ChainSpec(3), 30, seed=1, progress=False).samples
    assert drawn == [8, 8, 8, 6]
    np.testing.assert_array_equal(resumed, fresh)  # each batch its own stream: where it stopped does not matter
    assert resumed.shape == (30, *run.dataset.event_shape)
    kept_other = parzen.draw_kept_samples(run, ChainSpec(2), 8, seed=1, progress=False).kept
    assert "0 of 1 batches reused" in kept_other  # another chain's samples are not taken for this one's
    kept_ddim = parzen.draw_kept_samples(run, ChainSpec(3), 8, seed=1, progress=False, sampler="ddim", eta=1.0).kept
    assert "0 of 1 batches reused" in kept_ddim and "ddim_eta1" in kept_ddim  # nor another sampler's
    fp32 = parzen.draw_kept_samples(run, ChainSpec(3), 8, seed=1, progress=False, precision="fp32")
    assert fp32.precision == "fp32" and "1 of 1 batches reused" in fp32.kept  # the tiny run trained in fp32
    low = parzen.draw_kept_samples(run, ChainSpec(3), 8, seed=1, progress=False, precision="bf16")
    assert "0 of 1 batches reused" in low.kept and low.kept.split(" (")[0].endswith("-bf16")  # nor another precision's
    fitted = parzen.draw_kept_samples(run, ChainSpec(3, "fitted"), 8, seed=1, progress=False)
    assert "0 of 1 batches reused" in fitted.kept and "-fitted" in fitted.kept  # nor another variance rule's
    assert fitted.chain["variance_rule"] == "fitted" and fitted.chain["respaced_timesteps"] == respaced_timesteps(run.diffusion.T, 3)
    clipped = parzen.draw_kept_samples(run, ChainSpec(3, clip_x0=True), 8, seed=1, progress=False)
    assert "0 of 1 batches reused" in clipped.kept and clipped.kept.split(" (")[0].endswith("-clip")  # nor unclipped ones


def test_samples_are_drawn_all_the_same_where_they_cannot_be_kept(tiny_image_run, monkeypatch, capsys):
    from thermodiff.run.experiment import load_run
    from thermodiff.tasks import parzen

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(parzen, "atomic_write_bytes", full_disk)
    samples, kept = parzen.draw_kept_samples(load_run(tiny_image_run, split=True), ChainSpec(), 20, progress=False)[:2]
    assert samples.shape[0] == 20 and kept.startswith("not kept") and "No space left" in kept
    assert capsys.readouterr().err.count("warning: samples not kept") == 1
    assert not (tiny_image_run / "parzen_samples").exists() or not any((tiny_image_run / "parzen_samples").rglob("*.npy"))
