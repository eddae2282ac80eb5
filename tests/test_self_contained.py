"""Self-contained runs (issue 13, item 5): what sample, denoise, inpaint, plot and evaluate --data
need of the data (scaling, shape, kind, lattice, the training file's digest) lives in the run's
checkpoint, so a moved or edited training file matters only where the run's own split is needed
(evaluate on it, parzen, plot's figures of held-out data), and then the error says what is
missing and how to proceed. Runs whose checkpoints record less (older versions) still load from
their training data."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error

from thermodiff.process.sampling import sample_in_batches
from thermodiff.run.checkpoint import load_checkpoint, save_checkpoint
from thermodiff.run.experiment import load_run


def samples_of(run, n: int = 20, seed: int = 3) -> np.ndarray:
    batches = sample_in_batches(run.diffusion, run.model, n, run.dataset.event_shape, n,
                                torch.Generator().manual_seed(seed), progress=False)
    return np.concatenate([run.dataset.from_model(x) for x in batches])


@pytest.fixture
def file_run(tiny_config, cli, tmp_path) -> tuple[Path, Path]:
    """The tiny config trained on a .npy file of its own: (run directory, data file)."""
    data = tmp_path / "points.npy"
    np.save(data, np.random.default_rng(1).standard_normal((200, 2)) * [1.0, 3.0])
    r = cli("train", tiny_config, "--data", data, "--out", tmp_path / "run", "--quiet")
    assert r.rc == 0, r
    return tmp_path / "run", data


def test_the_recorded_run_is_the_model_rebuilt_from_its_training_data(file_run):
    run_dir, _ = file_run
    rebuilt, recorded = load_run(run_dir, split=True), load_run(run_dir)
    assert len(recorded.dataset.train) == len(recorded.dataset.test) == 0 < len(rebuilt.dataset.test)
    assert recorded.dataset.event_shape == rebuilt.dataset.event_shape and recorded.dataset.scaling == rebuilt.dataset.scaling
    np.testing.assert_array_equal(samples_of(recorded), samples_of(rebuilt))


def test_image_runs_are_recorded_too(tiny_images, cli, tmp_path):
    """Dequantisation, the pixels' bins and the uint8 kind come from the record."""
    assert cli("train", tiny_images, "--out", tmp_path / "run", "--quiet").rc == 0
    (tmp_path / "images.npz").rename(tmp_path / "moved.npz")
    recorded = load_run(tmp_path / "run")
    assert recorded.dataset.dequantize and recorded.dataset.event_shape == (1, 8, 8)
    (tmp_path / "moved.npz").rename(tmp_path / "images.npz")
    np.testing.assert_array_equal(samples_of(recorded, 4), samples_of(load_run(tmp_path / "run", split=True), 4))
    assert samples_of(recorded, 4).dtype == np.uint8


@pytest.mark.parametrize("damage", ["moved", "edited"])
def test_a_moved_or_edited_training_file_leaves_every_command_that_needs_no_split_working(file_run, cli, tmp_path, damage):
    run_dir, data = file_run
    before = samples_of(load_run(run_dir))
    other = tmp_path / "other.npy"
    shutil.copy(data, other)
    if damage == "moved":
        data.rename(tmp_path / "elsewhere.npy")
    else:
        np.save(data, np.zeros((5, 3)))
    np.testing.assert_array_equal(samples_of(load_run(run_dir)), before)
    np.save(tmp_path / "one.npy", np.array([0.5, -0.3]))
    np.save(tmp_path / "mask.npy", np.array([1.0, 0.0]))
    for args in (["sample", run_dir, "-n", "5", "--out", tmp_path / "s.npy"],
                 ["denoise", run_dir, "--input", tmp_path / "one.npy", "--sigma", "0.3", "--out", tmp_path / "d.npz"],
                 ["inpaint", run_dir, "--input", tmp_path / "one.npy", "--mask", tmp_path / "mask.npy", "--out",
                  tmp_path / "i.npz"],
                 ["evaluate", run_dir, "--data", other]):
        r = cli(*args, "--quiet")
        assert r.rc == 0, (args[0], r)
    r = cli("plot", run_dir, "--quiet", "--json")
    assert r.rc == 0, r
    assert [Path(f).name for f in r.json()["files"]] == ["conditional.png", "samples.png"]
    assert str(data) in r.json()["skipped"] and not (run_dir / "figure1.png").exists()


@pytest.mark.parametrize("damage, needle", [("moved", "is missing"), ("edited", "changed since run")])
def test_evaluate_on_the_runs_split_names_the_file_and_the_way_forward(file_run, cli, damage, needle):
    run_dir, data = file_run
    digest = load_checkpoint(run_dir / "checkpoint.safetensors")[1]["data"]["sha256"]
    if damage == "moved":
        data.unlink()
    else:
        np.save(data, np.zeros((5, 2)))
    r = cli("evaluate", run_dir, "--quiet")
    assert_one_line_error(r, "test split", str(data), needle, digest[:16], "--data FILE")
    assert_one_line_error(cli("parzen", run_dir, "--quiet"), str(data), needle)
    assert not (run_dir / "evaluation.json").exists()


def test_plot_with_the_data_in_place_draws_every_figure(file_run, cli):
    run_dir, _ = file_run
    r = cli("plot", run_dir, "--quiet", "--json")
    assert r.rc == 0, r
    assert r.json()["skipped"] is None
    assert {Path(f).name for f in r.json()["files"]} == {"figure1.png", "conditional.png", "samples.png", "bound.png"}


def strip_record(run_dir: Path, *keys: str) -> None:
    """Rewrite every checkpoint of the run as an older version wrote it: without ``keys`` in its data record."""
    for path in run_dir.glob("*.safetensors"):
        tensors, meta = load_checkpoint(path)
        for key in keys:
            meta["data"].pop(key)
        save_checkpoint(path, tensors, meta)


def test_an_older_record_loads_from_the_training_data_and_says_when_they_are_gone(file_run, cli, tmp_path):
    run_dir, data = file_run
    expected = samples_of(load_run(run_dir))
    strip_record(run_dir, "lattice", "train_mean")
    np.testing.assert_array_equal(samples_of(load_run(run_dir)), expected)
    data.rename(tmp_path / "elsewhere.npy")
    assert_one_line_error(cli("sample", run_dir, "--out", tmp_path / "s.npy"), "older version", str(data), "is missing")
    assert not (tmp_path / "s.npy").exists()
