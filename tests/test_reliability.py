"""Reliability (issue 5), one section per promise:

1. training killed with SIGKILL at random moments and restarted with --resume ends bit for bit
   where an uninterrupted run ends (one process, and torchrun with two), and a kill between a
   checkpoint's complete temporary file and its rename keeps the previous checkpoint;
2. hostile input through every command (broken files of every format, bad shapes, dtypes and
   values, bad config keys and ranges, foreign checkpoints, existing outputs) is a one-line
   error with exit code 2 that changes nothing on disk;
3. pickles disguised as checkpoints are refused by every command without running;
4. non-finite losses are skipped, counted and stop training after train.max_nonfinite in a row;
   gradient clipping bounds the gradient norm; the bound is accumulated in float64.

The fuzzing of the loaders and the config parser is in test_fuzz.py; the kills use
thermodiff.run.interruption, which benchmarks/soak.py runs with 30+ kills."""

import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import stat
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TOML, CliResult, assert_one_line_error, write_tiny_config
from PIL import Image
from safetensors.torch import save as save_safetensors
from test_image_data import write_cifar_bin, write_mnist

from thermodiff.data.images import DATASETS, md5_of
from thermodiff.process.bound import exact_bound
from thermodiff.run import interruption, training
from thermodiff.run.checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint, save_checkpoint, umask
from thermodiff.run.config import Config, load_config

# --------------------------------------------------------------------------- 1. SIGKILL and --resume


@pytest.mark.parametrize("nproc, kills, steps, seed", [(1, 3, 150, 4), (2, 1, 90, 0)], ids=["one_process", "torchrun_2"])
def test_sigkill_at_random_moments_then_resume_ends_bit_for_bit(tmp_path, nproc, kills, steps, seed):
    """Weights, optimiser, RNG, EMA, the checkpoint record and the metrics (all but wall-clock
    times) equal an uninterrupted run's; after every kill the checkpoint loads, never goes back,
    and is at most checkpoint_every steps behind the metrics (asserted in run_with_kills)."""
    result = interruption.soak(tmp_path, nproc, kills, steps, checkpoint_every=7, seed=seed)
    assert result["kills"] == kills and result["kills_during_training"] >= 1, result["kill_log"]
    assert result["differences"] == [], result
    assert not list((tmp_path / "killed").glob(".*.tmp")), "a resume leaves no temporary files behind"


