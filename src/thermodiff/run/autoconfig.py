"""Settings decided from the data. Every config value left at ``"auto"`` is chosen here from the
training split alone (never the validation or test split), and the value and the reason are
written into the run's config (``Config.auto``, shown by ``thermodiff evaluate``); one, the
network's precision, from the device that trains (:func:`precision_choice`).

The rules depend on the data's kind, size N and dimension D and on measured properties of the
training examples, never on a data set's name. The kind: binary {0, 1} data get binomial diffusion;
an integer array (its file's dtype) whose values form one alphabet of at most MAX_CATEGORIES evenly
spaced symbols gets categorical diffusion, as symbols (bases, residues, grey levels, palette
indices) have no order for a Gaussian's smooth density to exploit; integers stored as floats
(counts written by numpy) or on more levels are an ordinal lattice, for Gaussian diffusion with a
decoder over the lattice, which shares strength between neighbouring values. They were measured on the known-likelihood
battery (``benchmarks/known_likelihood.py``: data sets whose exact log-likelihood is known).

Continuous vectors are whitened (PCA) so that their mean and covariance are those of N(0, I);
Gaussian diffusion on equal steps of log SNR then starts, with the ``eps_residual``
parameterisation and a network whose output starts at zero, as the exact model of a Gaussian with
the data's covariance, and the network learns what is not Gaussian. The first step beta_1, the
bound's resolution, comes from the whitened data's nearest-neighbour distances: structure finer
than the sampling resolution cannot be learned, and structure coarser than sqrt(beta_1) is kept.
Their 1st percentile, not their median, so that a narrow part of the data (a mixture component
holding a few percent of it) sets the resolution rather than the broad bulk.

Training runs on a time budget, with a validation split that picks the best weights: with few
examples the best come early (the network starts at the whitened Gaussian, and is scored there
too), so the budget need not shrink with N.
"""

import math
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from thermodiff.data.dataset import Lattice
from thermodiff.process.gaussian import Bins
from thermodiff.run.config import AUTO, Config
from thermodiff.run.machine import cpu_bf16_units, native_bf16

#: Whitening needs a covariance estimated from at least this many examples per dimension.
PCA_EXAMPLES_PER_DIM = 10
#: beta_1 = (NN_QUANTILE of the nearest-neighbour distances / NN_RESOLUTION)^2 in whitened units ...
NN_QUANTILE = 0.01
NN_RESOLUTION = 5.0
#: ... at most RESOLUTION_NATS / D: the resolution costs a Gaussian about beta_1 / 2 nats per
#: dimension (the blur of x_1), so the whole bound loses at most ~0.005 bits to it ...
RESOLUTION_NATS = 0.007
#: ... and at least this (log SNR 18.4 at t = 1: finer resolution only spreads the steps thinner).
MIN_BETA_1 = 1e-8
#: Points whose nearest neighbours are measured (enough for a stable 1st percentile).
NN_QUERIES = 2000
#: The time budget: MINUTES_PER_DIM minutes per dimension, within [MIN_MINUTES, MAX_MINUTES].
MIN_MINUTES, MINUTES_PER_DIM, MAX_MINUTES = 3.0, 1.0, 10.0
#: Steps of Gaussian diffusion: training costs the same at any T; evaluating and sampling cost T network calls.
GAUSSIAN_T = 500
#: Binomial diffusion: T = BINOMIAL_T_PER_DIM D steps, within [BINOMIAL_MIN_T, BINOMIAL_MAX_T].
BINOMIAL_MIN_T, BINOMIAL_T_PER_DIM, BINOMIAL_MAX_T = 200, 10, 2000
#: Integer-valued data: sqrt(beta_1) = the finest lattice step / LATTICE_RESOLUTION. One step: x_1
#: blurs each value over its neighbours, so the chain learns a smooth density and the discretized
#: decoder (a Gaussian over the bins) resolves the values. On two count data sets (poisson_mix_3d,
#: binomial_counts_5d, 3 minutes) K fell short of the exact log-probability by 5.2 / 11.3 bits at a
#: sixteenth of a step (spikes the network cannot learn), 0.08 / 0.35 at half a step, 0.06 / 0.06 at one.
LATTICE_RESOLUTION = 1.0


