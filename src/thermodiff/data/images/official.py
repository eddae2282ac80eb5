"""Official MNIST and CIFAR-10 files: the md5 / URL table, md5 checks, verified downloads, safe
tar extraction, the MNIST IDX and CIFAR-10 (binary and python) readers, and the restricted
unpickler for the CIFAR-10 python pickles."""

import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from thermodiff.errors import UserError

# --------------------------------------------------------------------------- official files


@dataclass(frozen=True)
class DatasetSource:
    """Where a data set comes from and what its official files hash to.

    ``files``: file name -> official md5 of every file the loaders need, inside ``folder``
    (``None``: directly in the data folder). Either each file is downloaded from ``mirrors``
    (base URLs tried in order) or, when ``archive`` = (file name, md5, URLs) is set, the
    archive is downloaded and ``folder`` extracted from it."""

    description: str
    files: dict[str, str]
    folder: str | None = None
    mirrors: tuple[str, ...] = ()
    archive: tuple[str, str, tuple[str, ...]] | None = None


DATASETS: dict[str, DatasetSource] = {
    "mnist": DatasetSource(
        description="MNIST",
        files={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    ),
    "cifar10": DatasetSource(
        description="CIFAR-10 (binary version)",
        files={
            "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
            "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
            "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
            "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
            "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
            "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
        },
        folder="cifar-10-batches-bin",
        archive=("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530",
                 ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",)),
    ),
    "cifar10-python": DatasetSource(
        description="CIFAR-10 (python version)",
        files={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
        },
        folder="cifar-10-batches-py",
        archive=("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                 ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)),
    ),
}

# Not an official file: the first 1000 test records, accepted in place of test_batch.bin.
CIFAR10_PARTIAL_TEST = "test_batch_first1000.bin"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise UserError(f"split must be 'train' or 'test', got {split!r}")


def md5_of(path: str | Path) -> str:
    """The md5 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_md5(path: Path, expected: str) -> None:
    actual = md5_of(path)
    if actual != expected:
        raise UserError(f"{path}: md5 {actual} does not match the official {expected}; the file is corrupt "
                        "or incomplete: delete it and download it again (--download)")


def download_file(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Stream ``url`` into ``dest`` (which the caller removes on failure)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(f"{url}: download failed ({getattr(e, 'reason', e)})") from None


class _ChecksumMismatch(UserError):
    """A download whose md5 is wrong: not worth trying another mirror for."""


def _fetch_verified(urls: tuple[str, ...], md5: str, folder: Path, name: str) -> Path:
    """Download the first URL that works into a temporary file in ``folder`` and check its md5;
    returns the temporary file (the caller renames or deletes it)."""
    errors = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
        os.close(fd)
        tmp = Path(tmp)
        try:
            download_file(url, tmp)
            actual = md5_of(tmp)
            if actual != md5:
                raise _ChecksumMismatch(f"{name}: downloaded from {url} has md5 {actual}, expected {md5}; not saved")
            return tmp
        except _ChecksumMismatch:
            tmp.unlink(missing_ok=True)
            raise
        except UserError as e:
            tmp.unlink(missing_ok=True)
            errors.append(str(e))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    raise UserError(f"{name}: could not be downloaded ({'; '.join(errors)}); download it yourself and pass --data-dir")


def safe_extract_tar(archive: str | Path, dest: str | Path) -> list[str]:
    """Extract a tar archive into ``dest`` after checking every member: absolute paths, '..'
    components, links and device files are refused (nothing is written then). Returns the
    member names."""
    archive, dest = Path(archive), Path(dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                posix, windows = PurePosixPath(m.name), PureWindowsPath(m.name)
                if posix.is_absolute() or windows.is_absolute() or windows.drive or m.name.startswith(("/", "\\")) \
                        or ".." in posix.parts or ".." in windows.parts:
                    raise UserError(f"{archive}: refusing to extract member {m.name!r} (absolute path or '..')")
                if not (m.isfile() or m.isdir()):
                    raise UserError(f"{archive}: refusing to extract member {m.name!r} (a link or special file)")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python without extraction filters; the checks above still hold
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise UserError(f"{archive}: not a readable tar archive ({e})") from None
    return [m.name for m in members]


def _mnist_folder(data_dir: Path, split: str | None = None) -> Path | None:
    """The first of data_dir, data_dir/mnist, data_dir/MNIST/raw that holds MNIST files."""
    stems = _MNIST_FILES[split] if split else tuple(s for pair in _MNIST_FILES.values() for s in pair)
    for folder in (data_dir, data_dir / "mnist", data_dir / "MNIST" / "raw"):
        if any((folder / (s + ext)).is_file() for s in stems for ext in (".gz", "")):
            return folder
    return None


def _cifar_folder(data_dir: Path, version: str, probe: str) -> Path | None:
    """The first of data_dir/<batches folder>, data_dir/cifar10/<batches folder>, data_dir that
    holds a file of that version (binary: '.bin' suffix, python: none) whose name starts with
    ``probe``."""
    if not data_dir.is_dir():
        return None
    folder_name = DATASETS["cifar10" if version == "binary" else "cifar10-python"].folder
    for folder in (data_dir / folder_name, data_dir / "cifar10" / folder_name, data_dir):
        if folder.is_dir() and any(p.name.startswith(probe) and (p.suffix == ".bin") == (version == "binary")
                                   for p in folder.iterdir()):
            return folder
    return None


def _missing_files(name: str, folder: Path | None) -> list[str]:
    source = DATASETS[name]
    if folder is None:
        return list(source.files)
    missing = []
    for f in source.files:
        if (folder / f).is_file():
            continue
        if name == "mnist" and (folder / f.removesuffix(".gz")).is_file():
            continue  # uncompressed copy: fine, but not an official file to check
        if name == "cifar10" and f == "test_batch.bin" and (folder / CIFAR10_PARTIAL_TEST).is_file():
            continue
        missing.append(f)
    return missing


def _find_dataset(name: str, data_dir: Path) -> Path | None:
    if name == "mnist":
        return _mnist_folder(data_dir)
    return _cifar_folder(data_dir, "binary" if name == "cifar10" else "python", "data_batch_")


def ensure_dataset(name: str, data_dir: str | Path, download: bool = False) -> Path:
    """Make sure data set ``name`` ('mnist', 'cifar10' = binary version, 'cifar10-python') is in
    ``data_dir`` and return the folder holding its files (what the loaders accept).

    Files present are checked against the official md5 sums in :data:`DATASETS` (files not in
    that table, e.g. uncompressed MNIST or ``test_batch_first1000.bin``, are not checked).
    Missing files are downloaded only when ``download`` is true: to a temporary file, md5
    checked, archives extracted after their members are checked, then renamed into place."""
    if name not in DATASETS:
        raise UserError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    source = DATASETS[name]
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"{data_dir}: is a file, expected a folder for the {source.description} files")
    folder = _find_dataset(name, data_dir) if data_dir.is_dir() else None
    missing = _missing_files(name, folder)
    if missing and not download:
        where = source.archive[2][0] if source.archive else source.mirrors[0]
        raise UserError(f"{data_dir}: {source.description} not found (missing {', '.join(missing)}); pass --download "
                        f"to fetch it from {where}, or --data-dir to point at a folder that holds it")
    if folder is not None:
        for f, md5 in source.files.items():
            if (folder / f).is_file():
                _verify_md5(folder / f, md5)
    if not missing:
        return folder
    data_dir.mkdir(parents=True, exist_ok=True)
    if source.archive is None:
        folder = folder or data_dir
        for f in missing:
            tmp = _fetch_verified(tuple(m + f for m in source.mirrors), source.files[f], folder, f)
            os.replace(tmp, folder / f)
        return folder
    return _download_archive(name, data_dir, folder, missing)


def _download_archive(name: str, data_dir: Path, folder: Path | None, missing: list[str]) -> Path:
    source = DATASETS[name]
    archive_name, archive_md5, urls = source.archive
    tmp_archive = _fetch_verified(urls, archive_md5, data_dir, archive_name)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{archive_name}.", dir=data_dir))
    try:
        safe_extract_tar(tmp_archive, tmp_dir)
        extracted = tmp_dir / source.folder
        for f in missing:
            if not (extracted / f).is_file():
                raise UserError(f"{archive_name}: the archive has no {source.folder}/{f}")
            _verify_md5(extracted / f, source.files[f])
        if folder is None:
            folder = data_dir / source.folder
            os.replace(extracted, folder)  # one atomic rename of the whole folder
        else:
            for f in missing:
                os.replace(extracted / f, folder / f)
        return folder
    finally:
        tmp_archive.unlink(missing_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)


# --------------------------------------------------------------------------- MNIST (IDX)

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_maybe_gzip(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise UserError(f"{path}: corrupt or truncated gzip data ({e})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not, detected from its first bytes), checking the
    magic number (two zero bytes, type code, number of dimensions) and that the file holds
    exactly the number of values its header declares."""
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise UserError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header ({len(raw)} bytes, needs {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise UserError(f"{path}: {what}: header declares shape {dims} ({expected} bytes), file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype, math.prod(dims), header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_path(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder}: no {stem}[.gz]; pass --download to fetch MNIST, or --data-dir to point at a folder "
                    "holding it")


def load_mnist(data_dir: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST from the official IDX files in ``data_dir`` (or ``data_dir``/mnist or
    ``data_dir``/MNIST/raw), gzip-compressed or not. Returns images uint8 (N, 1, 28, 28) and
    labels int64 (N,) in 0..9."""
    _check_split(split)
    data_dir = Path(data_dir)
    folder = _mnist_folder(data_dir, split)
    if folder is None:
        raise UserError(f"{data_dir}: no MNIST {split} files ({_MNIST_FILES[split][0]}[.gz]); pass --download to fetch "
                        "MNIST, or --data-dir to point at a folder holding it")
    image_path, label_path = (_idx_path(folder, s) for s in _MNIST_FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise UserError(f"{image_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise UserError(f"{label_path}: expected a uint8 vector of labels, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise UserError(f"{label_path}: holds {len(labels)} labels for the {len(images)} images of {image_path.name}")
    if labels.size and labels.max() > 9:
        raise UserError(f"{label_path}: label {int(labels.max())} is outside 0..9")
    return np.ascontiguousarray(images[:, None]), labels.astype(np.int64)


# --------------------------------------------------------------------------- CIFAR-10


def _read_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    size = path.stat().st_size
    if size == 0 or size % _CIFAR_RECORD:
        raise UserError(f"{path}: truncated or corrupt: {size} bytes is not a whole number of "
                        f"{_CIFAR_RECORD}-byte CIFAR-10 records")
    records = np.fromfile(path, np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise UserError(f"{path}: label {int(labels.max())} is outside 0..9; not a CIFAR-10 batch")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for bytes, and nothing more."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is allowed only for latin1 text")
    return text.encode("latin1")


def _safe_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric

    allowed: dict[tuple[str, str], object] = {("builtins", t.__name__): t for t in (dict, list, str, bytes, int)}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x and 2.x names
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
    for module in ("numpy.core.numeric", "numpy._core.numeric"):  # protocol-5 pickles of arrays
        allowed[(module, "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("_codecs", "encode")] = _latin1_encode  # how Python 3 protocol-2 pickles write bytes
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only dict, list, str, bytes, int, numpy array and dtype
    reconstruction (and latin1 ``_codecs.encode``); any other global is refused, so loading a
    pickle cannot run code."""

    def find_class(self, module: str, name: str):
        module = "builtins" if module == "__builtin__" else module  # Python 2 pickles
        found = _SAFE_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return found

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing persistent ids")


_SAFE_GLOBALS = _safe_globals()


def restricted_unpickle(data: bytes):
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (Python 2 strings read as latin1,
    as the official CIFAR-10 pickles need)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def _read_cifar_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = restricted_unpickle(path.read_bytes())
    except pickle.UnpicklingError as e:
        if "refusing" in str(e):
            raise UserError(f"{path}: {e}; a CIFAR-10 batch holds only dicts, lists and numpy arrays, so this "
                            "pickle was not loaded") from None
        raise UserError(f"{path}: corrupt or truncated pickle ({e})") from None
    except Exception as e:  # untrusted bytes: any failure is a bad file
        raise UserError(f"{path}: corrupt or truncated pickle ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise UserError(f"{path}: expected a dict with 'data' and 'labels', got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise UserError(f"{path}: not a CIFAR-10 batch (keys {sorted(map(str, batch))}, needs 'data' and 'labels')")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{path}: 'labels' must be a list of integers") from None
    if labels.shape != (len(data),):
        raise UserError(f"{path}: {labels.size} labels for {len(data)} images")
    if len(labels) == 0 or labels.min() < 0 or labels.max() > 9:
        raise UserError(f"{path}: labels must lie in 0..9 (and there must be at least one image)")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | Path, split: str = "train",
                 version: str = "auto") -> tuple[np.ndarray, np.ndarray, dict]:
    """CIFAR-10 from the official binary version (``cifar-10-batches-bin``: ``data_batch_1..5.bin``,
    ``test_batch.bin``; 3073-byte records, a label byte then the R, G, B planes of 32 x 32) or the
    python version (``cifar-10-batches-py``: pickled dicts with b'data' (N, 3072) and b'labels',
    read with :class:`RestrictedUnpickler`). ``data_dir`` may be the batches folder itself, its
    parent, or a folder holding ``cifar10/<batches folder>``. ``version``: 'auto' (binary when
    both are there), 'binary' or 'python'.

    Returns images uint8 (N, 3, 32, 32), labels int64 (N,) and a dict saying which files were
    read. With the binary version, if test_batch.bin is absent but ``test_batch_first1000.bin``
    is there, the test split is those first 1000 images and the dict says so
    (``complete`` False, ``note``)."""
    _check_split(split)
    if version not in ("auto", "binary", "python"):
        raise UserError(f"CIFAR-10 version must be 'auto', 'binary' or 'python', got {version!r}")
    data_dir = Path(data_dir)
    folder, kind = None, None
    probe = "data_batch_" if split == "train" else "test_batch"
    for candidate in (("binary", "python") if version == "auto" else (version,)):
        folder, kind = _cifar_folder(data_dir, candidate, probe), candidate
        if folder is not None:
            break
    if folder is None:
        which = "binary or python version" if version == "auto" else f"{version} version"
        raise UserError(f"{data_dir}: no CIFAR-10 {split} batches found ({which}); pass --download to fetch "
                        "CIFAR-10, or --data-dir to point at a folder holding it")
    ext = ".bin" if kind == "binary" else ""
    names = [f"data_batch_{i}{ext}" for i in range(1, 6)] if split == "train" else [f"test_batch{ext}"]
    note = None
    partial = (folder / CIFAR10_PARTIAL_TEST).is_file()
    if split == "test" and kind == "binary" and not (folder / names[0]).is_file() and partial:
        names = [CIFAR10_PARTIAL_TEST]
        note = "only the first 1000 of the 10000 CIFAR-10 test images (test_batch_first1000.bin)"
    absent = [n for n in names if not (folder / n).is_file()]
    if absent:
        raise UserError(f"{folder}: missing {', '.join(absent)}; pass --download to fetch CIFAR-10, or --data-dir to "
                        "point at a complete copy")
    read = _read_cifar_bin if kind == "binary" else _read_cifar_pickle
    parts = [read(folder / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    info = {"dataset": "cifar10", "split": split, "version": kind, "folder": str(folder), "files": names,
            "n": int(len(images)), "complete": note is None, "note": note}
    return np.ascontiguousarray(images), labels, info
