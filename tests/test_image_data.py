"""Image data: official MNIST / CIFAR-10 formats written here byte by byte and parsed back
exactly, bad files as one-line UserErrors, md5 checks, a mocked download (never the network),
refused malicious pickles and tar members, dead leaves, texture crops, image files and
folders, and the dequantisation formula. Tests on the real data in ../shared/data skip when it
is absent."""

import dataclasses
import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from thermodiff.data import images as image_data
from thermodiff.data.dataset import load_array
from thermodiff.data.images import (
    DATASETS,
    dead_leaves,
    ensure_dataset,
    from_unit_float,
    load_cifar10,
    load_grey_image,
    load_image_folder,
    load_mnist,
    md5_of,
    pixel_log_jacobian,
    psnr_db,
    read_idx,
    restricted_unpickle,
    safe_extract_tar,
    texture_crops,
    texture_regions,
    to_unit_float,
)
from thermodiff.errors import UserError
from thermodiff.run.config import load_config
from thermodiff.run.experiment import load_splits

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data from the project root
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared real data folder absent")

# --------------------------------------------------------------------------- writers of the official formats


def idx_bytes(a: np.ndarray) -> bytes:
    """An IDX file: 0, 0, type code 0x08 (ubyte), ndim, big-endian uint32 dims, then the data."""
    assert a.dtype == np.uint8
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write_mnist(folder: Path, n_train=7, n_test=3, compress=True, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            raw = idx_bytes(arr)
            name = f"{prefix}-{kind}" + (".gz" if compress else "")
            (folder / name).write_bytes(gzip.compress(raw) if compress else raw)
        out[split] = (images, labels)
    return out


def cifar_records(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """n binary CIFAR records (label byte, then R, G, B planes of 32 x 32) and what they hold."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    raw = b"".join(bytes([labels[i]]) + images[i, 0].tobytes() + images[i, 1].tobytes() + images[i, 2].tobytes()
                   for i in range(n))
    return raw, images, labels.astype(np.int64)


def write_cifar_bin(folder: Path, n=4, test_name="test_batch.bin") -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    train = [cifar_records(n, seed=i) for i in range(1, 6)]
    for i, (raw, _, _) in enumerate(train, 1):
        (folder / f"data_batch_{i}.bin").write_bytes(raw)
    raw, images, labels = cifar_records(n + 1, seed=99)
    (folder / test_name).write_bytes(raw)
    return {"train": (np.concatenate([t[1] for t in train]), np.concatenate([t[2] for t in train])),
            "test": (images, labels)}


def cifar_pickle(images: np.ndarray, labels: np.ndarray, protocol: int) -> bytes:
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [int(v) for v in labels],
             b"data": images.reshape(len(images), -1), b"filenames": [b"x_%d.png" % i for i in range(len(images))]}
    return pickle.dumps(batch, protocol=protocol)


def py2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """What the official files look like: a Python 2 cPickle (protocol 2) with 8-bit strings and
    numpy's old module name ``numpy.core.multiarray``, assembled opcode by opcode."""
    def s(b: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING: a Python 2 str
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b

    def i(v: int) -> bytes:
        if 0 <= v < 256:
            return b"K" + bytes([v])
        return b"M" + struct.pack("<H", v) if 0 <= v < 65536 else b"J" + struct.pack("<i", v)

    arr = (b"cnumpy.core.multiarray\n_reconstruct\n" b"cnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
           + b"(" + i(1) + i(data.shape[0]) + i(data.shape[1]) + b"\x86"
           + b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
           + b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb"
           + b"\x89" + s(data.tobytes()) + b"tb")
    lab = b"](" + b"".join(i(v) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + arr + s(b"labels") + lab + s(b"batch_label") + s(b"batch 1") + b"u."


def patch_md5s(monkeypatch, name: str, folder: Path | None = None, archive: Path | None = None, **changes):
    """Point DATASETS[name]'s md5 table at our fake files (the official md5s cannot match them)."""
    source = DATASETS[name]
    if folder is not None:
        changes["files"] = {f: md5_of(folder / f) for f in source.files}
    if archive is not None:
        changes["archive"] = (source.archive[0], md5_of(archive), source.archive[2])
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(source, **changes))


def fake_server(monkeypatch, files: dict[str, Path]) -> list[str]:
    """Replace download_file by a copy from local files (keyed by the URL's last part); returns
    the list of URLs asked for."""
    asked = []

    def fetch(url: str, dest: Path, timeout: float = 60.0) -> None:
        asked.append(url)
        name = url.rsplit("/", 1)[-1]
        if name not in files:
            raise UserError(f"{url}: download failed (404)")
        shutil.copyfile(files[name], dest)

    monkeypatch.setattr(image_data.official, "download_file", fetch)
    return asked


def no_network(monkeypatch):
    def fail(url, dest, timeout=60.0):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(image_data.official, "download_file", fail)


# --------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_round_trip(tmp_path, compress):
    truth = write_mnist(tmp_path / "mnist", compress=compress)
    for split in ("train", "test"):
        for where in (tmp_path, tmp_path / "mnist"):  # the folder itself or its parent
            images, labels = load_mnist(where, split)
            assert images.shape == (len(truth[split][0]), 1, 28, 28) and images.dtype == np.uint8
            np.testing.assert_array_equal(images[:, 0], truth[split][0])
            np.testing.assert_array_equal(labels, truth[split][1])
            assert labels.dtype == np.int64


def test_read_idx_other_types_and_big_endian(tmp_path):
    a = np.arange(-6, 6, dtype=">i4").reshape(3, 4)
    path = tmp_path / "x.idx"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 3, 4) + a.tobytes())
    np.testing.assert_array_equal(read_idx(path), np.arange(-6, 6).reshape(3, 4))


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_truncated_or_padded_file_is_a_user_error(tmp_path, compress):
    write_mnist(tmp_path, compress=False)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    for damaged, needle in ((raw[:-5], "truncated"), (raw + b"\0", "trailing"), (raw[:10], "truncated")):
        for p in tmp_path.glob("train-images*"):
            p.unlink()
        name = "train-images-idx3-ubyte" + (".gz" if compress else "")
        (tmp_path / name).write_bytes(gzip.compress(damaged) if compress else damaged)
        with pytest.raises(UserError, match=needle) as e:
            load_mnist(tmp_path, "train")
        assert name in str(e.value) and "\n" not in str(e.value)


def test_mnist_corrupt_gzip_and_bad_magic(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-100])  # gzip stream cut short
    with pytest.raises(UserError, match="gzip") as e:
        load_mnist(tmp_path, "train")
    assert str(path) in str(e.value)
    path.write_bytes(gzip.compress(b"\x00\x00\x07\x03" + b"\0" * 100))  # unknown type code
    with pytest.raises(UserError, match="magic"):
        load_mnist(tmp_path, "train")
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 27, 28), np.uint8))))  # wrong image size
    with pytest.raises(UserError, match="28, 28"):
        load_mnist(tmp_path, "train")


