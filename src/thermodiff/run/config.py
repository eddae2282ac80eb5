"""Experiment configuration: one TOML file per experiment (``configs/NAME.toml``), sections
matching the dataclasses below; command-line flags override single keys. Unknown keys,
ill-typed values and values outside an option's set are errors that name the file and the key."""

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from thermodiff.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: the flag of every command that refuses sizes exceeding the available memory (run/memory.py)
#: to skip that check, here so that the command line's parser needs no torch
MEMORY_OVERRIDE_FLAG = "--ignore-memory-check"
MEMORY_OVERRIDE_HELP = ("skip the check that refuses, before allocating anything, sizes whose estimated memory exceeds "
                        "what this machine has available")
CONFIG_DIR = Path(__file__).parent.parent / "configs"

#: A value decided from the training data by the rules of :mod:`thermodiff.run.autoconfig`, which write
#: the value chosen and the reason into the run's config (``Config.auto``).
AUTO = "auto"
Auto = Literal["auto"]


# The allowed values of every option with a fixed set of them, checked when a config is loaded
# (and by :meth:`Config.validate` for one built in code); tests/test_config.py holds them equal to
# the library's enums and tables. The parameterisations: gaussian reference | paper | eps |
# eps_learned_var | eps_residual; binomial paper | forward_offset | x0; categorical x0; vdm eps.
ScalingMode = Literal["global", "per_dimension", "pca", "none"]  # global: one scalar (the paper's); pca: whitening
DiffusionKind = Literal["gaussian", "binomial", "categorical", "vdm"]  # vdm: continuous time (vdm.py)
# categorical.CategoricalKernel; its 'marginal' kernel is the library's only (the data's frequencies are not recorded with a run)
CategoricalKernelName = Literal["uniform", "absorbing"]
ScheduleName = Literal["reference", "learned", "linear", "cosine", "erase", "log_snr"]  # schedules.ScheduleKind
ParameterizationName = Literal["reference", "paper", "eps", "eps_learned_var", "eps_residual", "forward_offset", "x0"]
VarianceName = Literal["beta_tilde", "beta"]  # gaussian.FixedVariance
DecoderName = Literal["forward", "learned", "discretized"]  # gaussian.Decoder
ScheduleGradientName = Literal["bound", "variance"]  # vdm.ScheduleGradient
TSamplingName = Literal["uniform", "importance"]  # bound.TSampling
NetworkName = Literal["rbf", "mlp", "resmlp", "conv", "unet"]  # rbf, mlp, resmlp: vectors; conv, unet: images
ActivationName = Literal["sigmoid", "tanh", "relu", "leaky_relu", "softplus", "silu"]  # networks.ACTIVATIONS
ReadoutName = Literal["per_step", "bumps"]  # networks.Readout
OptimizerName = Literal["adam", "rmsprop"]
OptimizerKernel = Literal["default", "foreach", "fused"]  # torch.optim's implementations of the step
LrSchedule = Literal["step", "cosine"]
Precision = Literal["fp32", "bf16", "fp16"]
# what train.max_minutes and train.val_minutes count: wall-clock seconds, or this process's CPU seconds
# (all its threads), which give runs that share a busy machine equal work
Clock = Literal["wall", "cpu"]
LossName = Literal["bound", "simple", "hybrid"]  # bound.TrainingLoss
TSampler = Literal["uniform", "loss_aware"]
BaselineKind = Literal["", "vae", "dae", "mcgsm"]


@dataclass
class DataConfig:
    source: str = "swissroll"  # swissroll | heartbeat | mnist | cifar10 | dead_leaves | texture | a path
    key: str | None = None  # which array of a .npz
    n: int = 20000  # examples generated (train + test); for MNIST / CIFAR-10 a cap on training images (0: all)
    data_dir: str = ""  # where MNIST / CIFAR-10 files are (or are downloaded to)
    download: bool = False  # fetch MNIST / CIFAR-10 and verify their md5
    path: str = ""  # the texture image for source = 'texture'
    size: int = 32  # image side for generated images and texture crops (and resizing image folders)
    noise: float = 0.0  # Swiss roll: std of added Gaussian noise, original units
    test_fraction: float = 0.2
    val_fraction: float = 0.0  # of the training split, held out to score checkpoints by the exact bound (0: none)
    scaling: ScalingMode | Auto = "global"


