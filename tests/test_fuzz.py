"""Property-based tests (hypothesis) of everything that reads user bytes: the array loaders
(.npy, .npz, .csv), image files and folders, MNIST IDX, CIFAR-10 binary and python batches,
checkpoints, and the config parser with its --set overrides. Random bytes, valid files with
random damage, and random arrays of random shapes and dtypes must give either a correct load
or a one-line UserError naming the file, never another exception and never a hang.

The examples are derandomised (the suite is reproducible) and not stored."""

import contextlib
import dataclasses
import gzip
import io
import math
import signal
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from test_image_data import cifar_pickle, cifar_records, idx_bytes

from thermodiff.data.dataset import load_array
from thermodiff.data.images import load_cifar10, load_image_folder, load_mnist, read_idx
from thermodiff.errors import UserError
from thermodiff.run.checkpoint import load_checkpoint, save_checkpoint
from thermodiff.run.config import Config, load_config, parse_override

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HANG_S = 20  # far beyond any load of these small files


@contextlib.contextmanager
def no_hang(seconds: float = HANG_S):
    """Fail (instead of waiting for ever) when the block runs longer than ``seconds``."""
    def expire(signum, frame):
        raise AssertionError(f"no result after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_or_user_error(load, *args, names: tuple[str, ...] = ()):
    """``load(*args)``'s result, or None after a UserError that is one line and mentions one of
    ``names``; any other exception fails the test."""
    try:
        with no_hang():
            return load(*args)
    except UserError as e:
        message = str(e)
        assert "\n" not in message, message
        assert not names or any(n in message for n in names), f"{message!r} names none of {names}"
        return None


# --------------------------------------------------------------------------- byte strategies


def _png(mode: str) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    shape = (4, 4) if mode == "L" else (4, 4, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, "PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _checkpoint() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.safetensors"
        save_checkpoint(path, {"w": torch.ones(2, 3), "rng.noise": torch.Generator().get_state()}, {"step": 3})
        return path.read_bytes()


VECTORS = np.arange(12.0).reshape(6, 2)
VALID = {
    ".npy": _npy(VECTORS),
    ".npz": _npz(x=VECTORS),
    ".csv": b"a,b\n1,2\n3,4\n5,6\n",
    ".png": _png("L"),
    "rgb.png": _png("RGB"),
    "idx": idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4)),
    "idx.gz": gzip.compress(idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))),
    "cifar.bin": cifar_records(2, seed=0)[0],
    "cifar.py": cifar_pickle(*cifar_records(2, seed=0)[1:], protocol=2),
    "checkpoint": _checkpoint(),
}