def test_mnist_label_problems(tmp_path):
    write_mnist(tmp_path, n_train=7)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(6, np.uint8))))
    with pytest.raises(UserError, match="6 labels for the 7 images"):
        load_mnist(tmp_path, "train")
    labels.write_bytes(gzip.compress(idx_bytes(np.full(7, 10, np.uint8))))
    with pytest.raises(UserError, match="outside 0..9"):
        load_mnist(tmp_path, "train")


def test_mnist_missing_and_bad_split(tmp_path):
    with pytest.raises(UserError, match="--download"):
        load_mnist(tmp_path, "train")
    with pytest.raises(UserError, match="split"):
        load_mnist(tmp_path, "validation")


# --------------------------------------------------------------------------- CIFAR-10 binary


def test_cifar_binary_round_trip_and_plane_order(tmp_path):
    truth = write_cifar_bin(tmp_path / "cifar-10-batches-bin")
    for where in (tmp_path, tmp_path / "cifar-10-batches-bin"):
        for split in ("train", "test"):
            images, labels, info = load_cifar10(where, split)
            np.testing.assert_array_equal(images, truth[split][0])
            np.testing.assert_array_equal(labels, truth[split][1])
            assert images.dtype == np.uint8 and info["version"] == "binary" and info["complete"]
    # byte k of a record's pixels is plane k // 1024, row (k % 1024) // 32, column k % 32
    raw = (tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin").read_bytes()
    images, _, _ = load_cifar10(tmp_path, "train")
    for c, r, col in ((0, 0, 1), (1, 5, 7), (2, 31, 30)):
        assert images[0, c, r, col] == raw[1 + c * 1024 + r * 32 + col]
    assert images[1, 2, 3, 4] == raw[3073 + 1 + 2 * 1024 + 3 * 32 + 4]


def test_cifar_binary_truncated_and_bad_label(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar_bin(folder)
    path = folder / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(UserError, match="3073") as e:
        load_cifar10(tmp_path, "train")
    assert "data_batch_3.bin" in str(e.value)
    raw, _, _ = cifar_records(2, seed=0)
    path.write_bytes(bytes([10]) + raw[1:])
    with pytest.raises(UserError, match="0..9"):
        load_cifar10(tmp_path, "train")
    path.unlink()
    with pytest.raises(UserError, match="data_batch_3.bin"):
        load_cifar10(tmp_path, "train")


def test_cifar_partial_test_batch_is_accepted_and_reported(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"  # the shared copy's layout
    truth = write_cifar_bin(folder, test_name=image_data.CIFAR10_PARTIAL_TEST)
    images, labels, info = load_cifar10(tmp_path, "test")
    np.testing.assert_array_equal(images, truth["test"][0])
    assert not info["complete"] and info["files"] == [image_data.CIFAR10_PARTIAL_TEST] and "1000" in info["note"]
    write_cifar_bin(folder)  # a complete test batch is preferred
    _, _, info = load_cifar10(tmp_path, "test")
    assert info["complete"] and info["files"] == ["test_batch.bin"] and info["note"] is None


# --------------------------------------------------------------------------- CIFAR-10 python (pickles)


def write_cifar_py(folder: Path, protocol: int, n=3) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    out = {"train": ([], [])}
    for i in range(1, 6):
        _, images, labels = cifar_records(n, seed=i)
        (folder / f"data_batch_{i}").write_bytes(cifar_pickle(images, labels, protocol))
        out["train"][0].append(images)
        out["train"][1].append(labels)
    _, images, labels = cifar_records(n, seed=50)
    (folder / "test_batch").write_bytes(cifar_pickle(images, labels, protocol))
    out["train"] = (np.concatenate(out["train"][0]), np.concatenate(out["train"][1]))
    out["test"] = (images, labels)
    return out


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_python_round_trip(tmp_path, protocol):
    truth = write_cifar_py(tmp_path / "cifar-10-batches-py", protocol)
    for split in ("train", "test"):
        images, labels, info = load_cifar10(tmp_path, split)
        np.testing.assert_array_equal(images, truth[split][0])
        np.testing.assert_array_equal(labels, truth[split][1])
        assert info["version"] == "python"


def test_cifar_python_2_pickle_like_the_official_files(tmp_path):
    _, images, labels = cifar_records(4, seed=3)
    payload = py2_cifar_pickle(images.reshape(4, -1), labels.tolist())
    assert pickle.loads(payload, encoding="latin1")["data"].shape == (4, 3072)  # the payload is a real pickle
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(payload)
    got, got_labels, _ = load_cifar10(tmp_path, "test", version="python")
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(got_labels, labels)


class _OpenFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


class _System:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _Exec:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_OpenFile, _System, _Exec])
@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_malicious_pickle_is_refused_without_running(tmp_path, payload, protocol):
    # the payload is live: plain pickle would create the marker
    live = tmp_path / "live_marker"
    made = pickle.loads(pickle.dumps({b"data": payload(live)}, protocol=protocol))[b"data"]
    if hasattr(made, "close"):
        made.close()
    assert live.exists()

    marker = tmp_path / "marker"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _, images, labels = cifar_records(2, seed=0)
    evil = {b"data": images.reshape(2, -1), b"labels": [int(v) for v in labels], b"x": payload(marker)}
    (folder / "test_batch").write_bytes(pickle.dumps(evil, protocol=protocol))
    with pytest.raises(UserError, match="refusing") as e:
        load_cifar10(tmp_path, "test")
    assert "test_batch" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_restricted_unpickler_refuses_other_globals():
    import collections

    for obj in (collections.OrderedDict(a=1), {1, 2}, np.float64(1.5), Path("x")):
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            restricted_unpickle(pickle.dumps(obj, protocol=2))
    assert restricted_unpickle(pickle.dumps({"a": [1, b"x", "y"]})) == {"a": [1, b"x", "y"]}


def test_cifar_python_corrupt_and_wrong_structure(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_py(folder, protocol=2)
    path = folder / "test_batch"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="corrupt or truncated") as e:
        load_cifar10(tmp_path, "test")
    assert str(path) in str(e.value)
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(UserError, match="dict"):
        load_cifar10(tmp_path, "test")
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}))
    with pytest.raises(UserError, match="1 labels for 2 images"):
        load_cifar10(tmp_path, "test")
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [1, 2]}))
    with pytest.raises(UserError, match="uint8"):
        load_cifar10(tmp_path, "test")