#: Integer-coded data with at most this many symbols (one evenly spaced alphabet over every column)
#: are categorical (DNA has 4, amino acids 20, palettes and grey levels a few); more levels, or
#: integers stored as floats (counts, as numpy writes Poisson draws converted), are an ordinal lattice.
MAX_CATEGORIES = 32


#: Steps per image of the default bound estimate (``eval.t_samples = "auto"``): summing all
#: T = 1000 steps of a network on 10000 MNIST images takes ~20 CPU minutes, 50 stratified steps ~1.
IMAGE_T_SAMPLES = 50


def default_t_samples(is_image: bool) -> int:
    """``eval.t_samples = "auto"``: every step (0: the exact sum) for vectors, whose networks are
    cheap; :data:`IMAGE_T_SAMPLES` stratified steps per image (an unbiased estimate) for images."""
    return IMAGE_T_SAMPLES if is_image else 0


@dataclass(frozen=True)
class Choice:
    key: str  # "section.name"
    value: object
    reason: str


def _apply(cfg: Config, choices: list[Choice]) -> None:
    """Set every chosen key that the config leaves at "auto", recording why."""
    for c in choices:
        section, _, name = c.key.rpartition(".")
        owner = getattr(cfg, section) if section else cfg
        if getattr(owner, name) == AUTO:
            setattr(owner, name, c.value)
            cfg.auto[c.key] = f"{c.value}: {c.reason}"


def kind_choice(binary: bool, image: bool, integers: bool, alphabet: Lattice | None) -> Choice:
    """The process for the data: binomial for {0, 1}; categorical for symbols, integers as the file
    stores them (an integer dtype) on one alphabet of 2..MAX_CATEGORIES evenly spaced values; else
    Gaussian (with the discretized decoder for other integer values: an ordinal lattice)."""
    if binary:
        return Choice("diffusion.kind", "binomial", "binary {0, 1} data: binomial diffusion (paper App. A)")
    count = None if alphabet is None else alphabet.count[0]
    if integers and not image and count is not None and count <= MAX_CATEGORIES:
        return Choice("diffusion.kind", "categorical", f"symbols: an integer array whose values are one alphabet of "
                      f"{count} <= {MAX_CATEGORIES} categories (low {alphabet.low[0]:g}, step {alphabet.step[0]:g}); "
                      "categorical diffusion, whose kernels ignore their order")
    why = ("8-bit images" if image else f"integers on {count} > {MAX_CATEGORIES} levels: an ordinal lattice"
           if integers and count is not None else "not integer-coded symbols (floats, or integers off one alphabet)")
    return Choice("diffusion.kind", "gaussian", f"{why}: Gaussian diffusion")


def resolve_kind(cfg: Config, binary: bool, image: bool, integers: bool, alphabet: Lattice | None) -> None:
    """diffusion.kind, if "auto" (:func:`kind_choice`)."""
    _apply(cfg, [kind_choice(binary, image, integers, alphabet)])


def resolve_data(cfg: Config, train: np.ndarray, kind: str, lattice: Lattice | None) -> None:
    """The choices made before the data are scaled: the network family and the scaling."""
    image = train.ndim == 4
    n, dim = len(train), int(np.prod(train.shape[1:]))
    choices = [Choice("model.network", "unet" if image else "resmlp",
                      "images: a time-conditioned U-Net" if image else
                      "vectors: a residual MLP with the time in every block")]
    if kind == "binomial":
        choices.append(Choice("data.scaling", "none", "binary data enter binomial diffusion as they are"))
    elif kind == "categorical":
        choices.append(Choice("data.scaling", "none", "categorical data enter as their symbols' indices 0..K-1"))
    elif image:
        choices.append(Choice("data.scaling", "global", "images: one scale for every pixel"))
    elif lattice is not None:
        choices.append(Choice("data.scaling", "per_dimension", "integer-valued data: per-dimension scaling keeps "
                              "their lattice on the axes, where the discretized decoder's bins are"))
    elif dim > 1 and n >= PCA_EXAMPLES_PER_DIM * dim:
        choices.append(Choice("data.scaling", "pca", f"whitening: N = {n} >= {PCA_EXAMPLES_PER_DIM} D estimates the "
                              "covariance; its log-determinant enters K in original units"))
    else:
        why = "one dimension" if dim == 1 else f"N = {n} < {PCA_EXAMPLES_PER_DIM} D is too few to whiten"
        choices.append(Choice("data.scaling", "per_dimension", why))
    _apply(cfg, choices)


