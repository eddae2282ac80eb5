"""Images from files: single image files, folders of images, ``.npy`` / ``.npz`` image arrays,
their validation, and random crops of a grey texture."""

import warnings
from pathlib import Path

import numpy as np

from thermodiff.errors import UserError, first_line

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _open_image(path: Path):
    from PIL import Image

    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected an image file")
    try:
        with warnings.catch_warnings():  # a warning would be a second line on stderr: make it an error
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # closes the file even when decoding fails
                image.load()
                return image.copy()
    except Exception as e:  # untrusted bytes: Pillow's decoders fail in many ways
        raise UserError(f"{path}: cannot be read as an image ({first_line(e)})") from None


def load_grey_image(path: str | Path, allow_colour: bool = False) -> np.ndarray:
    """A grey image as uint8 (H, W), via Pillow (PNG, JPEG, ...). RGB / RGBA / palette images
    whose R, G and B are equal everywhere are taken as grey; an alpha channel is ignored.
    Colour images are refused unless ``allow_colour`` (then converted with ITU-R 601 luma)."""
    path = Path(path)
    image = _open_image(path)
    if image.mode in ("1", "L", "LA"):
        return np.asarray(image.convert("L"), np.uint8).copy()
    if image.mode not in ("RGB", "RGBA", "P", "PA"):
        raise UserError(f"{path}: image mode {image.mode} is not 8-bit grey or RGB")
    rgb = np.asarray(image.convert("RGB"), np.uint8)
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
        return rgb[..., 0].copy()
    if allow_colour:
        return np.asarray(image.convert("RGB").convert("L"), np.uint8).copy()
    raise UserError(f"{path}: is a colour image (R, G and B differ); a grey texture is needed")


def texture_regions(height: int, test_fraction: float, val_fraction: float = 0.0) -> dict[str, tuple[int, int]]:
    """The rows [top, bottom) of a texture's regions, from the top: train, validation, test. The
    bottom ``round(test_fraction * H)`` rows are the test region; ``val_fraction`` of the rows
    above it (rounded), just above it, the validation region (empty for 0); the rest is train."""
    if not 0 < test_fraction < 1:
        raise UserError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    test_top = height - int(round(test_fraction * height))
    val_top = test_top - int(round(val_fraction * test_top))
    return {"train": (0, val_top), "val": (val_top, test_top), "test": (test_top, height)}


def texture_crops(image: np.ndarray, n: int, size: int, seed: int = 0, region: str = "train",
                  test_fraction: float = 0.25, return_positions: bool = False, val_fraction: float = 0.0):
    """``n`` random ``size`` x ``size`` crops (uint8 (n, 1, size, size)) of a grey texture (H, W).

    The image is split by rows into the :func:`texture_regions` (train, validation, test, from the
    top), and every crop lies wholly inside its region, so no crop shares a pixel with a crop of
    another region: a model that learns the training region's pixels by heart is caught by the
    validation crops, as overlapping crops of one region would not catch it. Top-left corners are
    uniform over the valid positions (with replacement), seeded by ``seed``; ``return_positions``
    also returns them as an (n, 2) array of (row, column)."""
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise UserError(f"texture_crops needs a uint8 (H, W) grey image, got {image.dtype} {image.shape}")
    regions = texture_regions(image.shape[0], test_fraction, val_fraction)
    if region not in regions:
        raise UserError(f"region must be one of {', '.join(map(repr, regions))}, got {region!r}")
    if n < 1 or size < 1:
        raise UserError(f"texture_crops needs n >= 1 and size >= 1, got n={n}, size={size}")
    width = image.shape[1]
    top, bottom = regions[region]
    if bottom - top < size or width < size:
        raise UserError(f"the {region} region of the texture is {bottom - top} x {width} pixels, too small for "
                        f"{size} x {size} crops (test_fraction={test_fraction}, val_fraction={val_fraction})")
    rng = np.random.default_rng(seed)
    rows = rng.integers(top, bottom - size + 1, n)
    cols = rng.integers(0, width - size + 1, n)
    crops = np.lib.stride_tricks.sliding_window_view(image, (size, size))[rows, cols][:, None]
    crops = np.ascontiguousarray(crops)
    return (crops, np.stack([rows, cols], 1)) if return_positions else crops