# --------------------------------------------------------------------------- md5, downloads, tar


def test_md5_mismatch_names_file_and_both_sums(tmp_path, monkeypatch):
    write_mnist(tmp_path)  # official names, but not the official bytes
    no_network(monkeypatch)
    with pytest.raises(UserError) as e:
        ensure_dataset("mnist", tmp_path, download=True)  # present files are checked, not replaced
    message = str(e.value)
    bad = next(f for f in DATASETS["mnist"].files if f in message)
    assert DATASETS["mnist"].files[bad] in message and md5_of(tmp_path / bad) in message and "\n" not in message


def test_missing_data_without_download_says_what_to_do(tmp_path, monkeypatch):
    no_network(monkeypatch)
    for name in DATASETS:
        with pytest.raises(UserError, match="--download") as e:
            ensure_dataset(name, tmp_path / "nothing", download=False)
        assert "--data-dir" in str(e.value)
    with pytest.raises(UserError, match="unknown data set"):
        ensure_dataset("imagenet", tmp_path)


def test_mocked_mnist_download_end_to_end(tmp_path, monkeypatch):
    server = tmp_path / "server"
    truth = write_mnist(server)
    patch_md5s(monkeypatch, "mnist", folder=server)
    asked = fake_server(monkeypatch, {p.name: p for p in server.iterdir()})
    target = tmp_path / "data"
    folder = ensure_dataset("mnist", target, download=True)
    assert folder == target and len(asked) == 4
    assert all(u.startswith(DATASETS["mnist"].mirrors[0]) for u in asked)
    assert sorted(p.name for p in target.iterdir()) == sorted(DATASETS["mnist"].files)  # no temporary files left
    images, labels = load_mnist(folder, "test")
    np.testing.assert_array_equal(images[:, 0], truth["test"][0])
    np.testing.assert_array_equal(labels, truth["test"][1])
    # present now: verified, nothing downloaded
    no_network(monkeypatch)
    assert ensure_dataset("mnist", target) == target
    # one file deleted: only that one is fetched again
    asked = fake_server(monkeypatch, {p.name: p for p in server.iterdir()})
    (target / "t10k-labels-idx1-ubyte.gz").unlink()
    ensure_dataset("mnist", target, download=True)
    assert [u.rsplit("/", 1)[1] for u in asked] == ["t10k-labels-idx1-ubyte.gz"]