def nn_distance_quantile(z: np.ndarray, quantile: float = NN_QUANTILE, queries: int = NN_QUERIES,
                         seed: int = 0) -> float:
    """The ``quantile`` of the distances from up to ``queries`` training points to their nearest
    other training point (exact, in chunks)."""
    x = torch.as_tensor(z, dtype=torch.float64)
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:queries]
    nearest = []
    for chunk in torch.split(pick, 256):
        d = torch.cdist(x[chunk], x)
        d[torch.arange(len(chunk)), chunk] = math.inf  # not itself
        nearest.append(d.min(1).values)
    return float(np.quantile(torch.cat(nearest).numpy(), quantile))


def beta_1_choice(z: np.ndarray) -> Choice:
    """beta_1 for whitened continuous data ``z`` (see the module's docstring)."""
    dim = z.shape[1]
    fine = nn_distance_quantile(z)
    by_data, ceiling = (fine / NN_RESOLUTION) ** 2, RESOLUTION_NATS / dim
    value = float(min(max(by_data, MIN_BETA_1), ceiling))
    why = (f"({NN_QUANTILE:.0%} quantile of nearest-neighbour distances {fine:.3g} / {NN_RESOLUTION:g})^2 = "
           f"{by_data:.3g} in whitened units")
    if value == ceiling:
        why += f", capped at {RESOLUTION_NATS} / D so that the resolution costs under ~0.005 bits"
    elif value == MIN_BETA_1:
        why += f", raised to the floor {MIN_BETA_1:g}"
    return Choice("diffusion.beta_1", float(f"{value:.3g}"), why)


def lattice_choices(bins: Bins) -> list[Choice]:
    """The decoder and beta_1 of integer-valued data: a discretized decoder over their bins, and a
    first step of std 1 / LATTICE_RESOLUTION of the finest bin (see LATTICE_RESOLUTION)."""
    finest = float(np.min(bins.width))
    return [Choice("diffusion.decoder", "discretized",
                   "integer-valued data: K bounds the log-probability of the values on their lattice"),
            Choice("diffusion.beta_1", float(f"{(finest / LATTICE_RESOLUTION) ** 2:.3g}"),
                   f"(finest lattice step {finest:.3g} in model units / {LATTICE_RESOLUTION:g})^2")]


def gaussian_choices(cfg: Config, z: np.ndarray, bins: Bins | None) -> list[Choice]:
    if bins is not None:
        resolution = lattice_choices(bins)
    else:
        resolution = [Choice("diffusion.decoder", "forward", "the forward step reversed (exact for whitened Gaussian data)")]
        if cfg.diffusion.beta_1 == AUTO:  # the nearest-neighbour search only when it decides something
            resolution.append(beta_1_choice(z))
    return resolution + [
        Choice("diffusion.schedule", "log_snr", "equal steps of log SNR from the resolution beta_1"),
        Choice("diffusion.T", GAUSSIAN_T, f"{GAUSSIAN_T} steps of log SNR: on a ring of narrow Gaussians, 6000 training steps "
               "(2 minutes) came within 0.19 bits of the exact log-likelihood at T = 100, 0.11 at 200, 0.06 at 500 "
               "(benchmarks/results/gaussian_T*.json)"),
        Choice("diffusion.parameterization", "eps_residual",
               "noise and variance as residuals from whitened Gaussian data's exact reverse kernel"),
    ]


