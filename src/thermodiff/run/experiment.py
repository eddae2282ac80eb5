"""From a :class:`Config` to data, a diffusion process and a network; and back from a run
directory. This is the only module that knows how config names map to objects."""

import copy
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from thermodiff.data import dataset as datasets
from thermodiff.data import images as image_data
from thermodiff.errors import UserError, first_line
from thermodiff.nets.baselines import DAE, VAE, DenoiserNet, VAENet
from thermodiff.nets.convnet import build_conv_net
from thermodiff.nets.mcgsm import MCGSM, MCGSMNet
from thermodiff.nets.unet import build_unet
from thermodiff.nets.vector import build_vector_net
from thermodiff.process.binomial import BinomialDiffusion, BinomialParameterization
from thermodiff.process.bound import LossAwareSampler
from thermodiff.process.categorical import CategoricalDiffusion, CategoricalParameterization
from thermodiff.process.gaussian import Bins, GaussianDiffusion, GaussianParameterization
from thermodiff.process.schedules import make_schedule
from thermodiff.process.vdm import VDM
from thermodiff.run import autoconfig, memory
from thermodiff.run.checkpoint import CorruptCheckpoint, load_checkpoint
from thermodiff.run.config import AUTO, CONFIG_DIR, Config, load_config

#: the run directory's file of the best weights by the validation bound (training.Validator writes it)
BEST_CHECKPOINT = "best.safetensors"

#: model.network values for (C, H, W) images; the others take (D,) vectors
IMAGE_NETWORKS = ("conv", "unet")

# The paper's figures (v8, Tables 1 and 2): bits per sample, per pixel for images.
PAPER_RESULTS = {
    "swissroll": {"K_bits": 2.35, "K_minus_L_null_bits": 6.45},
    "heartbeat": {"K_bits": -2.414, "K_minus_L_null_bits": 12.024, "true_log_likelihood_bits": float(np.log2(1 / 5))},
    "dead_leaves": {"K_bits_per_pixel": 1.489, "K_minus_L_null_bits_per_pixel": 3.536},
    "bark": {"K_bits_per_pixel": -0.55, "K_minus_L_null_bits_per_pixel": 1.5},
    "cifar10": {"K_bits_per_pixel": 5.4, "K_minus_L_null_bits_per_pixel": 11.5},
    "mnist": {"parzen_bits": 317},
}
VECTOR_SOURCES = ("swissroll", "heartbeat")
IMAGE_SOURCES = ("mnist", "cifar10", "dead_leaves", "texture")
BUILTIN_SOURCES = VECTOR_SOURCES + IMAGE_SOURCES


def paper_row(cfg: Config) -> dict | None:
    """The paper's figures for this experiment: by name (bark, a texture), or by built-in data."""
    if cfg.name in PAPER_RESULTS and cfg.data.source in BUILTIN_SOURCES:
        return PAPER_RESULTS[cfg.name]
    return PAPER_RESULTS.get(cfg.data.source)


def paper_experiments() -> list[str]:
    """The packaged experiments that :func:`paper_row` has the paper's figures for."""
    return [path.stem for path in sorted(CONFIG_DIR.glob("*.toml")) if paper_row(load_config(str(path))) is not None]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _data_dir(cfg: Config) -> Path:
    if cfg.data.data_dir:
        return Path(cfg.data.data_dir)
    if cfg.data.download:
        return Path.home() / ".cache" / "thermodiff"
    raise UserError(f"{cfg.data.source}: no data directory; pass --data-dir DIR (a local copy) or --download")


