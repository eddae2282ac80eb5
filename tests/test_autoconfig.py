"""Settings decided from the data (thermodiff.run.autoconfig) and the pieces they choose: the whitening
map, the log-SNR schedule, the eps_residual parameterisation, the residual MLP, integer lattices,
the validation split, the stratified bound estimate; and `train vectors` end to end on a
Gaussian whose exact log-likelihood the bound must reach."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from thermodiff import GaussianDiffusion, exact_bound, make_schedule
from thermodiff.data.dataset import Lattice, Scaling
from thermodiff.nets.vector import ResidualMLP
from thermodiff.process.distributions import discretized_gaussian_log_prob, standard_normal_log_prob
from thermodiff.process.gaussian import Bins
from thermodiff.process.schedules import LOG_SNR_END, log_snr_betas
from thermodiff.process.tensors import LN2
from thermodiff.run.autoconfig import (
    LATTICE_RESOLUTION,
    MIN_BETA_1,
    NN_QUANTILE,
    NN_RESOLUTION,
    RESOLUTION_NATS,
    nn_distance_quantile,
    precision_choice,
    resolve_for_device,
)
from thermodiff.run.checkpoint import load_checkpoint
from thermodiff.run.config import load_config
from thermodiff.run.experiment import data_bins, prepare_dataset


def correlated_gaussian(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n draws of a 3-D Gaussian with variances 0.01 .. 25 along rotated axes; its mean and covariance."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(np.random.default_rng(42).standard_normal((3, 3)))
    cov = rotation @ np.diag([0.01, 1.0, 25.0]) @ rotation.T
    mean = np.array([3.0, -1.0, 10.0])
    return mean + rng.standard_normal((n, 3)) @ np.linalg.cholesky(cov).T, mean, cov


def gaussian_log_prob(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    d = x - mean
    return -0.5 * (np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d) + np.linalg.slogdet(cov)[1]
                   + len(mean) * math.log(2 * math.pi))


# --- the whitening map ---------------------------------------------------------------------

def test_whitening_log_determinant_against_a_hand_computation():
    x, _, _ = correlated_gaussian(5000)
    scaling = Scaling.fit(x, "pca")
    sample_cov = np.cov(x, rowvar=False, bias=True)
    # |d z / d x| = |det(R diag(1/s))| = det(Cov)^(-1/2)
    assert scaling.log_det(3) == pytest.approx(-0.5 * np.linalg.slogdet(sample_cov)[1], rel=1e-12)
    z = scaling.apply(x)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-10)
    np.testing.assert_allclose(np.cov(z, rowvar=False, bias=True), np.eye(3), atol=1e-10)
    np.testing.assert_allclose(scaling.invert(z), x, atol=1e-10)
    # the same map on tensors
    zt = scaling.apply(torch.as_tensor(x))
    np.testing.assert_allclose(zt.numpy(), z, atol=1e-12)


def test_whitened_density_in_original_units_is_the_gaussian_log_likelihood():
    """log N(z; 0, I) + log_det is the log-density of the fitted Gaussian in original units."""
    x, _, _ = correlated_gaussian(2000)
    scaling = Scaling.fit(x, "pca")
    z = torch.as_tensor(scaling.apply(x))
    ours = standard_normal_log_prob(z).sum(1).numpy() + scaling.log_det(3)
    np.testing.assert_allclose(ours, gaussian_log_prob(x, x.mean(0), np.cov(x, rowvar=False, bias=True)), atol=1e-9)


def test_singular_covariance_is_refused():
    x = np.random.default_rng(0).standard_normal((100, 2))
    with pytest.raises(Exception, match="lower-dimensional"):
        Scaling.fit(np.column_stack([x, x[:, 0] + x[:, 1]]), "pca")


# --- the process pieces ------------------------------------------------------------------------

def test_log_snr_schedule_is_linear_in_log_snr():
    betas = log_snr_betas(50, beta_1=1e-5)
    abar = np.cumprod(1 - betas)
    log_snr = np.log(abar / (1 - abar))
    assert betas[0] == pytest.approx(1e-5, rel=1e-9)
    np.testing.assert_allclose(np.diff(log_snr), np.diff(log_snr)[0], rtol=1e-6)
    assert log_snr[-1] == pytest.approx(LOG_SNR_END, rel=1e-9)
    assert make_schedule("log_snr", 50, 1e-5).betas().numpy() == pytest.approx(betas)


def test_eps_residual_zero_output_is_the_forward_kernel():
    diffusion = GaussianDiffusion(make_schedule("log_snr", 30, 1e-4), parameterization="eps_residual")
    x_t = torch.randn(7, 3, dtype=torch.float64)
    for t in (1, 2, 15, 30):
        tt = torch.full((7,), t)
        mean, var = diffusion.p_mean_var(lambda x, s: torch.zeros(len(x), 2, 3, dtype=x.dtype), x_t, tt)
        beta = diffusion.schedule.betas()[t - 1]
        torch.testing.assert_close(mean, x_t * (1 - beta).sqrt())
        torch.testing.assert_close(var, beta.expand_as(var))


def test_eps_residual_zero_model_bounds_standard_normal_data_exactly():
    """The forward kernels are the exact reverse of the stationary N(0, I) chain: K of the zero
    model equals log N(x; 0, I) on average (Monte Carlo, 4 standard errors), at a coarse T."""
    diffusion = GaussianDiffusion(make_schedule("log_snr", 8, 1e-3), parameterization="eps_residual")
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    zero = lambda x_t, t: torch.zeros(len(x_t), 2, 2, dtype=x_t.dtype)
    estimate = exact_bound(diffusion, zero, [x], 1, torch.Generator().manual_seed(1))
    gap = standard_normal_log_prob(x).sum(1) - estimate.per_example
    assert abs(float(gap.mean())) < 4 * float(gap.std() / math.sqrt(len(gap)))
    assert float(gap.std()) > 0  # a real Monte Carlo estimate, not a constant


def test_stratified_estimate_is_unbiased():
    diffusion = GaussianDiffusion(make_schedule("log_snr", 40, 1e-3), parameterization="eps_residual")
    wavy = lambda x_t, t: torch.stack([torch.sin(3 * x_t) * t[:, None] / 40, 0.3 * torch.cos(x_t)], 1)
    x = torch.tensor([[0.5, -1.0]], dtype=torch.float64).repeat(3000, 1)
    exact = exact_bound(diffusion, wavy, [x], 1, torch.Generator().manual_seed(2))
    sampled = exact_bound(diffusion, wavy, [x], 1, torch.Generator().manual_seed(3), t_samples=5)
    assert exact.t_samples is None and sampled.t_samples == 5
    difference = exact.mean - sampled.mean
    assert abs(difference) < 4 * math.hypot(exact.stderr, sampled.stderr)
    assert sampled.stderr > exact.stderr  # the sampled steps add variance


def test_residual_mlp_starts_at_zero_and_sees_the_time():
    net = ResidualMLP(3, 2, T=20, hidden=32, blocks=2)
    x = torch.randn(5, 3)
    assert torch.equal(net(x, torch.full((5,), 4)), torch.zeros(5, 2, 3))
    torch.nn.init.normal_(net.out[-1].weight)
    early, late = net(x, torch.full((5,), 2)), net(x, torch.full((5,), 19))
    assert not torch.allclose(early, late)
    # integer step t sits at the continuous time (t - 1) / (T - 1)
    torch.testing.assert_close(net(x, torch.full((5,), 7)), net(x, torch.full((5,), 6 / 19)))


# --- integer-valued data -----------------------------------------------------------------------

def test_lattice_detection():
    rng = np.random.default_rng(0)
    counts = rng.poisson([2.0, 30.0], size=(1000, 2)).astype(float)
    lattice = Lattice.detect(counts)
    assert lattice.step == [1.0, 1.0] and lattice.low == list(counts.min(0))
    assert lattice.count == [int(counts[:, j].max() - counts[:, j].min()) + 1 for j in range(2)]
    halves = np.round(rng.normal(size=(1000, 1)) * 2) / 2
    assert Lattice.detect(halves).step == [0.5]
    assert Lattice.detect(rng.normal(size=(1000, 2))) is None  # continuous
    assert Lattice.detect(np.column_stack([counts[:, 0], rng.normal(size=1000)])) is None  # one continuous column
    assert Lattice.detect(np.arange(10.0)[:, None]) is None  # no value repeats: no evidence of a lattice


def test_per_dimension_bins_are_a_distribution():
    bins = Bins(low=(-1.0, 0.0), width=(0.5, 0.25), count=(5, 9))
    mean, var = torch.tensor([[0.3, 1.1]], dtype=torch.float64), torch.tensor([[0.4, 0.2]], dtype=torch.float64)
    for j, (low, width, count) in enumerate(zip(bins.low, bins.width, bins.count)):
        centres = torch.tensor([low + k * width for k in range(count)], dtype=torch.float64)
        x = torch.zeros(count, 2, dtype=torch.float64)
        x[:, j] = centres
        log_p = bins.log_prob(x, mean.expand(count, 2), var.expand(count, 2))[:, j]
        assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-12)
        by_hand = discretized_gaussian_log_prob(centres, mean[0, j], var[0, j], low, width, count)
        torch.testing.assert_close(log_p, by_hand)


# --- the rules ---------------------------------------------------------------------------------

def vectors_config(path, *overrides):
    return load_config("vectors", [f"data.source={json.dumps(str(path))}", *overrides])


def test_continuous_data_are_whitened_with_beta_1_from_nearest_neighbours(tmp_path):
    x, _, _ = correlated_gaussian(600)
    np.save(tmp_path / "x.npy", x)
    cfg = vectors_config(tmp_path / "x.npy")
    dataset, kind = prepare_dataset(cfg)
    assert kind == "gaussian" and cfg.data.scaling == "pca" and dataset.scaling.rotation is not None
    assert (cfg.diffusion.schedule, cfg.diffusion.parameterization, cfg.diffusion.decoder) == (
        "log_snr", "eps_residual", "forward")
    z = dataset.scaling.apply(dataset.train)
    # the distances to the nearest other training point, by brute force
    d = np.sqrt(((z[:, None] - z[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    assert nn_distance_quantile(z, 0.5, queries=len(z)) == pytest.approx(np.median(d.min(1)), rel=1e-12)
    fine = np.quantile(d.min(1), NN_QUANTILE)
    assert nn_distance_quantile(z, queries=len(z)) == pytest.approx(fine, rel=1e-12)
    expected = min(max((fine / NN_RESOLUTION) ** 2, MIN_BETA_1), RESOLUTION_NATS / 3)
    assert cfg.diffusion.beta_1 == pytest.approx(expected, rel=1e-2)
    assert set(cfg.auto) >= {"data.scaling", "diffusion.beta_1", "diffusion.T", "model.network", "train.max_minutes"}
    assert "nearest-neighbour" in cfg.auto["diffusion.beta_1"]
    assert (cfg.train.max_minutes, cfg.train.val_minutes) == (3.0, 0.3)  # at least 3 minutes; validated 10 times


def test_few_examples_are_scaled_per_dimension_and_user_settings_are_kept(tmp_path):
    x, _, _ = correlated_gaussian(25)  # 25 < 10 D
    np.save(tmp_path / "x.npy", x)
    cfg = vectors_config(tmp_path / "x.npy", "diffusion.T=33", "model.hidden=48")
    prepare_dataset(cfg)
    assert cfg.data.scaling == "per_dimension" and "too few" in cfg.auto["data.scaling"]
    assert (cfg.diffusion.T, cfg.model.hidden) == (33, 48)
    assert "diffusion.T" not in cfg.auto and "model.hidden" not in cfg.auto


def test_integer_data_get_a_discretized_decoder_on_their_lattice(tmp_path):
    counts = np.random.default_rng(1).poisson([0.5, 20.0], size=(800, 2)).astype(float)
    np.save(tmp_path / "x.npy", counts)
    cfg = vectors_config(tmp_path / "x.npy")
    dataset, _ = prepare_dataset(cfg)
    assert (cfg.data.scaling, cfg.diffusion.decoder) == ("per_dimension", "discretized")
    bins = data_bins(dataset)
    # the lattice's points land on the bins' centres in model units
    centres = dataset.scaling.apply(counts)
    k = (centres - np.asarray(bins.low)) / np.asarray(bins.width)
    np.testing.assert_allclose(k, np.rint(k), atol=1e-9)
    assert cfg.diffusion.beta_1 == pytest.approx((min(bins.width) / LATTICE_RESOLUTION) ** 2, rel=1e-2)


def test_binary_data_get_binomial_choices(tmp_path):
    bits = (np.random.default_rng(2).random((500, 6)) < 0.3).astype(float)
    np.save(tmp_path / "x.npy", bits)
    cfg = vectors_config(tmp_path / "x.npy")
    _, kind = prepare_dataset(cfg)
    assert kind == "binomial" and cfg.data.scaling == "none"
    assert (cfg.diffusion.schedule, cfg.diffusion.parameterization, cfg.diffusion.T) == ("erase", "x0", 200)
    assert (cfg.model.hidden, cfg.train.batch_size, cfg.train.max_minutes) == (128, 256, 6.0)  # a minute per dimension


def test_validation_split_is_disjoint_from_train_and_test(tmp_path):
    x = np.arange(2000.0).reshape(1000, 2) + np.random.default_rng(3).random((1000, 2))  # distinct rows
    np.save(tmp_path / "x.npy", x)
    dataset, _ = prepare_dataset(vectors_config(tmp_path / "x.npy"))
    rows = [{tuple(r) for r in part} for part in (dataset.train, dataset.val, dataset.test)]
    assert len(rows[1]) == round(0.1 * 800) and len(rows[2]) == 200
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    assert sum(map(len, rows)) == 1000


# --- end to end ----------------------------------------------------------------------------------

def test_train_vectors_defaults_reach_a_gaussians_exact_log_likelihood(cli, tmp_path):
    """`train vectors` with the defaults on a correlated Gaussian (variances 0.01 .. 25), a short
    run: whitening makes the zero network the fitted Gaussian, so the exact bound on held-out data
    is within 0.02 bits/sample of the exact log-likelihood (the whitening's estimation error from
    800 examples is ~0.006 bits), paired per example, plus 4 standard errors."""
    x, mean, cov = correlated_gaussian(1000)
    test, _, _ = correlated_gaussian(1000, seed=1)
    np.save(tmp_path / "train.npy", x)
    np.save(tmp_path / "test.npy", test)
    run = tmp_path / "run"
    trained = cli("train", "vectors", "--data", tmp_path / "train.npy", "--out", run, "--steps", 30, "--json", "--quiet")
    assert trained.rc == 0, trained
    summary = trained.json()
    assert summary["steps"] == 30 and summary["best"]["step"] in (0, 30)  # scored before and after training
    assert (run / "best.safetensors").exists()
    r = cli("evaluate", run, "--data", tmp_path / "test.npy", "--per-example", tmp_path / "k.npy", "--json", "--quiet")
    assert r.rc == 0, r
    report = r.json()
    assert report["checkpoint"] == "best" and report["estimator"].startswith("exact")
    assert report["auto_choices"]["data.scaling"].startswith("pca")
    gap = gaussian_log_prob(test, mean, cov) / LN2 - np.load(tmp_path / "k.npy")
    assert np.mean(gap) == pytest.approx(np.mean(gaussian_log_prob(test, mean, cov) / LN2) - report["K_original_units_bits"])
    assert abs(np.mean(gap)) < 0.02 + 4 * np.std(gap) / math.sqrt(len(gap))


def test_time_budget_stops_training_and_validation_is_logged(cli, tmp_path):
    x, _, _ = correlated_gaussian(400)
    np.save(tmp_path / "x.npy", x)
    run = tmp_path / "run"
    r = cli("train", "vectors", "--data", tmp_path / "x.npy", "--out", run, "--minutes", 0.05,
            "--set", "train.val_minutes=0.01", "--set", "model.hidden=16", "--json", "--quiet")
    assert r.rc == 0, r
    summary = r.json()
    assert summary["wall_s"] < 60 and summary["steps"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [rec for rec in records if "val_K_bits" in rec]
    assert len(scored) >= 2 and scored[-1]["step"] == summary["steps"]
    assert scored[0]["step"] == 0 and "K_bits_running" not in scored[0]  # the score before training
    best = max(scored, key=lambda rec: rec["val_K_bits"])
    assert (best["step"], best["val_K_bits"]) == (summary["best"]["step"], pytest.approx(summary["best"]["K_bits"], abs=1e-6))
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["max_minutes"] == 0.05 and config["train"]["steps"] == 0


def test_resumed_run_keeps_its_best_weights(cli, tmp_path):
    """A validated run resumed for more steps scores again; best.safetensors is replaced only by
    better weights, and its record agrees with the checkpoint's."""
    from thermodiff.run.checkpoint import load_checkpoint

    x, _, _ = correlated_gaussian(400)
    np.save(tmp_path / "x.npy", x)
    run = tmp_path / "run"
    common = ["--set", "model.hidden=16", "--json", "--quiet"]
    first = cli("train", "vectors", "--data", tmp_path / "x.npy", "--out", run, "--steps", 10, *common).json()["best"]
    second = cli("train", "vectors", "--out", run, "--resume", "--steps", 20, "--json", "--quiet").json()["best"]
    assert second["K_bits"] >= first["K_bits"] and second["step"] in (first["step"], 20)
    saved = load_checkpoint(run / "best.safetensors", {"validation": dict})[1]["validation"]
    assert saved == second
    assert load_checkpoint(run / "checkpoint.safetensors", {"best": dict})[1]["best"] == second