@dataclass
class DiffusionConfig:
    kind: DiffusionKind | Auto = "auto"  # auto: binomial for {0, 1} data, categorical for integer-coded symbols (autoconfig)
    T: int | Auto = 40
    schedule: ScheduleName | Auto = "reference"
    beta_1: float | None | Auto = None  # fixed first-step beta (None: the schedule's own)
    parameterization: ParameterizationName | Auto = "auto"
    eps_variance: VarianceName | None = None  # parameterization 'eps': None is beta_tilde
    decoder: DecoderName | Auto = "forward"  # forward: paper App. B.2; discretized: 8-bit images
    stationary_p: float | None = None  # binomial: None = the training data's mean activity
    kernel: CategoricalKernelName = "uniform"  # categorical: what each step mixes in (uniform; absorbing: a mask state)
    # vdm: 'variance' lets the learned schedule's shape cut the loss estimate's variance (VDM sec. 5.2)
    schedule_gradient: ScheduleGradientName = "bound"


@dataclass
class ModelConfig:
    network: NetworkName | Auto = "rbf"
    preset: str = "small"  # a key of convnet.PRESETS (conv) or unet.UNET_PRESETS (unet)
    conv: dict = field(default_factory=dict)  # overrides of the conv preset, e.g. {n_conv_layers = 6}
    unet: dict = field(default_factory=dict)  # overrides of the unet preset, e.g. {base_channels = 64}
    # the U-Net's Fourier features of x_t, periods p and 2p in model units (0: none); auto: p = one
    # grey level of dequantised 8-bit images (autoconfig.fourier_choice)
    fourier: float | Auto = 0.0
    hidden: int | Auto = 16
    layers: int | Auto = 1
    activation: ActivationName = "tanh"
    readout: ReadoutName = "per_step"
    n_basis: int = 10
    bump_width: float = 0.5  # bump width in centre spacings (reference code 0.5, paper 1.0)


@dataclass
class TrainConfig:
    steps: int = 20000  # 0: no limit (max_minutes decides)
    batch_size: int | Auto = 512
    optimizer: OptimizerName = "adam"  # rmsprop: the reference code's
    # default: torch's choice (a loop over the tensors on a CPU); foreach: one multi-tensor op per
    # update term; fused: one kernel for the whole step (Adam only)
    optimizer_kernel: OptimizerKernel = "default"
    lr: float | Auto = 1e-3
    lr_schedule: LrSchedule = "step"  # step: lr_decay every lr_decay_every steps; cosine: to 0 at the run's end
    warmup: float = 0.0  # the fraction of the run over which lr rises linearly from 0 (cosine schedule)
    lr_decay_every: int = 0  # multiply lr by lr_decay every this many steps (0: never)
    lr_decay: float = 0.1
    lr_min: float = 1e-4
    grad_clip: float = 0.0  # max gradient norm (0: off)
    checkpoint_every: int = 1000
    log_every: int = 100
    max_nonfinite: int = 20  # stop after this many non-finite losses in a row
    ema_decay: float = 0.0  # exponential moving average of the weights (0: off); evaluation uses it
    # bf16: autocast, CPU or GPU; fp16: autocast, GPU only; auto: bf16 where the device computes it
    # natively, else fp32 (decided when training starts: autoconfig.precision_choice)
    precision: Precision | Auto = "fp32"
    # torch.compile the network (inductor; the first steps pay for the compilation), and image
    # networks and their batches in channels_last memory format (NHWC); auto: decided when training
    # starts from the device and the run's length (autoconfig.speed_choices)
    compile: bool | Auto = False
    channels_last: bool | Auto = False
    # bound: -K; simple: Ho et al.'s L_simple; hybrid: L_simple + hybrid_lambda L_vlb (Gaussian),
    # -K + hybrid_lambda L_ce (categorical, D3PM)
    loss: LossName = "bound"
    hybrid_lambda: float = 0.001  # Nichol & Dhariwal's lambda, and D3PM's on CIFAR-10
    t_sampler: TSampler = "uniform"  # how t is drawn for the one-t estimate; loss_aware: importance sampling
    max_minutes: float | Auto = 0.0  # stop after this much training time (0: no limit)
    clock: Clock = "wall"  # what training time counts: wall seconds, or cpu (the process's CPU seconds)
    val_minutes: float | Auto = 0.0  # score the validation split every this many minutes of training (0: at the end only)
    val_examples: int = 2000  # validation examples scored (the first of the split)