def discrete_choices(dim: int, kind: str) -> list[Choice]:
    """Binomial and categorical diffusion (the binomial's rules, measured on binary data)."""
    T = min(max(BINOMIAL_MIN_T, BINOMIAL_T_PER_DIM * dim), BINOMIAL_MAX_T)
    return [
        Choice("diffusion.schedule", "erase", f"{kind}: erase 1/T of the signal per step (paper App. D.1.2)"),
        Choice("diffusion.T", T, f"{kind}: max({BINOMIAL_MIN_T}, {BINOMIAL_T_PER_DIM} D) steps, at most "
               f"{BINOMIAL_MAX_T}: the best factorised reverse step's bound falls short of the truth by ~0.2 D / T bits"
               + ("" if kind == "binomial" else " (measured for binomial diffusion)")),
        Choice("diffusion.beta_1", None, f"{kind}: the erase schedule's own"),
        Choice("diffusion.parameterization", "x0", "the network predicts x_0; the kernel is the forward posterior "
               "averaged over that prediction (the form of the best factorised reverse step)"),
        Choice("diffusion.decoder", "learned", "the x_0 prediction itself at t = 1"),
    ]


def network_choices(dim: int, discrete: bool) -> list[Choice]:
    if discrete:
        return [Choice("model.hidden", 128, "binary or categorical data: 128 units (256 overfit a 64-D binary mixture "
                       "of 16000 examples)"),
                Choice("model.layers", 2, "binary or categorical data: 2 residual blocks")]
    hidden = 256 if dim <= 16 else 512
    return [Choice("model.hidden", hidden, f"D = {dim}: {hidden} units"),
            Choice("model.layers", 3, "3 residual blocks")]


def training_choices(cfg: Config, dim: int, discrete: bool) -> list[Choice]:
    batch = 256 if discrete else 512
    minutes = min(max(MIN_MINUTES, MINUTES_PER_DIM * dim), MAX_MINUTES)
    choices = [Choice("train.batch_size", batch, f"batches of {batch}"),
               Choice("train.lr", 2e-3, "Adam at 2e-3 with warm-up and cosine decay over the budget"),
               Choice("train.max_minutes", minutes, f"{MINUTES_PER_DIM:g} minute per dimension, at least "
                      f"{MIN_MINUTES:g} and at most {MAX_MINUTES:g}")]
    _apply(cfg, choices)
    budget = cfg.train.max_minutes
    every = budget / 10 if budget else 1.0
    return [Choice("train.val_minutes", every, "a tenth of the time budget" if budget else "every minute")]


def precision_choice(device: torch.device) -> Choice:
    """train.precision: bf16 autocast where ``device`` computes bf16 natively (a CPU with AMX or
    AVX-512 BF16, a CUDA device from compute capability 8.0), fp32 elsewhere, where bf16 is
    emulated and runs slower than fp32."""
    if native_bf16(device):
        units = cpu_bf16_units() if device.type == "cpu" else "a CUDA device that supports it"
        return Choice("train.precision", "bf16", f"autocast, since {units} computes bf16 natively")
    where = (f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no AMX or AVX-512 BF16"
             if device.type == "cpu" else f"{device} does not support bf16")
    return Choice("train.precision", "fp32", f"{where}, so bf16 would be emulated and slower")


#: torch.compile pays about a minute of compilation at every start (the cpu U-Net on the 2-core
#: CPU); runs shorter than this many minutes, or of fewer steps without a time budget, train uncompiled.
COMPILE_MIN_MINUTES, COMPILE_MIN_STEPS = 10.0, 1000
#: measured side by side in thermodiff's training loop (benchmarks/train_speed.py)
SPEED_EVIDENCE = ("torch.compile with channels_last trained the cpu U-Net faster on 2 CPU threads in fp32 "
                  "(benchmarks/results/train_speed_mnist_unet_simple.json)")