def test_inpainting_a_whitened_run_is_refused(cli, tmp_path):
    """A mask names coordinates of the data; a whitening rotation mixes them, so clamping model
    coordinates would not keep the known values: a one-line error instead."""
    x, _, _ = correlated_gaussian(300)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "one.npy", x[:1])
    np.save(tmp_path / "mask.npy", np.array([1.0, 0.0, 0.0]))
    run = tmp_path / "run"
    assert cli("train", "vectors", "--data", tmp_path / "x.npy", "--out", run, "--steps", 2, "--set", "model.hidden=8",
               "--quiet").rc == 0
    r = cli("inpaint", run, "--input", tmp_path / "one.npy", "--mask", tmp_path / "mask.npy", "--out",
            tmp_path / "o.npz", "--quiet")
    assert r.rc == 2 and "rotation" in r.err and "per_dimension" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "o.npz").exists()


def test_image_runs_default_to_a_stratified_estimate_and_exact_is_one_flag_away(cli, tmp_path):
    from conftest import write_tiny_images

    config = write_tiny_images(tmp_path)
    run = tmp_path / "run"
    assert cli("train", config, "--out", run, "--T", 60, "--steps", 1, "--quiet").rc == 0
    default = cli("evaluate", run, "--max-examples", 4, "--json", "--quiet").json()
    assert default["estimator"].startswith("unbiased: ") and default["t_sampling"] == "importance"
    assert 1 <= default["t_samples"] <= 50  # strata of equal pilot mass: at most 50 steps per image
    uniform = cli("evaluate", run, "--max-examples", 4, "--t-sampling", "uniform", "--json", "--quiet").json()
    assert uniform["estimator"] == "unbiased: 50 stratified steps per example" and uniform["t_samples"] == 50
    exact = cli("evaluate", run, "--exact", "--json", "--quiet").json()
    assert exact["estimator"] == "exact: every step summed" and exact["t_samples"] is None
    assert exact["n_examples"] == exact["n_test"] == 12  # --exact: every test example too


