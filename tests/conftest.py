"""Shared fixtures for the user-facing tests: a tiny, fast experiment config (Swiss roll, 400
points, T = 6, a couple of dozen steps), a helper that runs the CLI in-process, and one trained
run that read-only tests share (tests that change a run work on their own copy); and a tiny
8 x 8 image config. Every test runs on the CPU unless it names another device."""

import contextlib
import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from thermodiff.cli import main
from thermodiff.data.images import dead_leaves

TINY_N = 400
TINY_TEST_FRACTION = 0.25
TINY_SEED = 0
TINY_STEPS = 20
TINY_MAX_EXAMPLES = 40

TINY_TOML = f"""\
name = "tiny"
seed = {TINY_SEED}

[data]
source = "swissroll"
n = {TINY_N}
test_fraction = {TINY_TEST_FRACTION}
scaling = "global"

[diffusion]
kind = "auto"
T = 6
schedule = "reference"
parameterization = "reference"

[model]
network = "rbf"
hidden = 8

[train]
steps = {TINY_STEPS}
batch_size = 64
lr = 3e-3
checkpoint_every = 10
log_every = 5

[eval]
n_draws = 1
batch_size = 500
max_examples = {TINY_MAX_EXAMPLES}
"""


def write_tiny_config(folder: Path, text: str = TINY_TOML) -> Path:
    path = Path(folder) / "tiny.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def auto_device_is_the_cpu(request, monkeypatch):
    """``--device auto`` is the CPU in every test but tests/test_devices.py's (which names its
    devices), so that a machine with a GPU checks the figures a machine without one does: a GPU
    draws other noise."""
    if request.module.__name__ != "test_devices":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    """tiny.toml in this test's tmp_path."""
    return write_tiny_config(tmp_path)


class CliResult:
    def __init__(self, rc: int, out: str, err: str):
        self.rc, self.out, self.err = rc, out, err

    def json(self) -> dict:
        """stdout as exactly one JSON object (strict: no NaN / Infinity, nothing after it)."""
        def refuse(constant):
            raise AssertionError(f"stdout is not strict JSON: it contains {constant}")

        value = json.loads(self.out, parse_constant=refuse)
        assert isinstance(value, dict), f"stdout is JSON but not one object: {self.out[:200]!r}"
        return value

    def __repr__(self):
        return f"CliResult(rc={self.rc}, out={self.out[-500:]!r}, err={self.err[-1500:]!r})"


@pytest.fixture
def cli(capsys):
    """cli(*args) runs ``thermodiff ARGS`` in-process and returns its exit code (argparse's exit on
    a bad flag value included, as the console script's), stdout, stderr."""
    def run(*args) -> CliResult:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
        out, err = capsys.readouterr()
        return CliResult(rc, out, err)

    return run


def assert_one_line_error(result: CliResult, *needles: str) -> str:
    """Exit code 2, and stderr exactly one line (no traceback) that mentions every needle."""
    assert result.rc == 2, result
    assert "Traceback" not in result.err, result
    assert result.err.endswith("\n") and result.err.count("\n") == 1, f"stderr is not one line: {result.err!r}"
    assert result.err.startswith("thermodiff "), result.err
    for needle in needles:
        assert needle in result.err, f"{needle!r} not in {result.err!r}"
    return result.err


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> dict:
    """One tiny Swiss roll run, trained once per session through the CLI. Do not modify it:
    copy it with ``copy_run`` first. Returns {"config", "run_dir", "summary"}."""
    folder = tmp_path_factory.mktemp("shared_run")
    config = write_tiny_config(folder)
    run_dir = folder / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["train", str(config), "--out", str(run_dir), "--quiet", "--json", "--device", "cpu"])
    assert rc == 0, err.getvalue()
    return {"config": config, "run_dir": run_dir, "summary": json.loads(out.getvalue())}


@pytest.fixture
def copy_run(trained_run, tmp_path):
    """A private copy of the shared run (for tests that write into or damage a run), without
    what evaluate and plot may have added to the shared one."""
    def copy(name: str = "run_copy") -> Path:
        target = tmp_path / name
        shutil.copytree(trained_run["run_dir"], target, ignore=shutil.ignore_patterns("evaluation.json", "*.png"))
        return target

    return copy


TINY_IMAGES = """
name = "tiny_images"
seed = 1
[data]
source = "{source}"
test_fraction = 0.25
[diffusion]
T = 6
[model]
network = "conv"
preset = "small"
[train]
steps = 4
batch_size = 16
checkpoint_every = 2
[eval]
n_draws = 1
"""


def write_tiny_images(folder: Path) -> Path:
    """A config for 48 dead-leaves images of 8 x 8 (an .npz of grey images), T = 6, the small conv
    net, written with its data into ``folder``."""
    images = dead_leaves(48, size=8, seed=3)  # uint8 (48, 1, 8, 8)
    np.savez(folder / "images.npz", images=images[:, 0])  # (N, H, W): one grey channel
    config = folder / "tiny_images.toml"
    config.write_text(TINY_IMAGES.format(source=folder / "images.npz"))
    return config


@pytest.fixture
def tiny_images(tmp_path) -> Path:
    """:func:`write_tiny_images` in this test's tmp_path."""
    return write_tiny_images(tmp_path)


def load_benchmark(name: str) -> ModuleType:
    """The script benchmarks/NAME.py as a module, to test its functions without running it (with
    benchmarks/ on sys.path, as when it runs, for its sibling modules)."""
    folder = str(Path(__file__).resolve().parent.parent / "benchmarks")
    if folder not in sys.path:
        sys.path.append(folder)
    spec = importlib.util.spec_from_file_location(name, Path(folder) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
