"""The commands on every device this machine has: the CPU always, and a CUDA GPU where there is
one (benchmarks/gpu_check.py runs this file on a lent GPU). A tiny image run trains, evaluates
(every step, importance-sampled steps, fitted variances on a respaced chain, the ODE), samples,
denoises, inpaints and scores Parzen windows with ``--device``; a run trained on a GPU loads on the CPU, and the bound measured on the GPU
agrees with the CPU's within their standard errors (the GPU draws its own noise)."""

import math

import numpy as np
import pytest
import torch
from conftest import write_tiny_images

from thermodiff.cli import main
from thermodiff.run.experiment import load_run

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run_json(cli, *args) -> dict:
    """The JSON report of ``thermodiff ARGS`` run through conftest's ``cli``, which must succeed."""
    result = cli(*args, "--quiet", "--json")
    assert result.rc == 0, result
    return result.json()


@pytest.fixture(scope="module", params=DEVICES)
def trained(request, tmp_path_factory):
    """A tiny 8 x 8 image run trained on the device: (device, run directory)."""
    folder = tmp_path_factory.mktemp(f"run_{request.param}")
    run = folder / "run"
    assert main(["train", str(write_tiny_images(folder)), "--out", str(run), "--quiet", "--device", request.param]) == 0
    return request.param, run


@pytest.mark.parametrize("flags", [["--exact"], ["--t-samples", "2", "--t-sampling", "importance"],
                                   ["--respace", "3", "--variance", "fitted"], ["--ode"]],
                         ids=["exact", "importance", "fitted", "ode"])
def test_evaluate_on_the_device(trained, cli, flags):
    device, run = trained
    e = run_json(cli, "evaluate", run, "--device", device, *flags)
    assert e["device"].startswith(device) and ("GPU" if device == "cuda" else "CPU") in e["hardware"]
    assert math.isfinite(e["K_bits"]) and e["n_examples"] == 12
    if "--ode" in flags:
        assert math.isfinite(e["ode_log_likelihood_bits"])


def test_sample_on_the_device(trained, cli, tmp_path):
    device, run = trained
    for sampler in ("ancestral", "ddim"):
        out = tmp_path / f"{sampler}.npy"
        s = run_json(cli, "sample", run, "-n", "5", "--sampler", sampler, "--steps", "4", "--device", device,
                     "--out", out)
        assert s["device"].startswith(device)
        x = np.load(out)
        assert x.shape == (5, 1, 8, 8) and x.dtype == np.uint8


@pytest.mark.parametrize("command", ["denoise", "inpaint"])
def test_posteriors_on_the_device(trained, cli, tmp_path, command):
    device, run = trained
    images = np.random.default_rng(0).integers(0, 256, (2, 1, 8, 8)).astype(np.float64)
    np.save(tmp_path / "in.npy", images)
    mask = np.zeros((1, 8, 8))
    mask[:, :, :4] = 1  # the left half known
    np.save(tmp_path / "mask.npy", mask)
    flags = ["--sigma", "20"] if command == "denoise" else ["--mask", tmp_path / "mask.npy"]
    out = tmp_path / "out.npz"
    r = run_json(cli, command, run, "--input", tmp_path / "in.npy", *flags, "-n", "2", "--device", device,
                 "--out", out)
    assert r["device"].startswith(device)
    samples = np.load(out)["samples"]
    assert samples.shape == (2, 2, 1, 8, 8) and np.isfinite(samples).all()
    if command == "inpaint":
        np.testing.assert_array_equal(samples[:, :, :, :, :4], np.broadcast_to(images[:, :, :, :4], (2, 2, 1, 8, 4)))


def test_parzen_on_the_device(trained, cli):
    device, run = trained
    p = run_json(cli, "parzen", run, "--samples", "6", "--valid", "8", "--max-test", "4", "--steps", "3",
                 "--device", device)
    assert p["device"].startswith(device) and math.isfinite(p["parzen_bits"])
    key = p["samples_kept"].split(" (")[0]  # the folder the samples are kept in names a device other than the CPU
    assert key.endswith("-cuda") == (device == "cuda")


def test_a_run_trained_on_the_device_loads_on_the_cpu(trained):
    device, run = trained
    loaded = load_run(run)
    assert loaded.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    assert all(b.device.type == "cpu" for b in loaded.diffusion.buffers())


@needs_cuda
def test_the_gpus_bound_is_the_cpus_within_the_standard_errors(trained, cli):
    device, run = trained
    if device != "cuda":
        pytest.skip("compares a GPU run's bound on both devices")
    cpu, gpu = (run_json(cli, "evaluate", run, "--device", d, "--exact") for d in ("cpu", "cuda"))
    assert gpu["n_examples"] == cpu["n_examples"]
    assert abs(gpu["K_bits"] - cpu["K_bits"]) < 4 * math.hypot(gpu["stderr_bits"], cpu["stderr_bits"])