def test_mocked_download_tries_the_next_mirror(tmp_path, monkeypatch):
    server = tmp_path / "server"
    write_mnist(server)
    patch_md5s(monkeypatch, "mnist", folder=server, mirrors=("https://dead.invalid/", "https://alive.invalid/"))
    files = {p.name: p for p in server.iterdir()}
    asked = []

    def fetch(url, dest, timeout=60.0):
        asked.append(url)
        if "dead" in url:
            raise UserError(f"{url}: download failed (503)")
        shutil.copyfile(files[url.rsplit("/", 1)[1]], dest)

    monkeypatch.setattr(image_data.official, "download_file", fetch)
    ensure_dataset("mnist", tmp_path / "data", download=True)
    assert len(asked) == 8 and sum("alive" in u for u in asked) == 4


def test_mocked_download_with_wrong_md5_saves_nothing(tmp_path, monkeypatch):
    server = tmp_path / "server"
    write_mnist(server)
    patch_md5s(monkeypatch, "mnist", folder=server)
    expected = DATASETS["mnist"].files["train-images-idx3-ubyte.gz"]
    (server / "train-images-idx3-ubyte.gz").write_bytes(b"tampered")
    fake_server(monkeypatch, {p.name: p for p in server.iterdir()})
    target = tmp_path / "data"
    with pytest.raises(UserError) as e:
        ensure_dataset("mnist", target, download=True)
    message = str(e.value)
    assert "train-images-idx3-ubyte.gz" in message and expected in message
    assert hashlib.md5(b"tampered").hexdigest() in message
    assert not any(p.name.startswith("train-images") or p.suffix == ".part" for p in target.iterdir())


def make_tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def test_mocked_cifar_archive_download_end_to_end(tmp_path, monkeypatch):
    src = tmp_path / "src" / "cifar-10-batches-bin"
    truth = write_cifar_bin(src)
    archive = make_tar(tmp_path / "cifar-10-binary.tar.gz",
                       {f"cifar-10-batches-bin/{p.name}": p.read_bytes() for p in sorted(src.iterdir())})
    patch_md5s(monkeypatch, "cifar10", folder=src, archive=archive)
    asked = fake_server(monkeypatch, {"cifar-10-binary.tar.gz": archive})
    target = tmp_path / "data"
    folder = ensure_dataset("cifar10", target, download=True)
    assert asked == list(DATASETS["cifar10"].archive[2])
    assert folder == target / "cifar-10-batches-bin" and [p.name for p in target.iterdir()] == ["cifar-10-batches-bin"]
    images, labels, info = load_cifar10(target, "train")
    np.testing.assert_array_equal(images, truth["train"][0])
    np.testing.assert_array_equal(labels, truth["train"][1])
    # a batch damaged later is caught by the md5 check
    no_network(monkeypatch)
    (folder / "data_batch_2.bin").write_bytes((folder / "data_batch_1.bin").read_bytes())
    with pytest.raises(UserError, match="data_batch_2.bin.*md5"):
        ensure_dataset("cifar10", target)