@dataclass
class EvalConfig:
    n_draws: int = 4  # noise draws per example and timestep in the exact bound
    batch_size: int = 2000
    max_examples: int = 0  # 0: the whole test split
    t_samples: int | Auto = "auto"  # steps per example, stratified (an unbiased estimate); 0: every step (exact)
    # how the sampled steps are drawn: importance (strata of equal mass of a pilot's terms, bound.importance_strata;
    # benchmarks/results/recipes_cifar10_60cpumin_importance.json: 4 to 18 times smaller standard errors) or uniform
    t_sampling: TSamplingName = "importance"


@dataclass
class BaselineConfig:
    kind: BaselineKind = ""  # '': the run is a diffusion model; vae, dae: baselines.py, networks from [model]; mcgsm: mcgsm.py
    latent: int = 2  # vae: latent dimensions
    min_var: float = 1e-6  # vae: floor of the Gaussian decoder's variance (the bound's resolution, as beta_1)
    n_importance: int = 64  # vae: samples of the importance-weighted bound at evaluation
    noise_std: float = 1.0  # dae: corruption std on the scaled data (1: SNR 1 for unit-variance data)
    radius: int = 3  # mcgsm: the causal neighbourhood, rows above and pixels either side (3: 24 pixels)
    components: int = 8  # mcgsm: mixture components c
    scales: int = 4  # mcgsm: scales s per component
    features: int = 24  # mcgsm: shared directions b_n of the gates' precision matrices


def _at_least(low: int):
    return (lambda v: v >= low), f"be at least {low}"


_POSITIVE = (lambda v: 0 < v < math.inf), "be positive and finite"
_NON_NEGATIVE = (lambda v: 0 <= v < math.inf), "be >= 0 and finite"
_PROBABILITY = (lambda v: v is None or 0 < v < 1), "lie in (0, 1)"  # NaN fails every comparison

# The range of every numeric key, checked whenever a Config is built or trained, so that a bad
# value is a one-line error before any work (combinations of values, such as a parameterisation
# of another process or a preset of another network, are checked where they are used).
RANGES = {
    "seed": ((lambda v: 0 <= v < 2**32), "lie in 0 .. 2**32 - 1"),
    "data.n": _at_least(0),
    "data.size": _at_least(0),
    "data.noise": _NON_NEGATIVE,
    "data.test_fraction": _PROBABILITY,
    "data.val_fraction": ((lambda v: 0 <= v < 1), "lie in [0, 1)"),
    "diffusion.T": _at_least(2),
    "diffusion.beta_1": _PROBABILITY,
    "diffusion.stationary_p": _PROBABILITY,
    "model.hidden": _at_least(1),
    "model.layers": _at_least(1),
    "model.n_basis": _at_least(1),
    "model.fourier": ((lambda v: 0 <= v < math.inf), "be 0 (none) or a positive finite period"),
    "model.bump_width": _POSITIVE,
    "train.steps": _at_least(0),
    "train.batch_size": _at_least(1),
    "train.lr": _POSITIVE,
    "train.warmup": ((lambda v: 0 <= v < 1), "lie in [0, 1)"),
    "train.lr_decay_every": _at_least(0),
    "train.lr_decay": ((lambda v: 0 < v <= 1), "lie in (0, 1]"),
    "train.lr_min": _NON_NEGATIVE,
    "train.grad_clip": _NON_NEGATIVE,
    "train.checkpoint_every": _at_least(1),
    "train.log_every": _at_least(1),
    "train.max_nonfinite": _at_least(1),
    "train.ema_decay": ((lambda v: 0 <= v < 1), "lie in [0, 1)"),
    "train.hybrid_lambda": _NON_NEGATIVE,
    "train.max_minutes": _NON_NEGATIVE,
    "train.val_minutes": _NON_NEGATIVE,
    "train.val_examples": _at_least(1),
    "eval.n_draws": _at_least(1),
    "eval.batch_size": _at_least(1),
    "eval.max_examples": _at_least(0),
    "eval.t_samples": _at_least(0),
    "baseline.latent": _at_least(1),
    "baseline.min_var": _NON_NEGATIVE,
    "baseline.n_importance": _at_least(1),
    "baseline.noise_std": _POSITIVE,
    "baseline.radius": _at_least(1),
    "baseline.components": _at_least(1),
    "baseline.scales": _at_least(1),
    "baseline.features": _at_least(1),
}