def test_train_images_defaults_to_the_unet_on_a_time_budget(cli, tmp_path):
    from conftest import write_tiny_images

    write_tiny_images(tmp_path)
    run = tmp_path / "run"
    r = cli("train", "images", "--data", tmp_path / "images.npz", "--out", run, "--steps", 2, "--T", 20,
            "--set", "train.batch_size=4", "--json", "--quiet")
    assert r.rc == 0, r
    config = json.loads((run / "config.json").read_text())
    assert (config["model"]["network"], config["diffusion"]["kind"], config["diffusion"]["schedule"]) == (
        "unet", "vdm", "learned")
    assert r.json()["data"]["n_val"] > 0 and (run / "best.safetensors").exists()
    assert load_config("images").train.max_minutes == 30.0 and load_config("images").train.steps == 0


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")])
def test_precision_is_bf16_only_on_a_cpu_that_computes_it_natively(amx, avx512_bf16, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    choice = precision_choice(torch.device("cpu"))
    assert choice.key == "train.precision" and choice.value == expected
    assert ("AMX" if amx else "AVX-512 BF16") in choice.reason if expected == "bf16" else "emulated" in choice.reason
    assert not choice.reason.startswith(expected)  # the config writes "value: reason": said once


@pytest.mark.parametrize("minutes, steps, network, device, amx, compiler, expected, why", [
    (30.0, 0, "unet", "cpu", False, True, (True, True), "train_speed_mnist_unet_simple.json"),
    (5.0, 0, "unet", "cpu", False, True, (True, False), "a 5-minute run"),  # too short to repay compilation
    (0.0, 5000, "conv", "cpu", False, True, (True, True), "train_speed_mnist_unet_simple.json"),
    (0.0, 200, "unet", "cpu", False, True, (True, False), "a 200-step run"),
    (30.0, 0, "unet", "cpu", False, False, (True, False), "no C++ compiler"),
    (30.0, 0, "unet", "cuda", False, True, (False, False), "measured on CPUs only"),
    (30.0, 0, "resmlp", "cpu", False, True, (False, False), "measured on image networks"),
    (30.0, 0, "unet", "cpu", True, True, (False, False), "not shown to help in bf16"),  # AMX: precision auto is bf16
])
def test_speed_options_follow_the_device_the_network_and_the_runs_length(minutes, steps, network, device, amx,
                                                                         compiler, expected, why, monkeypatch):
    """train.channels_last and train.compile = "auto": each decided with its reason, for fp32 only,
    compile only where the run is long enough to repay compilation and a C++ compiler is found."""
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if compiler else None)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    cfg = load_config("images")
    cfg.train.max_minutes, cfg.train.steps, cfg.model.network = minutes, steps, network
    assert (cfg.train.compile, cfg.train.channels_last) == ("auto", "auto")
    resolve_for_device(cfg, torch.device(device))
    assert (cfg.train.channels_last, cfg.train.compile) == expected
    assert cfg.auto["train.compile"].startswith(f"{expected[1]}: ") and why in cfg.auto["train.compile"]


@pytest.mark.parametrize("native", [True, False])
def test_a_new_run_records_its_precision_and_why_a_resumed_one_keeps_it(native, tiny_images, cli, monkeypatch,
                                                                        tmp_path):
    """train.precision = "auto" is decided by the training device when the run starts, written into
    its config with the reason; explicit bf16 on a CPU that emulates it trains, with a warning."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    run = tmp_path / "run"
    first = cli("train", tiny_images, "--out", run, "--steps", "2", "--quiet", "--set", "train.precision=auto")
    assert first.rc == 0, first
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["precision"] == ("bf16" if native else "fp32")
    assert config["auto"]["train.precision"].startswith(config["train"]["precision"] + ": ")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: not native)
    again = cli("train", tiny_images, "--out", run, "--steps", "3", "--resume", "--quiet")
    assert again.rc == 0, again
    meta = load_checkpoint(run / "checkpoint.safetensors")[1]
    assert meta["step"] == 3 and meta["config"]["train"]["precision"] == config["train"]["precision"]
    assert ("warning: train.precision = 'bf16'" in again.err) == native  # bf16, now on a CPU without its units