def test_files_outside_the_md5_table_are_not_checked(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    write_cifar_bin(folder, test_name=image_data.CIFAR10_PARTIAL_TEST)
    patch_md5s(monkeypatch, "cifar10", files={f"data_batch_{i}.bin": md5_of(folder / f"data_batch_{i}.bin")
                                               for i in range(1, 6)} | {"test_batch.bin": "0" * 32})
    no_network(monkeypatch)
    assert ensure_dataset("cifar10", tmp_path) == folder


@pytest.mark.parametrize("bad", ["../evil.txt", "/tmp/thermodiff_evil_abs.txt", "cifar-10-batches-bin/../../evil.txt"])
def test_tar_path_traversal_is_refused(tmp_path, bad):
    archive = make_tar(tmp_path / "a.tar.gz", {"cifar-10-batches-bin/ok.bin": b"ok", bad: b"evil"})
    dest = tmp_path / "deep" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(UserError, match="refusing") as e:
        safe_extract_tar(archive, dest)
    assert bad in str(e.value)
    assert not any(dest.iterdir())  # nothing at all extracted
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/thermodiff_evil_abs.txt").exists()


def test_tar_links_are_refused_and_good_tars_extract(tmp_path):
    archive = make_tar(tmp_path / "l.tar.gz", {"a/x": b"1"}, links={"a/link": "/etc/passwd"})
    with pytest.raises(UserError, match="link"):
        safe_extract_tar(archive, tmp_path / "out")
    good = make_tar(tmp_path / "g.tar.gz", {"a/x": b"1", "a/b/y": b"22"})
    safe_extract_tar(good, tmp_path / "out2")
    assert (tmp_path / "out2" / "a" / "b" / "y").read_bytes() == b"22"
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(UserError, match="tar"):
        safe_extract_tar(tmp_path / "junk.tar.gz", tmp_path / "out3")


def test_download_with_a_traversing_archive_is_refused(tmp_path, monkeypatch):
    archive = make_tar(tmp_path / "cifar-10-binary.tar.gz", {"../../escaped.bin": b"x"})
    patch_md5s(monkeypatch, "cifar10", archive=archive)
    fake_server(monkeypatch, {"cifar-10-binary.tar.gz": archive})
    target = tmp_path / "a" / "data"
    with pytest.raises(UserError, match="refusing"):
        ensure_dataset("cifar10", target, download=True)
    assert not (tmp_path / "escaped.bin").exists() and not (tmp_path / "a" / "escaped.bin").exists()
    assert list(target.iterdir()) == []  # temporary archive and folder cleaned up


# --------------------------------------------------------------------------- dead leaves


def test_dead_leaves_determinism_and_range():
    a = dead_leaves(5, size=32, seed=3)
    assert a.shape == (5, 1, 32, 32) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, dead_leaves(5, size=32, seed=3))
    np.testing.assert_array_equal(a[:2], dead_leaves(2, size=32, seed=3))  # image i depends on (seed, i) only
    assert not np.array_equal(a, dead_leaves(5, size=32, seed=4))
    assert len(np.unique(a)) > 100  # 8-bit grey levels, many discs


def test_dead_leaves_pixels_match_a_brute_force_renderer():
    """Every pixel has the grey level of the first disc (front-most) whose disc holds its centre,
    and every pixel is covered."""
    size = 12
    images, info = dead_leaves(3, size=size, seed=7, return_info=True)
    assert (info["uncovered"] == 0).all() and (info["n_discs"] > 0).all()
    centres = np.arange(size) + 0.5
    for k in range(3):
        mine = info["image"] == k
        cx, cy, r, g = info["center"][mine, 0], info["center"][mine, 1], info["radius"][mine], info["grey"][mine]
        for i in range(size):
            for j in range(size):
                hits = np.nonzero((centres[i] - cx) ** 2 + (centres[j] - cy) ** 2 <= r ** 2)[0]
                assert len(hits) > 0
                assert images[k, 0, i, j] == g[hits[0]]


def test_dead_leaves_gives_up_after_max_discs():
    images, info = dead_leaves(2, size=32, seed=0, max_discs=20, return_info=True)
    assert (info["n_discs"] == 20).all() and (info["uncovered"] > 0).all()
    assert images.shape == (2, 1, 32, 32)
    with pytest.raises(UserError):
        dead_leaves(2, size=32, r_min=5, r_max=4)


def power_law_slope(r: np.ndarray, r_min: float, r_max: float, bins: int = 12) -> tuple[float, float]:
    """Slope of log density against log r from a log-binned histogram, by weighted least squares
    with Poisson weights (var log count = 1 / count); returns (slope, its standard error)."""
    edges = np.geomspace(r_min, r_max, bins + 1)
    counts, _ = np.histogram(r, edges)
    ok = counts >= 5
    x = np.log(np.sqrt(edges[:-1] * edges[1:]))[ok]
    y = np.log(counts[ok] / np.diff(edges)[ok])
    w = counts[ok].astype(float)
    xm = np.sum(w * x) / w.sum()
    slope = np.sum(w * (x - xm) * (y - np.sum(w * y) / w.sum())) / np.sum(w * (x - xm) ** 2)
    return float(slope), float(1 / np.sqrt(np.sum(w * (x - xm) ** 2)))


def test_dead_leaves_radii_follow_the_documented_power_law():
    """Discs whose centre lies inside the image are a uniform thinning of the Poisson process, so
    their radii have density ~ r^-3 on [1, size/2]. The fitted slope's standard error comes from
    the Poisson counts (about 0.01 with ~10^4 discs); we allow 5 of them."""
    size = 64
    _, info = dead_leaves(20, size=size, seed=11, return_info=True)
    c = info["center"]
    r = info["radius"][(c >= 0).all(1) & (c <= size).all(1)]
    assert len(r) > 5000 and r.min() >= 1 and r.max() <= size / 2
    slope, se = power_law_slope(r, 1, size / 2)
    assert abs(slope + 3) < 5 * se + 0.02, (slope, se)
    # and the check can tell another exponent apart
    _, info2 = dead_leaves(20, size=size, seed=11, exponent=2.0, return_info=True)
    c2 = info2["center"]
    slope2, se2 = power_law_slope(info2["radius"][(c2 >= 0).all(1) & (c2 <= size).all(1)], 1, size / 2)
    assert abs(slope2 + 2) < 5 * se2 + 0.02 and abs(slope2 + 3) > 0.5