@dataclass
class Config:
    name: str = "custom"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    auto: dict = field(default_factory=dict)  # key -> why autoconfig chose its value (written, not read)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, origin: str = "config") -> "Config":
        cfg = _build(cls, raw, origin, prefix="")
        cfg.validate(origin)
        return cfg

    def validate(self, origin: str = "config") -> None:
        """Refuse values outside an option's set (for a config built in code; a loaded one is checked
        as it is read) or out of range (see :data:`RANGES`), naming the key and where it came from."""
        if not self.name:
            raise UserError(f"{origin}: name must not be empty")
        for section in dataclasses.fields(self):
            if dataclasses.is_dataclass(section.type):
                _check_choices(getattr(self, section.name), f"{origin}: {section.name}.")
        for key, (ok, requirement) in RANGES.items():
            section, _, name = key.rpartition(".")
            value = getattr(getattr(self, section) if section else self, name)
            if value != AUTO and not ok(value):
                raise UserError(f"{origin}: {key} must {requirement}, got {value!r}")
        if self.train.steps == 0 and self.train.max_minutes == 0:
            raise UserError(f"{origin}: train.steps = 0 (no step limit) needs a time budget: set train.max_minutes "
                            "or pass --minutes")


def _literal_or_type(annotation) -> tuple:
    """A Literal's allowed values, or the type itself."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else (annotation,)


def _check_type(value, annotation, where: str, key: str = ""):
    """Return ``value`` if it fits ``annotation`` (ints are accepted as floats); ``key`` (a
    :data:`RANGES` key) names the range that an integer too large for 64 bits is outside of."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = [o for a in (typing.get_args(annotation) if union else (annotation,)) for o in _literal_or_type(a)]
    for option in options:
        if option is type(None) and value is None:
            return value
        if isinstance(option, str) and value == option:  # a Literal's value, e.g. AUTO
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63:
            return value  # TOML integers are 64-bit (tomllib accepts any)
        if option in (str, bool, dict) and type(value) is option:
            return value
    if int in options and isinstance(value, int) and not isinstance(value, bool):  # too large for 64 bits
        ok, requirement = RANGES.get(key, (lambda v: True, ""))
        requirement = "lie in -2**63 .. 2**63 - 1 (a 64-bit integer)" if ok(value) else requirement
        raise UserError(f"{where}: must {requirement}, got {value}")
    names = " or ".join("none" if o is type(None) else repr(o) if isinstance(o, str) else o.__name__ for o in options)
    raise UserError(f"{where}: expected {names}, got {value!r}")


def _choices(annotation) -> bool:
    """Whether ``annotation`` is a fixed set of values: Literals, with or without None."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if union else (annotation,)
    return all(o is type(None) or typing.get_origin(o) is Literal for o in options)


def _check_choices(section, prefix: str) -> None:
    """Check every option of ``section`` that has a fixed set of values (as loading does)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        if _choices(hints[f.name]):
            _check_type(getattr(section, f.name), hints[f.name], f"{prefix}{f.name}")


def _build(cls, raw: dict, origin: str, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"{origin}: [{prefix.rstrip('.')}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise UserError(f"{origin}: unknown key '{prefix}{key}' (known: {', '.join(fields)})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, origin, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(value, hint, f"{origin}: {prefix}{key}", f"{prefix}{key}")
    return cls(**kwargs)


def find_config(name_or_path: str) -> Path:
    """A TOML path as given, or the experiment of that name in the packaged ``configs/``."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file():  # a folder named like an experiment does not shadow it
        if not path.is_file():
            raise UserError(f"{path}: no such config file")
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
        raise UserError(f"unknown experiment {name_or_path!r}; known: {known} (or give a .toml path)")
    return candidate


def parse_override(text: str) -> tuple[list[str], object]:
    """'section.key=value' with a TOML value (bare words are taken as strings; a bare ``none``
    or ``null`` is None, which TOML cannot spell, so that optional keys can be reset)."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value")
    key, value = text.split("=", 1)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        word = value.strip()  # a bare word, as in 'key = word'
        parsed = None if word.lower() in ("none", "null") else word
    except RecursionError:  # tomllib recurses into nested arrays and tables
        raise UserError(f"--set {text[:80]!r}: value nested too deeply") from None
    return key.strip().split("."), parsed


def load_config(name_or_path: str, overrides: list[str] = ()) -> Config:
    """Read a config and apply ``section.key=value`` overrides, validating everything."""
    path = find_config(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path}: not valid TOML: {str(e) or type(e).__name__}") from None
    raw.setdefault("name", path.stem)
    for text in overrides:
        keys, value = parse_override(text)
        table = raw
        for k in keys[:-1]:
            table = table.setdefault(k, {})
            if not isinstance(table, dict):
                raise UserError(f"--set {text!r}: '{k}' is not a section")
        table[keys[-1]] = value
    return Config.from_dict(raw, origin=str(path))