STALL_IN_RENAME = textwrap.dedent("""
    import os, sys, time
    from thermodiff.cli import main

    replace, renames = os.replace, []

    def stall_third_checkpoint(src, dst):
        # checkpoints at steps 0, 7, 14: the one of step 14 stops after its temporary file is
        # complete and fsynced, before the rename that puts it in place
        if str(dst).endswith("checkpoint.safetensors"):
            renames.append(dst)
            if len(renames) == 3:
                print("stalled", flush=True)
                time.sleep(600)
        replace(src, dst)

    os.replace = stall_third_checkpoint
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    config = interruption.write_config(tmp_path, steps=30)
    interruption.run_uninterrupted(config, tmp_path / "uninterrupted", 1, tmp_path / "uninterrupted.log")
    script, log, run = tmp_path / "stall.py", tmp_path / "stall.log", tmp_path / "killed"
    script.write_text(STALL_IN_RENAME)
    proc = interruption.launch([sys.executable, str(script), *interruption.train_argv(config, run, 1, resume=False)[3:]], log)
    deadline = time.monotonic() + 120
    while "stalled" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, log.read_text()
    interruption.kill_tree(proc)
    assert load_checkpoint(run / "checkpoint.safetensors")[1]["step"] == 7  # the previous one, intact
    [partial] = run.glob(".checkpoint.safetensors.*.tmp")
    assert load_checkpoint(partial)[1]["step"] == 14  # the new one was complete, just not yet in place
    assert interruption.launch(interruption.train_argv(config, run, 1, resume=True), log).wait() == 0, log.read_text()
    assert not partial.exists()
    assert interruption.differences(interruption.final_state(tmp_path / "uninterrupted"), interruption.final_state(run)) == []


def test_a_new_run_directory_appears_with_its_first_checkpoint(tiny_config, cli, tmp_path, monkeypatch):
    """A run killed before its first checkpoint leaves no run directory to trip over: the
    folder is filled aside and renamed into place with a step-0 checkpoint."""
    seen = []
    real = training.create_run_dir

    def spy(run_dir, populate):
        real(run_dir, populate)
        seen.append(load_checkpoint(run_dir / "checkpoint.safetensors")[1]["step"])

    monkeypatch.setattr(training, "create_run_dir", spy)
    assert cli("train", tiny_config, "--out", tmp_path / "run", "--steps", "3", "--quiet").rc == 0
    assert seen == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny.toml"]  # no staging folder left
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o777 & ~umask()  # as mkdir would make it


def test_a_checkpoint_whose_first_byte_is_0x80_loads(tmp_path):
    """safetensors files begin with their header length, 0x80 as first byte for one length in
    32: such checkpoints were refused as pickles (whose protocol opcode is 0x80)."""
    path = tmp_path / "checkpoint.safetensors"
    for pad in range(256):
        save_checkpoint(path, {"w": torch.ones(2)}, {"step": 1, "pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length with 0x80 as first byte")
    assert load_checkpoint(path)[1]["step"] == 1


# --------------------------------------------------------------------------- 2. hostile input


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def run_cli(cli, capsys):
    """The in-process CLI, with argparse's own exits (bad flags) returned like the others."""
    def run(*args) -> CliResult:
        try:
            return cli(*args)
        except SystemExit as e:
            out, err = capsys.readouterr()
            return CliResult(e.code, out, err)

    return run


class _Boom:
    """Unpickling this creates a directory (``marker``): evidence that code was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


class Scene:
    """What a hostile case works on: an input folder, a copy of a trained run that must survive
    (training cases overwrite it, so refusing must leave it intact) and a marker that only
    executed pickled code would create."""

    def __init__(self, tmp_path: Path, run: Path, monkeypatch):
        self.inputs, self.run, self.monkeypatch = tmp_path / "in", run, monkeypatch
        self.inputs.mkdir()
        self.marker = tmp_path / "executed"
        self.config = write_tiny_config(self.inputs)

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.inputs / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def npy(self, name: str, array: np.ndarray) -> Path:
        np.save(self.inputs / name, array)
        return self.inputs / name

    def cut(self, name: str, array: np.ndarray, keep: float) -> Path:
        """An .npy / .npz file of ``array`` cut to ``keep`` of its length."""
        path = self.inputs / name
        (np.save if name.endswith(".npy") else np.savez)(path, array)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
        return path

    def npz_with_pickle(self, name: str) -> Path:
        """An .npz whose object array would run code (make ``marker``) when unpickled."""
        np.savez(self.inputs / name, x=np.array([[_Boom(self.marker), 1], [2, 3]], dtype=object))
        return self.inputs / name

    def png_folder(self, bad: bytes | None = None, size=(8, 8), n: int = 6) -> Path:
        folder = self.inputs / "images"
        folder.mkdir(exist_ok=True)
        for i in range(n):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8)).save(folder / f"{i}.png")
        if bad is not None:
            (folder / "bad.png").write_bytes(bad)
        return folder

    def train(self, *extra) -> list:
        return ["train", self.config, "--out", self.run, "--overwrite", *extra]

    def train_on(self, config: str, data_flag: str, data: Path, *extra) -> list:
        return ["train", config, "--out", self.run, "--overwrite", data_flag, data, "--steps", "1", *extra]

    def damage_checkpoint(self, tensors=lambda t: t, record=lambda r: r) -> None:
        """Rewrite the run's checkpoint with changed tensors or record."""
        path = self.run / "checkpoint.safetensors"
        t, r = load_checkpoint(path)
        save_checkpoint(path, tensors(t), {k: v for k, v in record(r).items() if k not in ("format", "version")})

    def replace_checkpoint(self, data: bytes) -> None:
        (self.run / "checkpoint.safetensors").write_bytes(data)

    def mnist(self, compress: bool, damage=None) -> Path:
        folder = self.inputs / "mnist"
        write_mnist(folder, n_train=20, n_test=5, compress=compress)
        if damage is not None:
            name = "train-images-idx3-ubyte" + (".gz" if compress else "")
            (folder / name).write_bytes(damage((folder / name).read_bytes()))
        return folder

    def cifar(self, damage=None, trust_md5: bool = True) -> Path:
        """Fake CIFAR-10 binary batches; ``trust_md5`` puts their md5 sums in the table of
        official ones (so the reader, not the checksum, meets the damage)."""
        folder = self.inputs / "cifar" / "cifar-10-batches-bin"
        write_cifar_bin(folder)
        if damage is not None:
            (folder / "data_batch_1.bin").write_bytes(damage((folder / "data_batch_1.bin").read_bytes()))
        if trust_md5:
            source = dataclasses.replace(DATASETS["cifar10"], files={f: md5_of(folder / f) for f in DATASETS["cifar10"].files})
            self.monkeypatch.setitem(DATASETS, "cifar10", source)
        return folder.parent


VECTORS = np.random.default_rng(0).normal(size=(40, 2))


def _png_bytes(size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros(size, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _infinite_row_3() -> np.ndarray:
    x = VECTORS.copy()
    x[3, 1] = np.inf
    return x


# case -> (scene -> (arguments, words the message must contain)); cases that damage the run
# are functions below, registered with @hostile
HOSTILE = {
    # vector arrays: .npy, .npz, .csv
    "npy_empty": lambda s: (s.train_on("vectors", "--data", s.file("e.npy", b"")), ["e.npy", "empty"]),
    "npy_truncated": lambda s: (s.train_on("vectors", "--data", s.cut("t.npy", VECTORS, 0.6)), ["t.npy", "npy"]),
    "npy_corrupt": lambda s: (s.train_on("vectors", "--data", s.file("c.npy", os.urandom(300))), ["c.npy"]),
    "npy_header_garbled": lambda s: (s.train_on("vectors", "--data", s.file("g.npy", b"\x93NUMPY\x01\x00\x01\x00{")),
                                     ["g.npy", "npy"]),
    "npy_wrong_dtype": lambda s: (s.train_on("vectors", "--data", s.npy("s.npy", np.array([["a", "b"], ["c", "d"]]))),
                                  ["s.npy", "numeric"]),
    "npy_wrong_shape": lambda s: (s.train_on("vectors", "--data", s.npy("v.npy", np.arange(9.0))), ["v.npy", "(9,)"]),
    "npy_infinite": lambda s: (s.train_on("vectors", "--data", s.npy("i.npy", _infinite_row_3())),
                               ["i.npy", "infinite", "row 3"]),
    "npz_truncated": lambda s: (s.train_on("vectors", "--data", s.cut("t.npz", VECTORS, 0.5)), ["t.npz", "npz"]),
    "npz_corrupt": lambda s: (s.train_on("vectors", "--data", s.file("c.npz", b"PK\x03\x04" + os.urandom(200))),
                              ["c.npz", "npz"]),
    "npz_pickled_objects": lambda s: (s.train_on("vectors", "--data", s.npz_with_pickle("o.npz")), ["o.npz", "pickle"]),
    "csv_empty": lambda s: (s.train_on("vectors", "--data", s.file("e.csv", "")), ["e.csv", "empty"]),
    "csv_ragged": lambda s: (s.train_on("vectors", "--data", s.file("r.csv", "1,2\n3,4,5\n6,7\n")), ["r.csv", "csv"]),
    "csv_nan": lambda s: (s.train_on("vectors", "--data", s.file("n.csv", "1,2\nnan,4\n5,6\n")), ["n.csv", "NaN"]),
    "csv_binary_garbage": lambda s: (s.train_on("vectors", "--data", s.file("b.csv", b"\xff\xfe\x00" + os.urandom(64))),
                                     ["b.csv"]),
    "binomial_on_real_values": lambda s: (s.train_on("vectors", "--data", s.npy("g.npy", VECTORS), "--diffusion",
                                                     "binomial"), ["g.npy", "binary"]),
    # images: files in a folder, arrays
    "png_truncated": lambda s: (s.train_on("images", "--data", s.png_folder(bad=_png_bytes()[:40])), ["bad.png", "image"]),
    "png_corrupt": lambda s: (s.train_on("images", "--data", s.png_folder(bad=os.urandom(200))), ["bad.png", "image"]),
    "png_empty": lambda s: (s.train_on("images", "--data", s.png_folder(bad=b"")), ["bad.png", "image"]),
    "png_sizes_differ": lambda s: (s.train_on("images", "--data", s.png_folder(bad=_png_bytes((9, 8)))),
                                   ["bad.png", "9 x 8"]),
    "image_folder_empty": lambda s: (s.train_on("images", "--data", s.png_folder(n=0)), ["images", "no .png"]),
    "image_array_nan": lambda s: (s.train_on("images", "--data", s.npy("n.npy", np.full((6, 8, 8), np.nan))),
                                  ["n.npy", "NaN"]),
    "image_array_out_of_range": lambda s: (s.train_on("images", "--data", s.npy("r.npy", np.full((6, 8, 8), 300))),
                                           ["r.npy", "0..255"]),
    "binomial_on_grey_images": lambda s: (s.train_on("images", "--data", s.png_folder(), "--diffusion", "binomial"),
                                          ["images", "binary"]),
    # MNIST (IDX) and CIFAR-10 (binary); 20 training images of 28 x 28
    "idx_truncated": lambda s: (s.train_on("mnist", "--data-dir", s.mnist(False, lambda b: b[:-5])),
                                ["train-images-idx3-ubyte", "truncated"]),
    "idx_empty": lambda s: (s.train_on("mnist", "--data-dir", s.mnist(False, lambda b: b"")),
                            ["train-images-idx3-ubyte", "IDX"]),
    "idx_bad_magic": lambda s: (s.train_on("mnist", "--data-dir", s.mnist(False, lambda b: b"\x01\x02" + b[2:])),
                                ["train-images-idx3-ubyte", "magic"]),
    "idx_wrong_shape": lambda s: (s.train_on("mnist", "--data-dir",  # 27 rows declared, and as many bytes
                                             s.mnist(False, lambda b: b[:11] + b"\x1b" + b[12:-20 * 28])),
                                  ["train-images-idx3-ubyte", "28, 28"]),
    "mnist_md5_mismatch": lambda s: (s.train_on("mnist", "--data-dir", s.mnist(True)), ["train-images-idx3-ubyte.gz", "md5"]),
    "cifar_md5_mismatch": lambda s: (s.train_on("cifar10", "--data-dir", s.cifar(trust_md5=False)),
                                     ["data_batch_1.bin", "md5"]),
    "cifar_truncated": lambda s: (s.train_on("cifar10", "--data-dir", s.cifar(lambda b: b[:-100])),
                                  ["data_batch_1.bin", "truncated"]),
    "cifar_bad_label": lambda s: (s.train_on("cifar10", "--data-dir", s.cifar(lambda b: b"\x0c" + b[1:])),
                                  ["data_batch_1.bin", "label 12"]),
    # config keys, types and ranges; flags
    "config_unknown_key": lambda s: (["train", s.file("u.toml", TINY_TOML + "colour = 3\n"), "--out", s.run, "--overwrite"],
                                     ["u.toml", "eval.colour"]),
    "config_ill_typed": lambda s: (["train", s.file("t.toml", TINY_TOML.replace("T = 6", 'T = "six"')), "--out", s.run,
                                    "--overwrite"], ["t.toml", "diffusion.T", "int"]),
    "config_integer_beyond_64_bits": lambda s: (s.train("--set", f"train.steps={2**64}"), ["train.steps"]),
    "T_below_2": lambda s: (s.train("--T", "1"), ["diffusion.T", "at least 2"]),
    "seed_negative": lambda s: (s.train("--seed", "-1"), ["seed", "2**32"]),
    "test_fraction_nan": lambda s: (s.train("--set", "data.test_fraction=nan"), ["data.test_fraction"]),
    "noise_negative": lambda s: (s.train("--set", "data.noise=-0.5"), ["data.noise"]),
    "lr_infinite": lambda s: (s.train("--set", "train.lr=inf"), ["train.lr"]),
    "grad_clip_nan": lambda s: (s.train("--set", "train.grad_clip=nan"), ["train.grad_clip"]),
    "hidden_zero": lambda s: (s.train("--set", "model.hidden=0"), ["model.hidden"]),
    "fourier_infinite": lambda s: (s.train("--set", "model.fourier=inf"), ["model.fourier", "positive finite period"]),
    "beta_1_negative": lambda s: (s.train("--set", "diffusion.beta_1=-1e-3"), ["diffusion.beta_1"]),
    "stationary_p_above_1": lambda s: (s.train("--set", "diffusion.stationary_p=1.5"), ["diffusion.stationary_p"]),
    "eval_draws_zero": lambda s: (s.train("--set", "eval.n_draws=0"), ["eval.n_draws"]),
    "set_into_a_value": lambda s: (s.train("--set", "seed.x=1"), ["seed"]),
    "set_nested_too_deeply": lambda s: (s.train("--set", "seed=" + "[" * 3000), ["--set"]),
    "flag_ill_typed": lambda s: (s.train("--steps", "many"), ["--steps", "many"]),
    "sample_seed_too_large": lambda s: (["sample", s.run, "--out", s.inputs / "s.npy", "--seed", str(2**70)], ["--seed"]),
    # posterior commands
    "denoise_negative_sigma": lambda s: (["denoise", s.run, "--input", s.npy("y.npy", VECTORS[:3]), "--sigma", "-0.5",
                                          "--out", s.inputs / "d.npz"], ["--sigma"]),
    "inpaint_nan_mask": lambda s: (["inpaint", s.run, "--input", s.npy("x.npy", VECTORS[:3]), "--mask",
                                    s.npy("m.npy", np.array([1.0, np.nan])), "--out", s.inputs / "i.npz"],
                                   ["--mask", "NaN"]),
    "inpaint_empty_mask": lambda s: (["inpaint", s.run, "--input", s.npy("x.npy", VECTORS[:3]), "--mask",
                                      s.npy("m.npy", np.zeros(2)), "--out", s.inputs / "i.npz"], ["--mask", "no known"]),
    "denoise_input_header_garbled": lambda s: (["denoise", s.run, "--input", s.file("y.npy", b"\x93NUMPY\x01\x00\x01\x00{"),
                                                "--sigma", "0.5", "--out", s.inputs / "d.npz"], ["--input", "y.npy"]),
    "denoise_input_of_strings": lambda s: (["denoise", s.run, "--input", s.npy("y.npy", np.array([["a", "b"]])),
                                            "--sigma", "0.5", "--out", s.inputs / "d.npz"], ["--input", "numeric"]),
    "inpaint_mask_is_an_npz": lambda s: (["inpaint", s.run, "--input", s.npy("x.npy", VECTORS[:3]), "--mask",
                                          s.file("m.npy", _npz_bytes(m=np.ones(2))), "--out", s.inputs / "i.npz"],
                                         ["--mask", "m.npy", "npz"]),
}


def hostile(case):
    HOSTILE[case.__name__] = case
    return case


@hostile
def checkpoint_of_another_model(s: Scene):
    s.damage_checkpoint(record=lambda r: r | {"config": r["config"] | {"model": r["config"]["model"] | {"hidden": 16}}})
    return ["evaluate", s.run], [str(s.run), "does not match"]


@hostile
def checkpoint_of_another_version(s: Scene):
    record = {"format": FORMAT, "version": FORMAT_VERSION + 1}
    s.replace_checkpoint(save_safetensors({"w": torch.ones(1)}, metadata={"thermodiff": json.dumps(record)}))
    return ["sample", s.run, "--out", s.inputs / "s.npy"], [f"version {FORMAT_VERSION + 1}"]


@hostile
def checkpoint_without_config(s: Scene):
    s.damage_checkpoint(record=lambda r: {k: v for k, v in r.items() if k != "config"})
    return ["plot", s.run], ["'config'"]


@hostile
def checkpoint_truncated(s: Scene):
    s.replace_checkpoint((s.run / "checkpoint.safetensors").read_bytes()[:500])
    return ["evaluate", s.run], ["checkpoint.safetensors"]


@hostile
def resume_without_rng_state(s: Scene):
    s.damage_checkpoint(tensors=lambda t: {k: v for k, v in t.items() if not k.startswith("rng.")})
    return ["train", s.config, "--out", s.run, "--resume", "--steps", "30"], ["rng.noise"]


@hostile
def resume_with_another_optimizer_state(s: Scene):
    s.damage_checkpoint(record=lambda r: r | {"optimizer": {"param_groups": [], "scalars": {}}})
    return ["train", s.config, "--out", s.run, "--resume", "--steps", "30"], ["does not match"]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_is_a_one_line_error_that_changes_nothing(case, run_cli, copy_run, tmp_path, monkeypatch):
    scene = Scene(tmp_path, copy_run(), monkeypatch)
    args, needles = HOSTILE[case](scene)
    before = snapshot(tmp_path)
    result = run_cli(*args, "--quiet")
    assert_one_line_error(result, *needles)
    assert result.out == ""
    assert snapshot(tmp_path) == before, "the failed command changed files"
    assert not scene.marker.exists(), "pickled code was executed"


@pytest.mark.parametrize("args, needle", [(["train", "tiny.toml", "--stepz", "3"], "--stepz"), (["sample"], "run_dir"),
                                          (["trian"], "'trian'"), ([], "command")])
def test_usage_errors_are_one_line_too(args, needle, run_cli):
    """argparse's own errors (reported by the top-level parser when no command claims them)."""
    result = run_cli(*args)
    assert result.rc == 2 and result.err.count("\n") == 1 and result.err.startswith("thermodiff"), result
    assert needle in result.err and "usage:" not in result.err


# command -> (scene -> (arguments, the output that exists)); the extra arguments keep the runs
# that --overwrite lets through short
EXISTING = {
    "train": lambda s: (["train", s.config, "--out", s.run, "--steps", "2"], s.run),
    "reproduce": lambda s: (["reproduce", "swissroll", "--out", s.run, "--steps", "2", "--T", "6", "--set", "data.n=400",
                             "--set", "train.batch_size=64", "--max-examples", "20", "--draws", "1"], s.run),
    "sample": lambda s: (["sample", s.run, "-n", "2", "--out", s.file("s.npy", "precious")], s.inputs / "s.npy"),
    "denoise": lambda s: (["denoise", s.run, "--input", s.npy("y.npy", VECTORS[:2]), "--sigma", "0.5", "-n", "1",
                           "--out", s.file("d.npz", "precious")], s.inputs / "d.npz"),
    "inpaint": lambda s: (["inpaint", s.run, "--input", s.npy("x.npy", VECTORS[:2]), "--mask", s.npy("m.npy", np.eye(2)[0]),
                           "-n", "1", "--out", s.file("i.npz", "precious")], s.inputs / "i.npz"),
    "plot": lambda s: (["plot", s.run, "--out", s.inputs], s.file("samples.png", "precious")),
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["refused", "overwrite"])
@pytest.mark.parametrize("command", EXISTING)
def test_an_existing_output_is_replaced_only_with_overwrite(command, overwrite, run_cli, copy_run, tmp_path, monkeypatch):
    scene = Scene(tmp_path, copy_run(), monkeypatch)
    args, existing = EXISTING[command](scene)
    before = snapshot(tmp_path)
    result = run_cli(*args, "--quiet", *(["--overwrite"] if overwrite else []))
    if not overwrite:
        assert_one_line_error(result, str(existing), "--overwrite")
        assert snapshot(tmp_path) == before
        return
    assert result.rc == 0, result
    target = existing / "checkpoint.safetensors" if existing.is_dir() else existing
    assert snapshot(tmp_path)[str(target.relative_to(tmp_path))] != before[str(target.relative_to(tmp_path))]


# --------------------------------------------------------------------------- 3. pickles disguised as checkpoints


PICKLES = {
    "torch_save_zip": lambda payload, path: torch.save(payload, path),  # what a .pt file is
    "torch_save_legacy": lambda payload, path: torch.save(payload, path, _use_new_zipfile_serialization=False),
    "pickle_protocol_0": lambda payload, path: path.write_bytes(pickle.dumps(payload, protocol=0)),
    "pickle_protocol_5": lambda payload, path: path.write_bytes(pickle.dumps(payload, protocol=5)),
}
UNSAFE_LOADS = {
    "torch_save_zip": lambda path: torch.load(open(path, "rb"), weights_only=False),
    "torch_save_legacy": lambda path: torch.load(open(path, "rb"), weights_only=False),
    "pickle_protocol_0": lambda path: pickle.loads(path.read_bytes()),
    "pickle_protocol_5": lambda path: pickle.loads(path.read_bytes()),
}
READERS = {  # every way a checkpoint is read
    "evaluate": lambda s: ["evaluate", s.run],
    "sample": lambda s: ["sample", s.run, "--out", s.inputs / "s.npy"],
    "plot": lambda s: ["plot", s.run, "--out", s.inputs / "figures"],
    "denoise": lambda s: ["denoise", s.run, "--input", s.npy("y.npy", VECTORS[:2]), "--sigma", "1"],
    "inpaint": lambda s: ["inpaint", s.run, "--input", s.npy("x.npy", VECTORS[:2]), "--mask", s.npy("m.npy", np.ones(2))],
    "parzen": lambda s: ["parzen", s.run],
    "train_resume": lambda s: ["train", s.config, "--out", s.run, "--resume", "--steps", "30"],
}


@pytest.mark.parametrize("kind", PICKLES)
def test_the_pickle_payload_is_live(kind, tmp_path):
    """Control: loaded the unsafe way, the payload of the next test does run code."""
    marker, path = tmp_path / "executed", tmp_path / "checkpoint.safetensors"
    PICKLES[kind]({"boom": _Boom(marker)}, path)
    UNSAFE_LOADS[kind](path)
    assert marker.is_dir()


@pytest.mark.parametrize("command", READERS)
@pytest.mark.parametrize("kind", PICKLES)
def test_a_pickle_disguised_as_a_checkpoint_is_refused_without_running(kind, command, run_cli, copy_run, tmp_path,
                                                                       monkeypatch):
    scene = Scene(tmp_path, copy_run(), monkeypatch)
    PICKLES[kind]({"model.w": torch.ones(2), "boom": _Boom(scene.marker)}, scene.run / "checkpoint.safetensors")
    args = READERS[command](scene)
    before = snapshot(tmp_path)
    message = assert_one_line_error(run_cli(*args, "--quiet"), "checkpoint.safetensors")
    assert "pickle" in message or kind == "pickle_protocol_0"  # protocol 0 has no magic bytes: just not safetensors
    assert not scene.marker.exists(), "pickled code was executed"
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- 4. numerical robustness


def _tiny(tmp_path, **train) -> Config:
    cfg = load_config(str(write_tiny_config(tmp_path)))
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def _poison(monkeypatch, bad_calls) -> None:
    """Make the training loss NaN at the given (1-based) calls."""
    real, calls = training.Objective.forward, itertools.count(1)

    def loss(*args, **kwargs):
        value, k = real(*args, **kwargs)
        return (value * math.nan, k) if next(calls) in bad_calls else (value, k)

    monkeypatch.setattr(training.Objective, "forward", loss)


def test_nonfinite_losses_are_skipped_and_counted(tmp_path, monkeypatch):
    _poison(monkeypatch, {3, 4, 12})
    summary = training.train(_tiny(tmp_path), tmp_path / "run", progress=False, device="cpu")
    tensors, meta = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["nonfinite_skipped"] == meta["nonfinite_skipped"] == metrics[-1]["nonfinite_skipped"] == 3
    assert [m["nonfinite_skipped"] for m in metrics] == [2, 2, 3, 3]  # logged at steps 5, 10, 15, 20
    assert meta["step"] == summary["steps"] == 20  # a skipped step still counts as a step
    assert all(bool(torch.isfinite(v).all()) for k, v in tensors.items() if v.is_floating_point())


def test_training_stops_after_max_nonfinite_losses_in_a_row(tiny_config, cli, tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(6, 100)))
    run = tmp_path / "run"
    result = cli("train", tiny_config, "--out", run, "--set", "train.max_nonfinite=4", "--quiet")
    assert_one_line_error(result, "step 9", "4 non-finite losses in a row", "train.lr", "train.grad_clip")
    tensors, meta = load_checkpoint(run / "checkpoint.safetensors")  # the last good weights, kept
    assert meta["step"] == 9 and meta["nonfinite_skipped"] == 4 and meta["nonfinite_in_a_row"] == 4
    assert all(bool(torch.isfinite(v).all()) for k, v in tensors.items() if v.is_floating_point())


@pytest.mark.parametrize("steps, max_minutes", [(23, 0.0), (10**9, 0.002)], ids=["steps", "time_budget"])
def test_training_ends_with_one_checkpoint_of_its_last_step(steps, max_minutes, tmp_path, monkeypatch):
    """Whether steps or train.max_minutes end it, the last step is logged and checkpointed, and
    no step is checkpointed twice (checkpoint_every = 10; 23 is not a multiple)."""
    saved, real = [], training.save_checkpoint

    def spy(path, tensors, meta):
        saved.append(meta["step"])
        real(path, tensors, meta)

    monkeypatch.setattr(training, "save_checkpoint", spy)
    summary = training.train(_tiny(tmp_path, steps=steps, max_minutes=max_minutes), tmp_path / "run", progress=False,
                             device="cpu")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < summary["steps"] < 10**9 and (summary["steps"] == 23 or max_minutes)
    assert saved[-1] == metrics[-1]["step"] == summary["steps"]
    assert saved == sorted(set(saved)), saved


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_gradient_clipping_bounds_the_gradient_norm(grad_clip, tmp_path, monkeypatch):
    norms, real = [], torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = real(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        norms.append((float(total), float(after)))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    training.train(_tiny(tmp_path, grad_clip=grad_clip), tmp_path / "run", progress=False, device="cpu")
    if grad_clip == 0:
        assert norms == []  # off
        return
    assert len(norms) == 20  # every step
    assert all(after <= grad_clip * (1 + 1e-5) for _, after in norms)
    assert sum(total > grad_clip for total, _ in norms) >= 10  # and it was active


class _LargeAndSmallTerms:
    """A process whose terms are float32: a prior term of 1e8 nats and T - 1 terms of 1 nat,
    which float32 cannot add (its spacing at 1e8 is 8)."""

    T = 1001

    def prior_kl(self, x0, *args, **kwargs):
        return torch.full((len(x0),), 1e8, dtype=torch.float32)

    def reverse_kl(self, model, x0, *args, **kwargs):
        return torch.ones(len(x0), dtype=torch.float32)

    def decoder_log_likelihood(self, model, x0, *args, **kwargs):
        return torch.zeros(len(x0), dtype=torch.float32)


def test_the_bound_is_accumulated_in_float64():
    assert torch.tensor(1e8, dtype=torch.float32) + 1 == 1e8  # what float32 would do
    bound = exact_bound(_LargeAndSmallTerms(), None, [torch.zeros(3, 2)], n_draws=1)
    assert bound.per_example.dtype == bound.terms.dtype == torch.float64
    assert bound.per_example.tolist() == [-(1e8 + 1000)] * 3
    assert float(bound.terms.sum()) == 1e8 + 1000


def test_cpu_clock_budget_counts_the_process_cpu_seconds_across_a_resume(tmp_path, monkeypatch):
    """train.clock = cpu: the budget and elapsed_s count that clock's seconds (here a fake CPU clock
    that advances one second per training step, so wall time plays no part), and a resume counts on."""
    seconds, real = [0.0], training.Objective.forward

    def step_costs_a_second(*args, **kwargs):
        seconds[0] += 1.0
        return real(*args, **kwargs)

    monkeypatch.setattr(training.Objective, "forward", step_costs_a_second)
    monkeypatch.setitem(training.CLOCKS, "cpu", lambda: seconds[0])
    cfg = _tiny(tmp_path, steps=10**9, max_minutes=0.25, clock="cpu")
    assert training.train(cfg, tmp_path / "run", progress=False, device="cpu")["steps"] == 15
    assert load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")[1]["elapsed_s"] == 15.0
    more = training.train(cfg, tmp_path / "run", resume=True, progress=False, device="cpu", max_minutes=0.5)
    assert more["steps"] == 30
    assert load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")[1]["elapsed_s"] == 30.0