# --------------------------------------------------------------------------- textures and image files


def test_texture_crops_train_and_test_regions_are_disjoint():
    image = np.random.default_rng(0).integers(0, 256, (100, 80), dtype=np.uint8)
    size, frac = 16, 0.25
    boundary = 100 - 25
    train, pos_train = texture_crops(image, 500, size, seed=1, region="train", test_fraction=frac,
                                     return_positions=True)
    test, pos_test = texture_crops(image, 500, size, seed=1, region="test", test_fraction=frac,
                                   return_positions=True)
    assert train.shape == test.shape == (500, 1, size, size) and train.dtype == np.uint8
    assert pos_train[:, 0].min() >= 0 and (pos_train[:, 0] + size).max() <= boundary
    assert pos_test[:, 0].min() >= boundary and (pos_test[:, 0] + size).max() <= 100
    assert pos_train[:, 0].max() == boundary - size  # the whole train region is used
    for crops, pos in ((train, pos_train), (test, pos_test)):
        for k in range(0, 500, 37):
            r, c = pos[k]
            np.testing.assert_array_equal(crops[k, 0], image[r:r + size, c:c + size])
    np.testing.assert_array_equal(train, texture_crops(image, 500, size, seed=1))
    with pytest.raises(UserError, match="too small"):
        texture_crops(image, 5, 30, region="test", test_fraction=0.25)
    with pytest.raises(UserError):
        texture_crops(image.astype(float), 5, 8)



def test_texture_validation_crops_come_from_a_band_of_their_own(tmp_path):
    """With data.val_fraction the validation crops lie in rows of their own, between the training
    and test regions (crops of one region overlap, so a random share of the training crops would
    not show a model that learned the region by heart); without it the training crops are as before."""
    image = np.random.default_rng(0).integers(0, 256, (120, 80), dtype=np.uint8)
    assert texture_regions(120, 0.25, 0.2) == {"train": (0, 72), "val": (72, 90), "test": (90, 120)}
    assert texture_regions(120, 0.25) == {"train": (0, 90), "val": (90, 90), "test": (90, 120)}
    _, rows = texture_crops(image, 300, 16, seed=1, region="val", test_fraction=0.25, val_fraction=0.2,
                            return_positions=True)
    assert rows[:, 0].min() >= 72 and (rows[:, 0] + 16).max() <= 90
    with pytest.raises(UserError, match="val region .* too small"):
        texture_crops(image, 5, 20, region="val", test_fraction=0.25, val_fraction=0.2)
    with pytest.raises(UserError, match="val_fraction"):
        texture_regions(120, 0.25, 1.0)

    Image.fromarray(image).save(tmp_path / "texture.png")
    cfg = load_config("bark_unet", [f"data.path={tmp_path / 'texture.png'}", "data.n=400", "data.size=16",
                                    "data.val_fraction=0.2"])
    train, test, val, _ = load_splits(cfg)
    assert (len(train), len(val), len(test)) == (240, 60, 100)
    band = image[72:90]  # every validation crop is a window of the band
    windows = {w.tobytes() for w in np.lib.stride_tricks.sliding_window_view(band, (16, 16)).reshape(-1, 16, 16)}
    assert all(crop[0].tobytes() in windows for crop in val)
    cfg.data.val_fraction = 0.0
    train0, _, val0, _ = load_splits(cfg)
    assert len(val0) == 0
    np.testing.assert_array_equal(train0, texture_crops(image, 300, 16, seed=cfg.seed, region="train"))

def test_load_grey_image_modes_and_errors(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    np.testing.assert_array_equal(load_grey_image(tmp_path / "g.png"), grey)
    rgba = np.stack([grey, grey, grey, np.full_like(grey, 255)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_grey_image(tmp_path / "rgba.png"), grey)
    Image.fromarray(grey).save(tmp_path / "g.jpg", quality=95)
    assert load_grey_image(tmp_path / "g.jpg").shape == (20, 30)
    colour = np.stack([grey, 255 - grey, grey], -1)
    Image.fromarray(colour).save(tmp_path / "c.png")
    with pytest.raises(UserError, match="colour"):
        load_grey_image(tmp_path / "c.png")
    assert load_grey_image(tmp_path / "c.png", allow_colour=True).shape == (20, 30)
    with pytest.raises(UserError, match="no such file"):
        load_grey_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match="bad.png"):
        load_grey_image(tmp_path / "bad.png")
    good = (tmp_path / "g.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="cut.png"):
        load_grey_image(tmp_path / "cut.png")


def test_load_image_folder_grey_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 10, 12), dtype=np.uint8)
    folder = tmp_path / "grey"
    folder.mkdir()
    for k, name in enumerate(["b.png", "a.PNG", "c.png"]):
        Image.fromarray(grey[k]).save(folder / name)
    (folder / "notes.txt").write_text("ignored")
    x = load_image_folder(folder)
    assert x.shape == (3, 1, 10, 12) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[:, 0], grey[[1, 0, 2]])  # sorted by name
    rgb = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    folder = tmp_path / "rgb"
    folder.mkdir()
    for k in range(2):
        Image.fromarray(rgb[k]).save(folder / f"{k}.png")
    np.testing.assert_array_equal(load_image_folder(folder), rgb.transpose(0, 3, 1, 2))
    Image.fromarray(rgb[0]).save(folder / "2.jpeg", quality=95)
    assert load_image_folder(folder).shape == (3, 3, 8, 8)


