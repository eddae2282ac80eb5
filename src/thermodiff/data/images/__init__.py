"""Image data: MNIST, CIFAR-10, dead leaves, texture crops, user images, and dequantisation.

Every loader returns images as ``uint8`` arrays of shape (N, C, H, W) (grey images C = 1) and
raises :class:`UserError` with a one-line message naming the file and the problem. Official
files are verified against their published md5 sums (:func:`ensure_dataset`), downloads are
written atomically, tar archives are extracted only after every member has been checked, and
the CIFAR-10 python pickles are read with an unpickler that builds nothing but dicts, lists,
strings, numbers and numpy arrays.

Models see pixels through :func:`to_unit_float` (uniform dequantisation onto [0, 1]);
:func:`pixel_log_jacobian` converts a log-density on that scale to one in pixel units.

- ``official``: MNIST and CIFAR-10 files, md5 checks, downloads, safe extraction, unpickling.
- ``generated``: dead leaves.
- ``files``: image files and folders, texture crops, checks of image arrays.
- ``pixels``: dequantisation, its log-Jacobian and PSNR.
"""

from thermodiff.data.images.files import (
    load_grey_image,
    load_image,
    load_image_folder,
    texture_crops,
    texture_regions,
    validate_images,
)
from thermodiff.data.images.generated import dead_leaves
from thermodiff.data.images.official import (
    CIFAR10_CLASSES,
    CIFAR10_PARTIAL_TEST,
    DATASETS,
    DatasetSource,
    RestrictedUnpickler,
    download_file,
    ensure_dataset,
    load_cifar10,
    load_mnist,
    md5_of,
    read_idx,
    restricted_unpickle,
    safe_extract_tar,
)
from thermodiff.data.images.pixels import from_unit_float, pixel_log_jacobian, psnr_db, to_unit_float

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_PARTIAL_TEST",
    "DATASETS",
    "DatasetSource",
    "RestrictedUnpickler",
    "dead_leaves",
    "download_file",
    "ensure_dataset",
    "from_unit_float",
    "load_cifar10",
    "load_grey_image",
    "load_image",
    "load_image_folder",
    "load_mnist",
    "md5_of",
    "pixel_log_jacobian",
    "psnr_db",
    "read_idx",
    "restricted_unpickle",
    "safe_extract_tar",
    "texture_crops",
    "texture_regions",
    "to_unit_float",
    "validate_images",
]
