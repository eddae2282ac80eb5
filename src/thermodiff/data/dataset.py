"""Vector data: the paper's toy sets, user arrays, the seeded split and the global scaling.

Every loader returns float64 arrays of shape (N, D) and raises :class:`UserError` naming the
file and the problem, so the CLI can report bad input in one line.
"""

import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from thermodiff.data.images import from_unit_float, pixel_log_jacobian, to_unit_float, validate_images
from thermodiff.errors import UserError, first_line


def _check_n(n: int) -> None:
    if n < 2:
        raise UserError(f"data.n must be at least 2, got {n}")


def swiss_roll(n: int, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """The 2-D Swiss roll: angle a = 1.5 pi (1 + 2u), u ~ U(0, 1), point a (cos a, sin a)
    (scikit-learn's make_swiss_roll without its height axis), plus N(0, noise^2) if noise > 0."""
    _check_n(n)
    if not (noise >= 0 and math.isfinite(noise)):  # also refuses NaN, which 'noise < 0' let through
        raise UserError(f"data.noise must be a finite number >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    angle = 1.5 * np.pi * (1 + 2 * rng.random(n))
    x = np.stack([angle * np.cos(angle), angle * np.sin(angle)], axis=1)
    return x + noise * rng.standard_normal(x.shape) if noise > 0 else x


def heartbeat(n: int, length: int = 20, period: int = 5, seed: int = 0) -> np.ndarray:
    """Binary sequences with a 1 every ``period``-th bin at a uniformly random phase (paper
    App. D.1.2). Its true log-likelihood is log(1/period) per sequence."""
    _check_n(n)
    rng = np.random.default_rng(seed)
    phase = rng.integers(0, period, n)
    x = np.zeros((n, length))
    for p in range(period):
        x[phase == p, p::period] = 1.0
    return x


def load_npy(path: str | Path) -> np.ndarray:
    """The array of a ``.npy`` file, of any shape and dtype; never unpickles. Bytes that are not
    one .npy array are a one-line :class:`UserError` naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:  # our own handle: np.load leaks its own when the zip is corrupt
            x = np.load(f, allow_pickle=False)
    except Exception as e:  # untrusted bytes: numpy's parsers fail in many ways (tokenize, ast, zip, ...)
        raise UserError(f"{path}: cannot be read as npy: {first_line(e)}") from None
    if not isinstance(x, np.ndarray):
        raise UserError(f"{path}: is an .npz archive, not a .npy array; rename it to .npz")
    return x


def _read_npz(path: Path, key: str | None) -> np.ndarray:
    with open(path, "rb") as f:  # our own handle: np.load leaks its own when the zip is corrupt
        archive = np.load(f, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise UserError(f"{path}: holds a single .npy array, not an .npz archive; rename it to .npy")
        return _pick_npz_array(path, archive, key)


def _pick_npz_array(path: Path, archive, key: str | None) -> np.ndarray:
    with archive:
        keys = list(archive.keys())
        if key is None:
            if len(keys) != 1:
                raise UserError(f"{path}: holds arrays {keys}; name one with data.key")
            key = keys[0]
        if key not in keys:
            raise UserError(f"{path}: has no array {key!r} (it holds {keys})")
        return archive[key]


def load_array(path: str | Path, key: str | None = None, images: bool = False,
               vectors_expected: bool = False) -> np.ndarray:
    """Load an N x D numeric array from ``.npy``, ``.npz`` (``key`` picks the array) or ``.csv``
    (with ``images``, also image stacks of 3 or 4 dimensions, as uint8 (N, C, H, W))
    (comma-separated, an optional non-numeric header line). Never unpickles. With
    ``vectors_expected``, a 3-D or 4-D array that is no image stack either is reported as the
    wrong shape for vectors."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a .npy, .npz or .csv file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            x = load_npy(path)
        elif suffix == ".npz":
            x = _read_npz(path, key)
        elif suffix == ".csv":
            x = _read_csv(path)
        else:
            raise UserError(f"{path}: unsupported format {suffix or '(none)'}; use .npy, .npz or .csv")
    except UserError:
        raise
    except Exception as e:  # untrusted bytes: numpy's parsers fail in many ways (tokenize, ast, zip, ...)
        raise UserError(f"{path}: cannot be read as {suffix[1:]}: {first_line(e)}") from None
    if images and x.ndim in (3, 4):
        try:
            return validate_images(x, str(path))
        except UserError as e:
            if not vectors_expected:
                raise
            raise UserError(f"{path}: vectors need a 2-D (N, D) array, got shape {tuple(x.shape)} (nor is it an image "
                            f"stack: {str(e).removeprefix(f'{path}: ')}); for images use thermodiff train images"
                            ) from None
    return validate_array(x, str(path))


def _read_csv(path: Path) -> np.ndarray:
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not a header
        first = f.readline()
    try:
        [float(v) for v in first.strip().split(",")]
        skip = 0
    except ValueError:
        skip = 1  # a header line
    with warnings.catch_warnings():  # an empty body is reported by validate_array, not as a warning
        warnings.simplefilter("ignore", UserWarning)
        x = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, encoding="utf-8-sig")
    _refuse_inexact_integers(path)
    return x


#: an integer field of a CSV line that float64 may not hold exactly (more than 15 digits)
_LONG_INTEGER = re.compile(r"(?:^|,)\s*([+-]?\d{16,})\s*(?=,|$)", re.MULTILINE)


def _refuse_inexact_integers(path: Path) -> None:
    """Integers that float64 rounds (beyond 2**53, as int64 counts and ids can be) would be
    trained on as other numbers: refuse them, naming the first."""
    text = path.read_text(encoding="utf-8-sig")
    for match in _LONG_INTEGER.finditer(text):
        value = int(match.group(1))
        if int(float(value)) != value:
            line = text.count("\n", 0, match.start(1)) + 1
            raise UserError(f"{path}: line {line} holds the integer {value}, which float64 cannot hold exactly (it "
                            f"would become {int(float(value))}); integers must lie within +-2**53: subtract an offset "
                            "or rescale the column")


def validate_array(x: np.ndarray, name: str) -> np.ndarray:
    """Check that ``x`` is a finite numeric N x D array with N >= 2; return it as float64."""
    if not isinstance(x, np.ndarray):  # e.g. an .npz member that is not an .npy file comes back as bytes
        raise UserError(f"{name}: expected a numeric array, got {type(x).__name__}")
    if x.dtype == object or np.iscomplexobj(x) or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise UserError(f"{name}: expected a numeric array, got dtype {x.dtype}")
    if x.ndim != 2:
        raise UserError(f"{name}: expected an N x D array, got shape {tuple(x.shape)}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise UserError(f"{name}: needs at least 2 rows and 1 column, got shape {tuple(x.shape)}")
    x = x.astype(np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise UserError(f"{name}: contains {int(bad.sum())} NaN or infinite values (first in row {row})")
    return x


def is_binary(x: np.ndarray) -> bool:
    return bool(np.isin(x, (0.0, 1.0)).all())


def stored_as_integers(path: str | Path, key: str | None = None) -> bool:
    """Whether the .npy or .npz array at ``path`` (already read by :func:`load_array`) has an
    integer dtype; a CSV has no dtype (False)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        dtype = np.load(path, mmap_mode="r", allow_pickle=False).dtype  # the header only
    elif path.suffix.lower() == ".npz":
        dtype = _read_npz(path, key).dtype
    else:
        return False
    return bool(np.issubdtype(dtype, np.integer))


@dataclass
class Scaling:
    """An invertible affine map from original units to the model's, x -> ((x - shift) R) / scale:
    one global scalar pair (the paper's choice: one-element lists), one pair per dimension of N x D
    data, or PCA whitening (``rotation`` R: the training covariance's eigenvectors as columns,
    ``scale``: the standard deviations along them). ``log_det`` converts a log-density of scaled
    data back to original units."""

    shift: list[float]
    scale: list[float]
    rotation: list[list[float]] | None = None

    @classmethod
    def fit(cls, x: np.ndarray, mode: str) -> "Scaling":
        check_magnitude(x)
        if mode == "none":
            return cls([0.0], [1.0])
        if mode == "global":
            return cls([float(x.mean())], checked_scale([x.std()]))
        if mode in ("per_dimension", "pca") and x.ndim != 2:
            raise UserError(f"data.scaling = {mode!r} is for N x D arrays; images use 'global'")
        if mode == "per_dimension":
            return cls(x.mean(0).tolist(), checked_scale(x.std(0)))
        if mode == "pca":
            return cls.whitening(x)
        raise UserError(f"data.scaling must be 'global', 'per_dimension', 'pca' or 'none', got {mode!r}")

    @classmethod
    def whitening(cls, x: np.ndarray) -> "Scaling":
        """PCA whitening: centred data rotated onto the covariance's eigenvectors and divided by
        their standard deviations, so the scaled training data have mean 0 and covariance I."""
        mean = x.mean(0)
        variances, vectors = np.linalg.eigh(np.cov(x - mean, rowvar=False, bias=True).reshape(x.shape[1], -1))
        if not variances[0] > 1e-12 * max(variances[-1], 0.0):
            raise UserError("the data lie in a lower-dimensional subspace (their covariance is singular), so they "
                            "have no density to bound; drop redundant columns or use data.scaling = 'per_dimension'")
        return cls(mean.tolist(), np.sqrt(variances).tolist(), vectors.tolist())

    def __post_init__(self):
        # data are checked where they are fitted (checked_scale); this catches a damaged record
        if not self.scale or any(not (s > 0 and math.isfinite(s)) for s in self.scale):
            raise UserError(f"scale must hold positive finite numbers, got {self.scale}")

    def _arrays(self, like):
        """shift, scale and rotation as arrays of ``like``'s kind (NumPy, or float64 tensors on its device)."""
        if isinstance(like, torch.Tensor):
            return [None if v is None else torch.as_tensor(v, dtype=torch.float64, device=like.device)
                    for v in (self.shift, self.scale, self.rotation)]
        return [None if v is None else np.asarray(v, dtype=np.float64) for v in (self.shift, self.scale, self.rotation)]

    def apply(self, x):
        """Original units -> the model's, for a NumPy array or a float64 tensor."""
        shift, scale, rotation = self._arrays(x)
        centred = x - shift
        return (centred if rotation is None else centred @ rotation) / scale

    def invert(self, y):
        """The model's units -> original ones (the inverse of :meth:`apply`)."""
        shift, scale, rotation = self._arrays(y)
        scaled = y * scale
        return (scaled if rotation is None else scaled @ rotation.T) + shift

    def log_det(self, dim: int) -> float:
        """log |d scaled / d original| for ``dim``-dimensional examples (-dim log scale for a
        global pair; the rotation's determinant is +-1), added to a log-density of scaled data
        to give it in original units."""
        scale = np.asarray(self.scale)
        return -float(dim * np.log(scale[0]) if len(scale) == 1 else np.sum(np.log(scale)))


@dataclass
class Lattice:
    """Integer-valued (quantised) N x D data: every value of dimension j is low_j + k step_j for an
    integer k in 0..count_j - 1. Such data have a probability, not a density: a discretized decoder
    over these bins makes K a bound on the log-probability of the values themselves."""

    low: list[float]
    step: list[float]
    count: list[int]

    #: at most this many values per dimension (a finer grid is not worth a discrete model)
    MAX_LEVELS = 100_000

    @classmethod
    def detect(cls, x: np.ndarray) -> "Lattice | None":
        """The lattice of ``x`` if every dimension's values are whole multiples of its smallest gap
        and values repeat (at most N / 2 distinct values per dimension); otherwise None."""
        low, step, count = [], [], []
        for column in np.asarray(x, dtype=np.float64).T:
            values = np.unique(column)
            if not 1 < len(values) <= min(len(column) / 2, cls.MAX_LEVELS):
                return None
            gap = float(np.diff(values).min())
            k = (values - values[0]) / gap
            if np.abs(k - np.rint(k)).max() > 1e-6:
                return None
            low.append(float(values[0]))
            step.append(gap)
            count.append(int(np.rint(k[-1])) + 1)
        return cls(low, step, count)

    @classmethod
    def shared(cls, x: np.ndarray) -> "Lattice | None":
        """One alphabet for every column of N x D ``x``, the values low + k step, k = 0..count - 1, of
        all its entries (the symbols of categorical data; a column may use a few of them), or None if
        the entries are not whole multiples of their smallest gap or take more than MAX_LEVELS values."""
        values = np.unique(np.asarray(x, dtype=np.float64))
        if not 1 < len(values) <= cls.MAX_LEVELS:
            return None
        gap = float(np.diff(values).min())
        k = (values - values[0]) / gap
        if np.abs(k - np.rint(k)).max() > 1e-6 or k[-1] >= cls.MAX_LEVELS:
            return None
        dim = x.shape[1]
        return cls([float(values[0])] * dim, [gap] * dim, [int(np.rint(k[-1])) + 1] * dim)

    def outside(self, x: np.ndarray) -> np.ndarray:
        """Where ``x`` (N x D, or N images of D values) holds values that are not on the lattice
        (booleans of x's shape)."""
        x = np.asarray(x, dtype=np.float64)
        k = (x.reshape(len(x), int(np.prod(x.shape[1:]))) - np.asarray(self.low)) / np.asarray(self.step)
        return ((np.abs(k - np.rint(k)) > 1e-6) | (k < -0.5) | (k > np.asarray(self.count) - 0.5)).reshape(x.shape)


#: Values beyond this are refused: the variance squares them, and float64 overflows at ~1.8e308.
MAX_MAGNITUDE = 1e150


def check_magnitude(x: np.ndarray) -> None:
    """Refuse values so large that their variance overflows float64 (it would read as infinite)."""
    largest = float(np.abs(x).max()) if x.size else 0.0
    if largest > MAX_MAGNITUDE:
        raise UserError(f"values up to {largest:.3g} are too large to scale: their variance overflows float64 "
                        f"(values must stay below {MAX_MAGNITUDE:.0e}); divide the data by a constant, e.g. "
                        f"{10 ** math.floor(math.log10(largest)):.0e}, before training")


def checked_scale(std) -> list[float]:
    """Standard deviations of the data (one, or one per dimension) as a scaling's ``scale``; a
    zero one means constant data, which cannot be scaled to unit variance."""
    std = np.atleast_1d(np.asarray(std, dtype=np.float64))
    constant = np.flatnonzero(~(std > 0))
    if constant.size:
        where = "are constant" if std.size == 1 else (
            f"are constant in dimension{'s' if constant.size > 1 else ''} {', '.join(map(str, constant[:10]))}"
            + (" ..." if constant.size > 10 else ""))
        raise UserError(f"the data {where} (zero variance), so they cannot be scaled to unit variance; drop "
                        "constant columns, or set data.scaling = 'none'")
    return std.tolist()


def split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random train/test index split."""
    if not 0 < test_fraction < 1:
        raise UserError(f"data.test_fraction must lie in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    if n_test >= n:
        raise UserError(f"too few examples ({n}) to hold out a test split")
    return np.sort(order[n_test:]), np.sort(order[:n_test])


@dataclass
class Dataset:
    """Train and test data in original units (float vectors, or uint8 images), and how they
    become the model's input: uniform dequantisation of 8-bit images, y = (v + u - 0.5) / 255
    drawn afresh each time (the paper's), then one scaling."""

    train: np.ndarray
    test: np.ndarray
    scaling: Scaling
    binary: bool
    source: str
    dequantize: bool = False
    val: np.ndarray | None = None  # held out of the training split to score checkpoints (None or empty: none)
    lattice: Lattice | None = None  # integer-valued vectors: the values' grid (see :class:`Lattice`)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def dim(self) -> int:
        return int(np.prod(self.event_shape))

    @property
    def is_image(self) -> bool:
        return len(self.event_shape) == 3

    def to_model(self, x: np.ndarray, generator: torch.Generator | None = None, device=None,
                 dequantize: bool = True) -> torch.Tensor:
        """Original units -> the float32 tensor the model sees: with fresh dequantisation noise for
        8-bit training and test images, or (``dequantize=False``) v / 255 as it is, for inputs such
        as noisy images that are not 8-bit data."""
        if self.dequantize and dequantize:
            y = to_unit_float(x, generator, torch.float64)
        else:
            y = torch.as_tensor(np.asarray(x, dtype=np.float64)) / (255 if self.dequantize else 1)
        return self.scaling.apply(y).float().to(device)

    def to_model_density(self, x: np.ndarray, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
        """Original units -> the model's input for a density model, and the log-volume of the cell
        each value stands for (original units). Discrete data are dequantised uniformly within their
        cell (Theis et al. 2016; Song et al. 2021, App. D.2), so E_u log p(v + u) + log-volume <=
        log P(v) (Jensen): 8-bit images as :meth:`to_model` does (cells of one grey level, volume 1
        in the pixel units of :meth:`log_det`), integer-valued vectors within their lattice's cells
        (volume prod step_j). Continuous data as they are (log-volume 0)."""
        if self.lattice is None:
            return self.to_model(x, generator), 0.0
        step = np.asarray(self.lattice.step, dtype=np.float64)
        u = torch.rand(np.shape(x), generator=generator, dtype=torch.float64).numpy()
        y = self.scaling.apply(np.asarray(x, dtype=np.float64) + (u - 0.5) * step)
        return torch.as_tensor(y).float(), float(np.log(step).sum())

    def from_model(self, x: torch.Tensor) -> np.ndarray:
        """The model's space -> original units (8-bit images are rounded back to uint8)."""
        y = self.scaling.invert(x.detach().cpu().double().numpy())
        return from_unit_float(y) if self.dequantize else y

    def grey_levels(self, images: np.ndarray) -> np.ndarray:
        """Images in original units as uint8 grey levels to look at: 8-bit images as they are, the
        symbols of categorical images (an alphabet of S values) spread evenly over 0..255."""
        if self.lattice is None:
            return np.asarray(images)
        k = (np.asarray(images, dtype=np.float64) - self.lattice.low[0]) / self.lattice.step[0]
        return np.rint(255 * k / max(self.lattice.count[0] - 1, 1)).astype(np.uint8)

    def model_scale(self) -> torch.Tensor:
        """How much one original unit is in the model's space (per dimension, broadcastable). With
        a whitening rotation, per model dimension: isotropic noise of std s in original units is
        independent noise of std s / scale_i along the rotated axes."""
        scale = torch.as_tensor(self.scaling.scale, dtype=torch.float64)
        return 1 / (scale * 255) if self.dequantize else 1 / scale

    def model_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The box in model units that the data fill, per dimension (float64, broadcastable against
        an example): dequantised 8-bit images' [-0.5, 255.5] / 255, an integer lattice's cells.
        What :meth:`~thermodiff.process.gaussian.GaussianDiffusion.clipped` clips x_0 to."""
        if self.dequantize:
            low, high = np.array([-0.5 / 255]), np.array([255.5 / 255])
        elif self.lattice is not None:
            low = np.asarray(self.lattice.low) - np.asarray(self.lattice.step) / 2
            high = low + np.asarray(self.lattice.count) * np.asarray(self.lattice.step)
        else:
            raise UserError(f"{self.source}: continuous data have no range to clip x_0 to; --clip-x0 is for 8-bit "
                            "images and integer-valued vectors")
        if self.scaling.rotation is not None:
            raise UserError(f"{self.source}: whitened data (data.scaling = 'pca') have no box in model units to clip "
                            "x_0 to; drop --clip-x0")
        return tuple(self.scaling.apply(torch.as_tensor(bound, dtype=torch.float64)) for bound in (low, high))

    def log_det(self) -> float:
        """log |d model input / d original units| per example: the scaling's, plus -D log 255 for
        dequantised 8-bit images, so that K + log_det bounds the log-density in pixel units [0, 256)."""
        return self.scaling.log_det(self.dim) + (pixel_log_jacobian(self.dim) if self.dequantize else 0.0)

    def describe(self) -> dict:
        return {"source": self.source, "n_train": len(self.train), "n_test": len(self.test),
                "n_val": 0 if self.val is None else len(self.val),
                "shape": list(self.event_shape), "binary": self.binary, "dequantized": self.dequantize,
                "scaling": asdict(self.scaling), "lattice": self.lattice and asdict(self.lattice),
                "train_mean": float(self.train.mean())}  # a binary run's null model and binomial p need it