def test_load_image_folder_resize_and_centre_crop(tmp_path):
    tall = np.arange(20 * 10, dtype=np.uint8).reshape(20, 10)
    Image.fromarray(tall).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "b.png")
    x = load_image_folder(tmp_path, size=10)
    assert x.shape == (2, 1, 10, 10)
    np.testing.assert_array_equal(x[0, 0], tall[5:15])  # already 10 wide: only the centre crop
    assert load_image_folder(tmp_path, size=(6, 8)).shape == (2, 1, 6, 8)


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .png"):
        load_image_folder(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(mixed / "b.png")
    with pytest.raises(UserError, match="channels") as e:
        load_image_folder(mixed)
    assert "b.png" in str(e.value)
    sizes = tmp_path / "sizes"
    sizes.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(sizes / "a.png")
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(sizes / "b.png")
    with pytest.raises(UserError, match="b.png.*size"):
        load_image_folder(sizes)
    assert load_image_folder(sizes, size=4).shape == (2, 1, 4, 4)
    (sizes / "c.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="c.png"):
        load_image_folder(sizes, size=4)


def test_image_arrays_layouts_and_scales(tmp_path):
    """Image stacks in .npy / .npz files (``train images --data``) by the rules of validate_images."""
    rng = np.random.default_rng(0)
    v = rng.integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)
    cases = {
        "nchw.npy": v,
        "nhwc.npy": v.transpose(0, 2, 3, 1),
        "unit.npy": v.astype(np.float32) / 255,
        "f255.npy": v.astype(np.float64),
        "int64.npy": v.astype(np.int64),
    }
    for name, arr in cases.items():
        np.save(tmp_path / name, arr)
        np.testing.assert_array_equal(load_array(tmp_path / name, images=True), v, err_msg=name)
    np.save(tmp_path / "nhw.npy", v[:, 0])
    np.testing.assert_array_equal(load_array(tmp_path / "nhw.npy", images=True), v[:, :1])
    np.savez(tmp_path / "two.npz", images=v, other=np.zeros(3))
    np.testing.assert_array_equal(load_array(tmp_path / "two.npz", "images", images=True), v)
    with pytest.raises(UserError, match="name one"):
        load_array(tmp_path / "two.npz", images=True)
    with pytest.raises(UserError, match="no array"):
        load_array(tmp_path / "two.npz", "nope", images=True)
    # the documented tie-break: axis 1 of size 1 or 3 means channel-first
    amb = rng.integers(0, 256, (2, 3, 7, 3), dtype=np.uint8)
    np.save(tmp_path / "amb.npy", amb)
    np.testing.assert_array_equal(load_array(tmp_path / "amb.npy", images=True), amb)


def test_image_array_errors(tmp_path):
    bad = {
        "neg.npy": -np.ones((2, 4, 4)),
        "big.npy": np.full((2, 4, 4), 300.0),
        "nan.npy": np.full((2, 4, 4), np.nan),
        "chan.npy": np.zeros((2, 4, 5, 6)),
        "objects.npy": np.array([{"a": 1}, None], dtype=object),
    }
    for name, arr in bad.items():
        np.save(tmp_path / name, arr, allow_pickle=True)
        with pytest.raises(UserError) as e:
            load_array(tmp_path / name, images=True)
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="no such file"):
        load_array(tmp_path / "missing.npy", images=True)
    (tmp_path / "x.txt").write_text("1,2")
    with pytest.raises(UserError, match="unsupported"):
        load_array(tmp_path / "x.txt", images=True)


# --------------------------------------------------------------------------- dequantisation


def test_to_unit_float_formula_and_fresh_noise():
    v = torch.randint(0, 256, (2000, 1, 4, 4), dtype=torch.uint8)
    y1, y2 = to_unit_float(v), to_unit_float(v)
    assert y1.dtype == torch.float32 and y1.shape == v.shape
    w = y1.double() * 255 - v.double()  # = u - 0.5
    assert w.min() >= -0.5 - 1e-4 and w.max() < 0.5 + 1e-4
    assert abs(float(w.mean())) < 0.01 and abs(float(w.var()) - 1 / 12) < 0.005
    assert not torch.equal(y1, y2)  # fresh noise on each call
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(to_unit_float(v, g1), to_unit_float(v, g2))
    np.testing.assert_array_equal(from_unit_float(to_unit_float(v, dtype=torch.float64)), v.numpy())
    # float32 rounds a few values onto the upper edge v + 0.5 of their interval
    assert np.mean(from_unit_float(y1) != v.numpy()) < 1e-3
    assert to_unit_float(v.numpy()).shape == v.shape  # numpy input too
    with pytest.raises(UserError):
        to_unit_float(torch.tensor([0.5]))