def _seeded_split(x: np.ndarray, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    train_idx, test_idx = datasets.split(len(x), cfg.data.test_fraction, cfg.seed)
    return x[train_idx], x[test_idx]


def load_splits(cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """Train and test data in original units, the validation split where the source has one of
    its own (else None: :func:`carve_validation` takes it from the training split), and where they
    came from. Official splits for MNIST and CIFAR-10 (``data.n`` > 0 caps the training set),
    disjoint regions for texture crops (validation crops from a band of their own: crops of the
    training region overlap one another), separate seeds for generated images, and a seeded split
    of everything else."""
    d = cfg.data
    n_test = max(1, round(d.n * d.test_fraction))
    if d.source == "swissroll":
        return *_seeded_split(datasets.swiss_roll(d.n, d.noise, seed=cfg.seed), cfg), None, "swissroll"
    if d.source == "heartbeat":
        return *_seeded_split(datasets.heartbeat(d.n, seed=cfg.seed), cfg), None, "heartbeat"
    if d.source in ("mnist", "cifar10"):
        train, test = (official_images(d.source, _data_dir(cfg), d.download, split) for split in ("train", "test"))
        return (train[: d.n] if d.n > 0 else train), test, None, d.source
    if d.source == "dead_leaves":
        return (image_data.dead_leaves(d.n - n_test, d.size, seed=cfg.seed),
                image_data.dead_leaves(n_test, d.size, seed=cfg.seed + 1_000_003), None, "dead_leaves")
    if d.source == "texture":
        if not d.path:
            raise UserError("data.source = 'texture' needs data.path, a grey texture image")
        image = image_data.load_grey_image(d.path)
        n_val = round((d.n - n_test) * d.val_fraction)
        crops = {region: image_data.texture_crops(image, n, d.size, cfg.seed, region, d.test_fraction,
                                                  val_fraction=d.val_fraction)
                 for region, n in (("train", d.n - n_test - n_val), ("val", n_val), ("test", n_test)) if n or region != "val"}
        return crops["train"], crops["test"], crops.get("val", crops["train"][:0]), f"texture:{Path(d.path).resolve()}"
    if not d.source:
        raise UserError(f"experiment {cfg.name!r} has no data: pass --data PATH (an array or a folder of images)")
    path = Path(d.source)
    x = (image_data.load_image_folder(path, d.size or None) if path.is_dir() else
         datasets.load_array(path, d.key, images=True, vectors_expected=cfg.model.network not in IMAGE_NETWORKS))
    return *_seeded_split(x, cfg), None, d.source


def official_images(name: str, data_dir: Path, download: bool, split: str) -> np.ndarray:
    """The ``split`` images (uint8, N x C x H x W) of MNIST or CIFAR-10 (``name``) in ``data_dir``."""
    load = image_data.load_mnist if name == "mnist" else image_data.load_cifar10
    return load(image_data.ensure_dataset(name, data_dir, download), split)[0]


def images_or_array(path: Path, size: int | None = None) -> np.ndarray:
    """The examples of ``path``: a folder of images (scaled and cropped to ``size``), or an array
    file whose 3-D or 4-D arrays are image stacks."""
    return image_data.load_image_folder(path, size) if path.is_dir() else datasets.load_array(path, images=True)


#: the most categories that ``diffusion.kind = 'categorical'`` takes when asked for (the network
#: outputs K logits per dimension); the rule that picks it unasked stops at autoconfig.MAX_CATEGORIES
MAX_CATEGORIES_ASKED = 256
#: processes of discrete states, whose images are modelled as they are (not dequantised)
DISCRETE_KINDS = ("binomial", "categorical")


def diffusion_kind(cfg: Config, binary: bool, alphabet: datasets.Lattice | None, image: bool, origin: str) -> str:
    """diffusion.kind, "auto" already decided (autoconfig.resolve_kind), if it can model the data."""
    kind = cfg.diffusion.kind
    if kind == "binomial" and not binary:
        raise UserError(f"{origin}: data are not binary (values other than 0 and 1), so binomial diffusion cannot model them")
    if kind == "categorical" and (alphabet is None or alphabet.count[0] > MAX_CATEGORIES_ASKED):
        raise UserError(f"{origin}: categorical diffusion cannot model these data: their values are not one alphabet "
                        f"of evenly spaced symbols (at most {MAX_CATEGORIES_ASKED})")
    return kind


def check_alphabet(x: np.ndarray, alphabet: datasets.Lattice, origin: str) -> None:
    """Refuse values outside a categorical run's alphabet (the model gives them probability 0)."""
    outside = alphabet.outside(x)
    if outside.any():
        raise UserError(f"{origin}: {int(outside.sum())} values (e.g. {x[outside][0]:g}) are not among the training "
                        f"data's {alphabet.count[0]} categories ({alphabet.low[0]:g} + k {alphabet.step[0]:g}); "
                        "a categorical model gives them probability 0; map them to known symbols or train on data "
                        "that hold them")


def resolve_source(cfg: Config) -> None:
    """Make data paths absolute, so a run can be evaluated from any folder."""
    if cfg.data.source not in BUILTIN_SOURCES:
        cfg.data.source = str(Path(cfg.data.source).resolve())
    for key in ("path", "data_dir"):
        if getattr(cfg.data, key):
            setattr(cfg.data, key, str(Path(getattr(cfg.data, key)).resolve()))


def image_scaling(images: np.ndarray) -> datasets.Scaling:
    """One global pair over the pixels of uint8 images on the dequantised scale v / 255,
    accumulated in chunks (CIFAR-10 would need 1.2 GB as float64 at once)."""
    total, squares, count = 0.0, 0.0, images.size
    for chunk in np.array_split(images.reshape(len(images), -1), max(1, len(images) // 4096)):
        c = chunk.astype(np.float64) / 255
        total, squares = total + c.sum(), squares + (c**2).sum()
    mean = total / count
    return datasets.Scaling([mean], datasets.checked_scale([np.sqrt(max(squares / count - mean**2, 0.0))]))


def carve_validation(train: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded validation split of ``fraction`` of the training examples (none for 0), disjoint
    from the rest of the training split and from the test split."""
    if fraction == 0:
        return train, train[:0]
    kept, held_out = datasets.split(len(train), fraction, seed + 7919)  # not the test split's permutation
    return train[kept], train[held_out]


def prepare_dataset(cfg: Config, override: np.ndarray | None = None, scaling: datasets.Scaling | None = None) -> tuple[datasets.Dataset, str]:
    """Load, split and scale the data, and decide every "auto" setting of ``cfg`` from the
    training split (:mod:`thermodiff.run.autoconfig`); returns the data set and the diffusion kind.
    With ``override`` and a fitted ``scaling`` (evaluating a trained run on other data), all of
    ``override`` is the test split."""
    train, test, val, source = load_splits(cfg)
    if val is None:
        train, val = carve_validation(train, cfg.data.val_fraction, cfg.seed)
    image = train.ndim == 4
    binary = datasets.is_binary(train)
    integers = source not in BUILTIN_SOURCES and Path(source).is_file() and datasets.stored_as_integers(source, cfg.data.key)
    symbols = (integers and not image) or cfg.diffusion.kind == "categorical"  # images: only when asked for
    alphabet = datasets.Lattice.shared(train.reshape(len(train), -1)) if symbols else None  # (np.unique: where it decides)
    autoconfig.resolve_kind(cfg, binary, image, integers, alphabet)
    kind = diffusion_kind(cfg, binary, alphabet, image, source)
    lattice = alphabet if kind == "categorical" else None if image or binary else datasets.Lattice.detect(train)
    autoconfig.resolve_data(cfg, train, kind, lattice)
    if not cfg.baseline.kind and image != (cfg.model.network in IMAGE_NETWORKS):  # baselines take both
        what = f"images of shape {train.shape[1:]}" if image else f"vectors of shape {train.shape[1:]}"
        raise UserError(f"{source}: holds {what}, but model.network = {cfg.model.network!r} is for "
                        f"{'vectors' if image else 'images'}")
    if override is not None:
        test = override
    if kind == "categorical":
        for split_name, x in (("test split", test), ("validation split", val)):
            check_alphabet(x, lattice, f"{source} ({split_name})")
    if scaling is None:
        try:
            if kind == "categorical":  # the symbols' indices (value - low) / step
                scaling = datasets.Scaling([lattice.low[0]], [lattice.step[0]])
            elif kind == "binomial" or cfg.data.scaling == "none":
                scaling = datasets.Scaling.fit(train, "none")
            else:
                scaling = image_scaling(train) if image else datasets.Scaling.fit(train, cfg.data.scaling)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
    dataset = datasets.Dataset(train, test, scaling, binary, source, dequantize=image and kind not in DISCRETE_KINDS,
                               val=val, lattice=lattice)
    bins = data_bins(dataset)
    autoconfig.resolve(cfg, None if image else scaling.apply(train), kind, bins)
    autoconfig.resolve_network_input(cfg, kind, bins.width if dataset.dequantize else None)
    return dataset, kind


def resolve_auto(cfg: Config, kind: str) -> None:
    """Name the process kind in the config; a config built in code without
    :func:`prepare_dataset` gets the paper's choices for the settings it leaves at "auto"."""
    d = cfg.diffusion
    d.kind = kind
    if d.schedule == AUTO:
        d.schedule = "erase" if kind in ("binomial", "categorical") else "learned"
    if d.parameterization == AUTO:
        d.parameterization = {"binomial": BinomialParameterization.FORWARD_OFFSET, "vdm": VDM.parameterization,
                              "categorical": CategoricalParameterization.X0}.get(kind, GaussianParameterization.REFERENCE).value
    if d.decoder == AUTO:  # categorical: the forward decoder is not the absorbing kernel's
        d.decoder = "learned" if kind == "categorical" else "forward"
    if cfg.model.fourier == AUTO:
        cfg.model.fourier = 0.0


def data_bins(dataset: datasets.Dataset) -> Bins | None:
    """Where discrete data lie in model units (None for continuous data): for 8-bit images the
    scaled image of 0, one grey level apart; for integer-valued vectors their lattice, per dimension
    (which a whitening rotation would not keep on axes)."""
    if dataset.dequantize:
        return Bins(low=float(dataset.scaling.apply(np.zeros(1))[0]), width=float(dataset.model_scale().flatten()[0]))
    if dataset.lattice is None or dataset.scaling.rotation is not None:
        return None
    lattice, scale = dataset.lattice, np.broadcast_to(dataset.scaling.scale, (dataset.dim,))
    return Bins(low=tuple(dataset.scaling.apply(np.asarray(lattice.low)).tolist()),
                width=tuple((np.asarray(lattice.step) / scale).tolist()), count=tuple(lattice.count))



def build_diffusion(cfg: Config, kind: str, data_mean: float, bins: Bins | None = None) -> nn.Module:
    """The configured process; a binomial one is stationary at ``data_mean`` unless the config
    fixes ``stationary_p``. ``bins`` (:func:`data_bins`) serve the discretized decoder. With
    ``train.t_sampler = 'loss_aware'`` the process carries its importance sampler of t. With
    ``baseline.kind`` set, the baseline instead (the data kind picks a VAE's likelihood)."""
    if cfg.baseline.kind:
        return build_baseline(cfg, kind, data_mean)
    resolve_auto(cfg, kind)
    d = cfg.diffusion
    try:
        if kind != "categorical" and d.kernel != "uniform":
            raise ValueError(f"kernel = {d.kernel!r} is for kind = 'categorical'; leave it at 'uniform'")
        if kind != "vdm" and d.schedule_gradient != "bound":
            raise ValueError(f"schedule_gradient = {d.schedule_gradient!r} is for kind = 'vdm' (its continuous-time "
                             "loss); leave it at 'bound'")
        if kind == "vdm":  # continuous time: its own decoder, loss and sampling of t (vdm.py)
            if (d.parameterization, d.eps_variance, d.decoder, cfg.train.loss, cfg.train.t_sampler) != (
                    "eps", None, "forward", "bound", "uniform"):
                raise ValueError("vdm predicts eps, decodes with the forward step and trains on its continuous-time "
                                 "bound: leave parameterization, eps_variance, decoder, train.loss and train.t_sampler "
                                 "at their defaults")
            return VDM(d.T, d.schedule, d.beta_1, d.schedule_gradient)
        schedule = make_schedule(d.schedule, d.T, d.beta_1)
        if cfg.train.t_sampler not in ("uniform", "loss_aware"):
            raise ValueError(f"train.t_sampler must be 'uniform' or 'loss_aware', got {cfg.train.t_sampler!r}")
        training = {"loss": cfg.train.loss, "t_sampler": LossAwareSampler(d.T) if cfg.train.t_sampler == "loss_aware" else None}
        if kind == "binomial":
            if d.stationary_p is None and not 0 < data_mean < 1:
                raise ValueError("the binary data are constant (all 0 or all 1); nothing to model")
            if d.eps_variance is not None:
                raise ValueError("eps_variance is for Gaussian diffusion")
            p = d.stationary_p if d.stationary_p is not None else data_mean
            return BinomialDiffusion(schedule, p, d.parameterization, d.decoder, **training)
        if kind == "categorical":
            if d.eps_variance is not None or d.stationary_p is not None:
                raise ValueError("eps_variance and stationary_p are for Gaussian and binomial diffusion")
            return CategoricalDiffusion(schedule, max(bins.count), d.kernel, None, d.parameterization, d.decoder,
                                        hybrid_lambda=cfg.train.hybrid_lambda, **training)
        return GaussianDiffusion(schedule, d.parameterization, d.decoder, d.eps_variance, bins,
                                 hybrid_lambda=cfg.train.hybrid_lambda, **training)
    except ValueError as e:
        raise UserError(f"diffusion: {e}") from None


def build_baseline(cfg: Config, kind: str, data_mean: float) -> nn.Module:
    b = cfg.baseline
    try:
        if b.kind == "vae":
            return VAE(b.latent, kind == "binomial", b.min_var, b.n_importance, data_mean)
        if b.kind == "mcgsm":
            if kind == "binomial":
                raise ValueError("the MCGSM is a density of continuous grey images, and these data are binary")
            return MCGSM()
        return DAE(b.noise_std)
    except ValueError as e:
        raise UserError(f"baseline: {e}") from None


def build_model(cfg: Config, diffusion: nn.Module, event_shape: tuple[int, ...]) -> nn.Module:
    """The configured network for examples of ``event_shape``: (D,) vectors or (C, H, W) images;
    for a baseline, its MLPs on flattened examples (an MCGSM: its parameters, from ``[baseline]``)."""
    m = cfg.model
    image = len(event_shape) == 3
    try:
        if cfg.baseline.kind == "vae":
            return VAENet(event_shape, diffusion.latent, diffusion.outputs_per_dim, m.hidden, m.layers, m.activation)
        if cfg.baseline.kind == "dae":
            return DenoiserNet(event_shape, m.hidden, m.layers, m.activation)
        if cfg.baseline.kind == "mcgsm":
            b = cfg.baseline
            return MCGSMNet(event_shape, b.radius, b.components, b.scales, b.features)
    except ValueError as e:
        raise UserError(f"model: {e}") from None
    if diffusion.continuous_time and not image and m.readout != "bumps":
        raise UserError("diffusion.kind = 'vdm' calls the network at continuous times: use model.readout = 'bumps'")
    if image != (m.network in IMAGE_NETWORKS):
        need = "'conv' or 'unet'" if image else "'rbf' or 'mlp'"
        raise UserError(f"model.network = {m.network!r} does not fit data of shape {tuple(event_shape)}; use {need}")
    try:
        if image:
            channels, height, width = event_shape
            if height != width:
                raise ValueError(f"images must be square, got {height} x {width}")
            if m.network == "unet":
                return build_unet(m.preset, channels, height, diffusion.outputs_per_dim, diffusion.T,
                                  diffusion.one_hot_states, **({"fourier_period": m.fourier} | m.unet))
            if m.fourier:
                raise ValueError(f"fourier = {m.fourier} is for network = 'unet'; leave it at 0")
            if diffusion.one_hot_states is not None:
                raise ValueError("categorical images need model.network = 'unet' (it takes one-hot states)")
            return build_conv_net(m.preset, channels, height, diffusion.outputs_per_dim, diffusion.T, **m.conv)
        return build_vector_net(m.network, event_shape[0], diffusion.outputs_per_dim, diffusion.T, m.hidden, m.layers,
                                m.activation, m.readout, m.n_basis, m.bump_width, diffusion.one_hot_states)
    except (ValueError, TypeError) as e:
        raise UserError(f"model: {e}") from None


#: the chain lengths at which :func:`state_bytes_at_T` counts the process's and network's state
PROBE_T = (8, 16)


def _state_bytes(cfg: Config, dataset: datasets.Dataset, kind: str, data_mean: float, T: int) -> tuple[int, int]:
    """The parameter and buffer bytes of the process and network of ``cfg`` at ``T`` steps: the
    process built (small at a small T), the network on the meta device (its shapes, without the
    cost of initialising its weights)."""
    probe = copy.deepcopy(cfg)
    probe.diffusion.T = T
    with torch.random.fork_rng(devices=[]):  # the run's initial weights are drawn after this
        diffusion = build_diffusion(probe, kind, data_mean, data_bins(dataset))
        with torch.device("meta"):
            model = build_model(probe, diffusion, dataset.event_shape)
    return memory.state_bytes([diffusion, model])


def state_bytes_at_T(cfg: Config, dataset: datasets.Dataset, kind: str, data_mean: float) -> tuple[float, float]:
    """The parameter and buffer bytes of ``cfg``'s process and network at diffusion.T, before
    they are built: what grows with T (schedule tables, per-step readouts, the sampler's
    statistics) is counted at two small T and extrapolated linearly."""
    (t1, t2), T = PROBE_T, cfg.diffusion.T
    small, large = (_state_bytes(cfg, dataset, kind, data_mean, t) for t in PROBE_T)
    return tuple(a + max(0.0, (b - a) / (t2 - t1)) * (T - t1) for a, b in zip(small, large))


def batch_activations(dataset: datasets.Dataset, diffusion: nn.Module, model: nn.Module, batch_size: int) -> float:
    """The activations that a training step on ``batch_size`` examples keeps for its backward
    pass (an upper bound of a sampling step's working set): measured on a copy of the process
    and network (their state stays as it is) for one and two examples, and scaled linearly."""
    diffusion, model = copy.deepcopy(diffusion), copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    one, two = (memory.loss_activation_bytes(diffusion, model, probe_batch(dataset, b, generator, diffusion.dequantizes))
                for b in (1, 2))
    return one + max(0, two - one) * (batch_size - 1)


def probe_batch(dataset: datasets.Dataset, size: int, generator: torch.Generator, dequantize: bool) -> torch.Tensor:
    """``size`` examples in model units for measuring memory: training examples when the data set
    holds them, else zeros of their shape (a run loaded without its data: only the shape counts)."""
    if len(dataset.train) == 0:
        return torch.zeros((size, *dataset.event_shape))
    return dataset.to_model(dataset.train[np.arange(size) % len(dataset.train)], generator, dequantize=dequantize)


def training_memory(cfg: Config, dataset: datasets.Dataset, params: float, buffers: float,
                    activations: float) -> memory.Estimate:
    """:func:`thermodiff.run.memory.training_estimate` of ``cfg`` on ``dataset``."""
    batch_bytes = 3 * cfg.train.batch_size * dataset.dim * 8  # drawn in float64, converted, and in float32
    has_val = dataset.val is not None and len(dataset.val) > 0
    return memory.training_estimate(params, buffers, activations, batch_bytes, cfg.train.ema_decay > 0, has_val)


@dataclass
class Parts:
    """The data, process and network that a config describes (:func:`assemble`)."""

    dataset: datasets.Dataset
    kind: str  # the process kind: gaussian, binomial, categorical or vdm
    diffusion: nn.Module
    model: nn.Module


def assemble(cfg: Config, override: np.ndarray | None = None, scaling: datasets.Scaling | None = None,
             memory_device: torch.device | None = None) -> Parts:
    """Build the data, the process and the network of ``cfg``, deciding its "auto" settings
    (:func:`prepare_dataset`, whose ``override`` and ``scaling`` these are). The network's initial
    weights are drawn from torch's global generator seeded with ``cfg.seed``, so that a run's
    initialisation is its config's. With ``memory_device``, training that cannot fit in that
    device's memory is refused (:func:`training_memory`): before anything is built at full size
    (:func:`state_bytes_at_T`), and with the batch's activations measured (:func:`batch_activations`)
    before a file is written."""
    dataset, kind = prepare_dataset(cfg, override, scaling)
    data_mean = float(dataset.train.mean())  # one pass over the training examples
    if memory_device is not None:  # before anything is built at full size
        memory.require_fits(training_memory(cfg, dataset, *state_bytes_at_T(cfg, dataset, kind, data_mean), 0),
                            memory_device)
    parts = build_parts(cfg, dataset, kind, data_mean)
    if memory_device is not None:  # the state as built, and the batch's activations
        activations = batch_activations(dataset, parts.diffusion, parts.model, cfg.train.batch_size)
        memory.require_fits(training_memory(cfg, dataset, *memory.state_bytes([parts.diffusion, parts.model]),
                                            activations), memory_device)
    return parts


def build_parts(cfg: Config, dataset: datasets.Dataset, kind: str, data_mean: float) -> Parts:
    """The process and the network of ``cfg`` (every "auto" decided) for ``dataset``, whose
    training examples' mean ``data_mean`` is (see :func:`build_diffusion`)."""
    torch.manual_seed(cfg.seed)
    diffusion = build_diffusion(cfg, kind, data_mean, data_bins(dataset))
    return Parts(dataset, kind, diffusion, build_model(cfg, diffusion, dataset.event_shape))


@dataclass
class Run:
    """A trained run loaded from its directory."""

    path: Path
    config: Config
    dataset: datasets.Dataset
    diffusion: nn.Module
    model: nn.Module
    step: int
    meta: dict
    checkpoint: str = "last"  # which weights: "last" (of checkpoint.safetensors) or "best" (by the validation bound)
    device: torch.device = torch.device("cpu")  # where the network and the process's tables are

    @property
    def training(self) -> dict:
        """What the loaded weights were trained for, as every report states it: updates, and time in
        seconds on the run's clock (None in a checkpoint written before it was recorded)."""
        return {"train_steps": self.step, "train_clock": self.config.train.clock, "train_s": self.meta.get("elapsed_s")}


def _names(keys: list[str], most: int = 3) -> str:
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def state_mismatch(expected: dict, found: dict) -> str | None:
    """What keeps ``found`` tensors from loading into a module whose state dict is ``expected``,
    in one line (counts, and the first names of each kind); None when they fit."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                if k in found and found[k].shape != v.shape]
    parts = [f"{len(names)} {what} ({_names(names)})" for names, what in
             ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape (checkpoint vs model)"))
             if names]
    return "; ".join(parts) or None


def load_state(module: nn.Module, tensors: dict, prefix: str, origin: str) -> None:
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    mismatch = state_mismatch(module.state_dict(), state)
    if mismatch:
        raise UserError(f"{origin}: checkpoint does not match the model its config builds ({prefix.rstrip('.')} "
                        f"tensors: {mismatch}); it was written by another version or edited")
    module.load_state_dict(state)


class SplitUnavailable(UserError):
    """A run's training data (where its test split comes from) are missing or changed."""


def check_training_data(cfg: Config, record: dict, run_dir: Path, why: str) -> None:
    """Refuse, saying what is needed and how to proceed, when the file or folder that the run's
    data come from is gone or (for a file with a recorded digest) no longer holds the same bytes."""
    if cfg.data.source in BUILTIN_SOURCES and cfg.data.source != "texture":
        return  # generated from the seed, or an official data set (its own loader says what is missing)
    path = Path(cfg.data.path if cfg.data.source == "texture" else cfg.data.source)
    digest = record.get("sha256")
    recorded = f" (sha256 {digest[:16]}...)" if digest else ""
    if not path.exists():
        raise SplitUnavailable(f"{why}: {path} is missing; restore it{recorded}")
    if digest and path.is_file() and file_digest(path) != digest:
        raise SplitUnavailable(f"{why}: {path} changed since run {run_dir} was trained on it; restore the "
                               f"original{recorded}")


#: what a run's data record holds to rebuild its data set without the training data (a record
#: written before some of them were kept is rebuilt from the training data, as it was then)
RECORD_KEYS = ("shape", "binary", "dequantized", "lattice", "kind")


def recorded_dataset(record: dict, cfg: Config, scaling: datasets.Scaling,
                     test: np.ndarray | None) -> tuple[datasets.Dataset, float] | None:
    """The run's data set from its checkpoint's record alone (no training examples; ``test`` as
    its test split, else none), and the training data's mean; None if the record lacks something."""
    mean = record.get("train_mean", record.get("stationary_p"))  # a binomial p is the training mean
    if any(key not in record for key in RECORD_KEYS) or (mean is None and record["binary"]):
        return None
    shape = tuple(record["shape"])
    empty = np.zeros((0, *shape), dtype=np.uint8 if len(shape) == 3 else np.float64)
    lattice = datasets.Lattice(**record["lattice"]) if record["lattice"] else None
    dataset = datasets.Dataset(empty, empty if test is None else test, scaling, record["binary"], cfg.data.source,
                               dequantize=record["dequantized"], lattice=lattice)
    return dataset, math.nan if mean is None else mean  # only binary data's mean is used


def _other_data(path: Path, cfg: Config, expected: tuple[int, ...], run_dir: Path) -> np.ndarray:
    """Examples of ``path`` (an array, or a folder of images) in original units, of the run's shape."""
    data = images_or_array(path, cfg.data.size or None)
    got = tuple(data.shape[1:])
    if got != expected:
        what = (f"has {got[0]} columns but run {run_dir} models {expected[0]}-dimensional data" if len(got) == len(expected) == 1
                else f"holds examples of shape {got}, but run {run_dir} models shape {expected}")
        raise UserError(f"{path}: {what}")
    return data


def load_run(run_dir: str | Path, data_path: str | None = None, split: bool = False,
             device: torch.device = torch.device("cpu")) -> Run:
    """Rebuild a run's data, process and network from ``run_dir`` and load its weights onto
    ``device`` (the data stay in host memory). With ``data_path``, those data (original units) are
    the test split; with ``split``, the run's own splits are rebuilt from its training data
    (:class:`SplitUnavailable` if they are missing or changed); otherwise the data set holds no
    examples, only what the checkpoint records of them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    best = run_dir / BEST_CHECKPOINT
    checkpoint = best if best.exists() else run_dir / "checkpoint.safetensors"
    try:
        tensors, meta = load_checkpoint(checkpoint, {"config": dict, "data": dict, "step": int})
    except CorruptCheckpoint as e:
        if checkpoint != best:
            raise
        raise CorruptCheckpoint(f"{e}, or move it aside to use the run's last weights ({checkpoint.name} is read "
                                f"when it exists, else checkpoint.safetensors)") from None
    cfg, record = Config.from_dict(meta["config"], origin=str(checkpoint)), meta["data"]
    try:
        scaling = datasets.Scaling(**record["scaling"])
    except (KeyError, TypeError, UserError) as e:
        raise UserError(f"{checkpoint}: the checkpoint's data scaling is not valid ({first_line(e)}): the file is damaged "
                        "or was written by another program; restore it or train the run again") from None
    override = None if data_path is None else _other_data(Path(data_path), cfg, tuple(record["shape"]), run_dir)
    recorded = None if split else recorded_dataset(record, cfg, scaling, override)
    if recorded is None:
        check_training_data(cfg, record, run_dir, f"run {run_dir}'s test split comes from its training data" if split
                            else f"run {run_dir} (written by an older version) is rebuilt from its training data")
        parts = assemble(cfg, override, scaling)
    else:
        parts = build_parts(cfg, recorded[0], record["kind"], recorded[1])
    if parts.kind == "binomial" and override is not None and not datasets.is_binary(override):
        raise UserError(f"{data_path}: data are not binary, but run {run_dir} is a binomial diffusion")
    if parts.kind == "categorical" and override is not None:
        check_alphabet(override, parts.dataset.lattice, str(data_path))
    weights = "ema." if any(k.startswith("ema.") for k in tensors) else ""  # evaluate the averaged weights
    load_state(parts.model, tensors, f"{weights}model.", str(run_dir))
    load_state(parts.diffusion, tensors, f"{weights}diffusion.", str(run_dir))
    parts.model.eval()
    return Run(run_dir, cfg, parts.dataset, parts.diffusion.to(device), parts.model.to(device), int(meta["step"]), meta,
               "best" if checkpoint == best else "last", device)


def sample_bytes(run: Run) -> int:
    """The bytes of one sample in original units (8-bit images come back as uint8, the rest as float64)."""
    return run.dataset.dim * (1 if run.dataset.dequantize else 8)


def sampling_memory(run: Run, n: int, batch_size: int) -> memory.Estimate:
    """The memory of ``thermodiff sample``: ``n`` samples held four times (the batches, their
    concatenation, the file's buffer and its bytes), drawn ``batch_size`` at a time."""
    working_set = batch_activations(run.dataset, run.diffusion, run.model, min(n, batch_size))
    return memory.Estimate(f"sampling {n} examples", {f"{n} samples (4 copies)": 4 * n * sample_bytes(run),
                                                      "a batch's working set": working_set},
                           "lower -n (draw several files) or --batch-size")