def speed_choices(cfg: Config, device: torch.device) -> list[Choice]:
    """train.channels_last and train.compile: both for image networks training in fp32 on a CPU,
    where their gain was measured (:data:`SPEED_EVIDENCE`), compile only for a run long enough to
    repay its compilation and where a C++ compiler can build inductor's CPU kernels. Neither in
    bf16 (on a CPU with AMX channels_last trained no faster in bf16, and all options together
    slower than two threads alone: docs/results.md), on a GPU or for vector networks (not
    measured there)."""
    t = cfg.train
    unmeasured = (f"{device}: the speed options were measured on CPUs only" if device.type != "cpu" else
                  f"model.network = {cfg.model.network!r}: the speed options were measured on image networks"
                  if cfg.model.network not in ("conv", "unet") else
                  f"train.precision = {t.precision!r}: the speed options were not shown to help in bf16"
                  if t.precision != "fp32" else None)
    if unmeasured:
        return [Choice("train.channels_last", False, unmeasured), Choice("train.compile", False, unmeasured)]
    compiler, minutes = os.environ.get("CXX", "g++"), 0.0 if t.max_minutes == AUTO else t.max_minutes
    long_run = minutes >= COMPILE_MIN_MINUTES if minutes else t.steps >= COMPILE_MIN_STEPS
    compile_reason = (SPEED_EVIDENCE if long_run else
                      f"a {f'{minutes:g}-minute' if minutes else f'{t.steps}-step'} run: compilation "
                      f"(about a minute at every start) pays back from {COMPILE_MIN_MINUTES:g} minutes or "
                      f"{COMPILE_MIN_STEPS} steps")
    if long_run and not shutil.which(compiler):
        long_run, compile_reason = False, f"no C++ compiler ({compiler}) to build inductor's CPU kernels"
    return [Choice("train.channels_last", True, SPEED_EVIDENCE), Choice("train.compile", long_run, compile_reason)]


#: why model.fourier = "auto" gives a U-Net on 8-bit images VDM's Fourier features (2^6 and 2^7
#: cycles per unit on its [-1, 1] scale: periods of two grey levels and one), and what they bought here
FOURIER_REASON = ("the U-Net sees sin and cos of 2 pi x / p and 2 pi x / 2p (VDM's Fourier features), so at low "
                  "noise it sees where x lies within its grey level; at 60 CPU minutes on dead leaves they bought "
                  "nothing (benchmarks/results/dead_leaves_mcgsm_vs_unet_fourier_60cpumin.json), so the default is 0")


def fourier_choice(cfg: Config, kind: str, grey_level: float | None) -> Choice:
    """model.fourier: one grey level in model units (``grey_level``, None for data that are not
    dequantised 8-bit images) for a U-Net on Gaussian or VDM diffusion, 0 (none) otherwise."""
    if cfg.baseline.kind or cfg.model.network != "unet" or kind not in ("gaussian", "vdm") or grey_level is None:
        return Choice("model.fourier", 0.0, "Fourier features are for a U-Net on Gaussian or VDM diffusion of "
                      "dequantised 8-bit images")
    return Choice("model.fourier", float(grey_level), f"one grey level in model units: {FOURIER_REASON}")


def resolve_network_input(cfg: Config, kind: str, grey_level: float | None) -> None:
    """model.fourier, if "auto" (:func:`fourier_choice`)."""
    _apply(cfg, [fourier_choice(cfg, kind, grey_level)])


def resolve_for_device(cfg: Config, device: torch.device) -> None:
    """train.precision, train.compile and train.channels_last, if "auto" (:func:`precision_choice`,
    :func:`speed_choices`)."""
    _apply(cfg, [precision_choice(device)])
    _apply(cfg, speed_choices(cfg, device))  # for the precision decided


def resolve(cfg: Config, train_model_units: np.ndarray | None, kind: str, bins: Bins | None = None) -> None:
    """Every remaining "auto" of a vector run, from its training examples in the model's units
    (whitened continuous data, bits, or category indices), the process kind and the bins of integer-valued data."""
    if train_model_units is None:
        return
    dim, discrete = train_model_units.shape[1], kind in ("binomial", "categorical")
    process = {"binomial": lambda: discrete_choices(dim, kind), "categorical": lambda: discrete_choices(dim, kind),
               "gaussian": lambda: gaussian_choices(cfg, train_model_units, bins),
               "vdm": lambda: []}[kind]()  # VDM's settings are its own (vdm.py)
    _apply(cfg, process + network_choices(dim, discrete) + training_choices(cfg, dim, discrete))