def test_log_jacobian_with_a_known_gaussian_density():
    """A Gaussian N(mu, s^2) on y = w / 255 is N(255 mu, (255 s)^2) on pixel units w; its
    log-density there must be log p_y(y) + pixel_log_jacobian(D) = log p_y(y) - D log 255."""
    D = 7
    y = to_unit_float(torch.randint(0, 256, (50, D), dtype=torch.uint8), dtype=torch.float64)
    mu, s = torch.full((D,), 0.4, dtype=torch.float64), torch.linspace(0.1, 0.5, D, dtype=torch.float64)
    log_p_y = torch.distributions.Normal(mu, s).log_prob(y).sum(1)
    log_p_w = torch.distributions.Normal(255 * mu, 255 * s).log_prob(255 * y).sum(1)
    torch.testing.assert_close(log_p_w, log_p_y + pixel_log_jacobian(D))
    assert pixel_log_jacobian(D) == pytest.approx(-D * math.log(255))


def test_log_jacobian_with_uniform_pixels():
    """Pixels uniform on 0..255 dequantise to y uniform on [-0.5/255, 255.5/255), density 255/256
    per value; converted to pixel units that is 1/256, the exact probability of each pixel value
    (8 bits per dimension)."""
    D = 3
    v = torch.randint(0, 256, (200_000, D), dtype=torch.uint8)
    y = to_unit_float(v, torch.Generator().manual_seed(0), dtype=torch.float64)
    lo, hi = -0.5 / 255, 255.5 / 255
    assert float(y.min()) >= lo and float(y.max()) < hi
    counts, _ = np.histogram(y.numpy().ravel(), bins=50, range=(lo, hi))
    density = counts / (y.numel() * (hi - lo) / 50)
    expected = 255 / 256
    assert np.abs(density - expected).max() < 5 * expected / np.sqrt(counts.mean())  # flat up to Poisson noise
    log_p_y = D * math.log(expected)
    assert log_p_y + pixel_log_jacobian(D) == pytest.approx(D * math.log(1 / 256))


def test_psnr_of_a_known_error():
    # an error of one grey level everywhere: 20 log10(255); of 255 (black for white): 0 dB
    psnr = psnr_db(torch.tensor([1.0, 255.0**2], dtype=torch.float64))
    torch.testing.assert_close(psnr, torch.tensor([20 * math.log10(255), 0.0], dtype=torch.float64))


# --------------------------------------------------------------------------- real data (skipped when absent)


@needs_shared
def test_real_mnist_and_its_md5(monkeypatch):
    no_network(monkeypatch)
    assert ensure_dataset("mnist", SHARED) == SHARED / "mnist"
    for name, md5 in DATASETS["mnist"].files.items():
        assert md5_of(SHARED / "mnist" / name) == md5
    images, labels = load_mnist(SHARED, "train")
    assert images.shape == (60000, 1, 28, 28) and images.dtype == np.uint8
    assert labels.min() == 0 and labels.max() == 9 and labels[:5].tolist() == [5, 0, 4, 1, 9]
    images, labels = load_mnist(SHARED / "mnist", "test")
    assert images.shape == (10000, 1, 28, 28)


@needs_shared
def test_real_cifar10(monkeypatch):
    no_network(monkeypatch)
    folder = ensure_dataset("cifar10", SHARED)  # md5 of the five official batches; the partial test file unchecked
    images, labels, info = load_cifar10(SHARED, "train")
    assert images.shape == (50000, 3, 32, 32) and info["complete"]
    batch1 = image_data.official._read_cifar_bin(folder / "data_batch_1.bin")
    assert batch1[0].shape == (10000, 3, 32, 32) and set(batch1[1].tolist()) == set(range(10))
    assert batch1[1][:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    images, labels, info = load_cifar10(SHARED, "test")
    assert images.shape == (1000, 3, 32, 32) and not info["complete"] and "first 1000" in info["note"]


@needs_shared
def test_real_bark_texture():
    bark = load_grey_image(SHARED / "bark" / "D12_bark_usc_sipi_1.1.02_512.png")
    assert bark.shape == (512, 512) and bark.dtype == np.uint8 and bark.std() > 10
    assert load_grey_image(SHARED / "bark" / "bark_texturesynth_128.png").shape == (128, 128)  # RGBA, grey content
    crops = texture_crops(bark, 100, 28, seed=0, region="test")
    assert crops.shape == (100, 1, 28, 28)