def load_image(path: Path, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """One image file as uint8 (C, H, W): C = 1 for grey modes, 3 otherwise (alpha dropped)."""
    from PIL import Image

    image = _open_image(path)
    if image.mode in ("1", "L", "LA", "I;16", "I;16B", "I;16L", "I", "F"):
        if image.mode not in ("1", "L", "LA"):
            raise UserError(f"{path}: image mode {image.mode} is not 8-bit grey or RGB")
        image = image.convert("L")
    else:
        image = image.convert("RGB")
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        scale = max(h / image.height, w / image.width)
        if (image.height, image.width) != (h, w):
            new = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
            lanczos = getattr(Image, "Resampling", Image).LANCZOS  # Pillow < 9.1 has no Image.Resampling
            image = image.resize(new, lanczos) if new != image.size else image
            left, top = (image.width - w) // 2, (image.height - h) // 2
            image = image.crop((left, top, left + w, top + h))
    a = np.asarray(image, np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def load_image_folder(path: str | Path, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Every PNG / JPEG file in a folder (sorted by name; not recursive) as uint8 (N, C, H, W):
    C = 1 for grey images, 3 for colour (palette images count as colour; alpha is dropped);
    all files must have the same number of channels. Without ``size`` all must have the same
    size; with ``size`` (an int for square, or (H, W)) each is scaled (Lanczos) so that it covers
    that size and then centre-cropped to it."""
    path = Path(path)
    if not path.is_dir():
        what = "no such folder" if not path.exists() else "is a file, expected a folder of images"
        raise UserError(f"{path}: {what}")
    if size is not None and (min((size,) if isinstance(size, int) else tuple(size)) < 1):
        raise UserError(f"image size must be positive, got {size}")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{path}: holds no .png, .jpg or .jpeg files")
    arrays = []
    for f in files:
        a = load_image(f, size)
        if arrays and a.shape[0] != arrays[0].shape[0]:
            kinds = {1: "grey", 3: "colour"}
            raise UserError(f"{f}: is {kinds[a.shape[0]]} but {files[0].name} is {kinds[arrays[0].shape[0]]}; "
                            "all images in the folder must have the same number of channels")
        if arrays and a.shape != arrays[0].shape:
            raise UserError(f"{f}: is {a.shape[1]} x {a.shape[2]} but {files[0].name} is {arrays[0].shape[1]} x "
                            f"{arrays[0].shape[2]}; set data.size (e.g. --set data.size=64) to resize and centre-crop "
                            "them all to one square size")
        arrays.append(a)
    return np.stack(arrays)


def validate_images(x: np.ndarray, name: str) -> np.ndarray:
    """Check an image array (``name`` for messages) and bring it to uint8 (N, C, H, W).

    Shapes: (N, H, W) is grey; a 4-D array is channel-first (N, C, H, W) when its axis 1 has
    size 1 or 3, otherwise channel-last (N, H, W, C) when its last axis has size 1 or 3 (so an
    ambiguous (N, 3, H, 3) array is read as channel-first). Values: integer arrays are pixel
    values in 0..255; float arrays whose maximum is at most 1 are on [0, 1] (multiplied by 255),
    other float arrays on [0, 255]; floats are rounded to the nearest of the 256 levels; bool
    arrays map to 0 and 255."""
    if not isinstance(x, np.ndarray) or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) \
            or np.iscomplexobj(x):
        raise UserError(f"{name}: expected a numeric image array, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3):
            if x.shape[3] not in (1, 3):
                raise UserError(f"{name}: shape {x.shape} has no channel axis of size 1 or 3 (expected (N, C, H, W) "
                                "or (N, H, W, C))")
            x = x.transpose(0, 3, 1, 2)
    else:
        raise UserError(f"{name}: expected images of shape (N, H, W), (N, C, H, W) or (N, H, W, C), got {x.shape}")
    if min(x.shape) < 1:
        raise UserError(f"{name}: holds no pixels (shape {x.shape})")
    if x.dtype == bool:
        return np.ascontiguousarray(x.astype(np.uint8) * 255)
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise UserError(f"{name}: contains NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 255:
            raise UserError(f"{name}: values lie in [{lo:g}, {hi:g}], expected [0, 1] or [0, 255]")
        return np.ascontiguousarray(np.rint(x * 255 if hi <= 1 else x).astype(np.uint8))
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi > 255:
        raise UserError(f"{name}: integer values lie in [{lo}, {hi}], expected 0..255")
    return np.ascontiguousarray(x.astype(np.uint8))