@st.composite
def damaged(draw, valid: bytes) -> bytes:
    """A valid file with a few random edits: truncation, overwritten, inserted or deleted bytes."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["truncate", "overwrite", "insert", "delete"]))
        if edit == "truncate":
            del data[at:]
        elif edit == "overwrite" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:at + draw(st.integers(1, 16))]
    return bytes(data)


def hostile_bytes(kind: str):
    """Random bytes, or a valid file of ``kind`` damaged at random (the more telling case)."""
    return st.one_of(st.binary(max_size=400), damaged(VALID[kind]))


def write(folder: str, name: str, data: bytes) -> Path:
    path = Path(folder) / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- array files


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".csv"])
@FUZZ
@given(data=st.data())
def test_array_files_of_hostile_bytes(suffix, data):
    raw = data.draw(hostile_bytes(suffix))
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, "data" + suffix, raw)
        x = load_or_user_error(load_array, path, names=(str(path),))
    if x is not None:
        assert x.dtype == np.float64 and x.ndim == 2 and len(x) >= 2 and np.isfinite(x).all()


DTYPES = st.sampled_from([np.float64, np.float32, np.float16, np.int64, np.int8, np.uint8, np.bool_, np.complex64,
                          np.dtype("U2"), np.dtype("M8[s]")])


@FUZZ
@given(x=hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)),
       container=st.sampled_from([".npy", ".npz"]))
def test_arrays_of_random_shapes_and_dtypes_load_exactly_or_are_refused(x, container):
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, "x" + container, _npy(x) if container == ".npy" else _npz(x=x))
        loaded = load_or_user_error(load_array, path, names=(str(path),))
    usable = (x.ndim == 2 and x.shape[0] >= 2 and x.shape[1] >= 1 and x.dtype.kind in "fiub"
              and np.isfinite(x.astype(np.float64)).all())
    assert (loaded is not None) == usable, (x.dtype, x.shape)
    if usable:
        np.testing.assert_array_equal(loaded, x.astype(np.float64))


@FUZZ
@given(x=hnp.arrays(DTYPES, hnp.array_shapes(min_dims=1, max_dims=5, min_side=0, max_side=4)))
def test_image_arrays_of_random_shapes_and_dtypes(x):
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, "images.npy", _npy(x))
        images = load_or_user_error(lambda p: load_array(p, images=True), path, names=(str(path),))
    if images is not None and x.ndim in (3, 4):  # other shapes are read as N x D arrays
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[1] in (1, 3) and min(images.shape) >= 1


# --------------------------------------------------------------------------- image files


@pytest.mark.parametrize("kind", [".png", "rgb.png"])
@FUZZ
@given(data=st.data())
def test_image_folders_with_a_hostile_file(kind, data):
    raw = data.draw(hostile_bytes(kind))
    with tempfile.TemporaryDirectory() as folder:
        write(folder, "a.png", VALID[".png"])
        bad = write(folder, "b.png", raw)
        images = load_or_user_error(load_image_folder, folder, names=(bad.name, folder))
    if images is not None:
        assert images.dtype == np.uint8 and images.shape == (2, 1, 4, 4)


# --------------------------------------------------------------------------- MNIST and CIFAR-10


@pytest.mark.parametrize("kind", ["idx", "idx.gz"])
@FUZZ
@given(data=st.data())
def test_idx_files_of_hostile_bytes(kind, data):
    raw = data.draw(hostile_bytes(kind))
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, "t10k-images-idx3-ubyte" + (".gz" if kind.endswith(".gz") else ""), raw)
        x = load_or_user_error(read_idx, path, names=(str(path),))
        if x is not None:
            assert isinstance(x, np.ndarray) and x.ndim >= 1
            # the same bytes as MNIST test images: loaded only if they are images of 28 x 28
            write(folder, "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(len(x), np.uint8)))
            loaded = load_or_user_error(load_mnist, folder, "test", names=(folder,))
            assert (loaded is not None) == (x.dtype == np.uint8 and x.shape[1:] == (28, 28))


@pytest.mark.parametrize("version", ["binary", "python"])
@FUZZ
@given(data=st.data())
def test_cifar_batches_of_hostile_bytes(version, data):
    raw = data.draw(hostile_bytes("cifar.bin" if version == "binary" else "cifar.py"))
    with tempfile.TemporaryDirectory() as folder:
        batches = Path(folder) / ("cifar-10-batches-bin" if version == "binary" else "cifar-10-batches-py")
        batches.mkdir()
        path = write(batches, "test_batch" + (".bin" if version == "binary" else ""), raw)
        loaded = load_or_user_error(load_cifar10, folder, "test", version, names=(str(path), str(batches)))
    if loaded is not None:
        images, labels, _ = loaded
        assert images.dtype == np.uint8 and images.shape[1:] == (3, 32, 32) and len(labels) == len(images)
        assert labels.min() >= 0 and labels.max() <= 9


# --------------------------------------------------------------------------- checkpoints


@FUZZ
@given(data=st.data())
def test_checkpoints_of_hostile_bytes(data):
    raw = data.draw(hostile_bytes("checkpoint"))
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, "checkpoint.safetensors", raw)
        loaded = load_or_user_error(load_checkpoint, path, names=(str(path),))
    if loaded is not None:
        tensors, record = loaded
        assert all(torch.is_tensor(v) for v in tensors.values()) and record["format"] == "thermodiff-checkpoint"


# --------------------------------------------------------------------------- configs


def _sections() -> dict[str, list[str]]:
    """The config's keys: '' -> top-level scalars, section -> its keys (every section, so a new
    one is fuzzed too)."""
    default = Config()
    keys = {"": []}
    for f in dataclasses.fields(Config):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            keys[f.name] = [g.name for g in dataclasses.fields(value)]
        else:
            keys[""].append(f.name)
    return keys


SECTIONS = _sections()
KNOWN_KEYS = [f"{s}.{k}" if s else k for s, ks in SECTIONS.items() for k in ks]
NAMES = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(string.ascii_letters + "._-", min_size=1, max_size=12))
SCALARS = st.one_of(
    st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=10), st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.sampled_from(["n_conv_layers", "x"]), st.integers(-3, 3), max_size=2),
)


def toml_value(value) -> str:
    """``value`` written as TOML (floats as TOML spells them, strings escaped)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


@st.composite
def toml_documents(draw) -> str:
    """A config file: known or random keys, in known or random sections, with values of any type."""
    lines = [f"{draw(NAMES).split('.')[-1] or 'x'} = {toml_value(draw(SCALARS))}" for _ in range(draw(st.integers(0, 2)))]
    for section in draw(st.lists(st.one_of(st.sampled_from(list(SECTIONS)[1:]), NAMES), max_size=3, unique=True)):
        lines.append(f"[{section}]")
        keys = SECTIONS.get(section, []) + ["bogus"]
        for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
            lines.append(f"{key} = {toml_value(draw(SCALARS))}")
    return "\n".join(lines) + "\n"


OVERRIDES = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={toml_value(v)}", NAMES, SCALARS),  # well-formed, any key and type
    st.builds(lambda k, v: f"{k}={v}", NAMES, st.text(max_size=12)),  # bare words and broken TOML
    st.text(max_size=20),  # anything at all
), max_size=4)


@FUZZ
@given(document=st.one_of(toml_documents(), st.text(max_size=200)), overrides=OVERRIDES)
def test_configs_and_overrides_load_validated_or_are_refused(document, overrides):
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, "fuzz.toml", document.encode("utf-8"))
        cfg = load_or_user_error(load_config, str(path), overrides)
    if cfg is not None:
        cfg.validate()  # every range holds
        assert Config.from_dict(cfg.to_dict()) == cfg  # and what a checkpoint stores reads back the same


@FUZZ
@given(text=st.text(max_size=40))
def test_set_parser_accepts_or_refuses_any_text(text):
    parsed = load_or_user_error(parse_override, text, names=("--set",))
    if parsed is not None:
        keys, _ = parsed
        assert "=" in text and keys == text.split("=", 1)[0].strip().split(".")


def test_deeply_nested_values_are_refused_not_a_recursion_error(tmp_path):
    nested = "[" * 5000 + "]" * 5000
    path = tmp_path / "deep.toml"
    path.write_text(f"seed = {nested}\n")
    assert load_or_user_error(load_config, str(path), names=(str(path),)) is None
    assert load_or_user_error(parse_override, f"seed={nested}", names=("--set",)) is None
