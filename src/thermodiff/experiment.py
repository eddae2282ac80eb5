"""From a :class:`Config` to data, a diffusion process and a network; and back from a run
directory. This is the only module that knows how config names map to objects."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from thermodiff import data as datasets
from thermodiff.binomial import BinomialDiffusion, BinomialParameterization
from thermodiff.checkpoint import load_checkpoint
from thermodiff.config import Config
from thermodiff.errors import UserError
from thermodiff.gaussian import GaussianDiffusion, GaussianParameterization
from thermodiff.networks import build_vector_net
from thermodiff.schedules import make_schedule

# The paper's figures (v8, Table 1), in bits per sample.
PAPER_RESULTS = {
    "swissroll": {"K_bits": 2.35, "K_minus_L_null_bits": 6.45},
    "heartbeat": {"K_bits": -2.414, "K_minus_L_null_bits": 12.024, "true_log_likelihood_bits": float(np.log2(1 / 5))},
}
BUILTIN_SOURCES = ("swissroll", "heartbeat")


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def raw_data(cfg: Config) -> tuple[np.ndarray, str]:
    """The whole data set in original units, and a description of where it came from."""
    source = cfg.data.source
    if source == "swissroll":
        return datasets.swiss_roll(cfg.data.n, cfg.data.noise, seed=cfg.seed), "swissroll"
    if source == "heartbeat":
        return datasets.heartbeat(cfg.data.n, seed=cfg.seed), "heartbeat"
    if not source:
        raise UserError(f"experiment {cfg.name!r} has no data: pass --data PATH (a .npy, .npz or .csv array)")
    return datasets.load_array(source, cfg.data.key), source


def diffusion_kind(cfg: Config, binary: bool, origin: str) -> str:
    kind = cfg.diffusion.kind
    if kind == "auto":
        return "binomial" if binary else "gaussian"
    if kind not in ("gaussian", "binomial"):
        raise UserError(f"diffusion.kind must be 'auto', 'gaussian' or 'binomial', got {kind!r}")
    if kind == "binomial" and not binary:
        raise UserError(f"{origin}: data are not binary (values other than 0 and 1), so binomial diffusion cannot model them")
    return kind


def resolve_source(cfg: Config) -> None:
    """Make a data file path absolute, so a run can be evaluated from any folder."""
    if cfg.data.source not in BUILTIN_SOURCES:
        cfg.data.source = str(Path(cfg.data.source).resolve())


def prepare_dataset(cfg: Config, override: np.ndarray | None = None, scaling: datasets.Scaling | None = None) -> tuple[datasets.Dataset, str]:
    """Split (seeded by ``cfg.seed``) and scale the data; returns the data set and the
    diffusion kind. With ``override`` and a fitted ``scaling`` (evaluating a trained run on
    other data), all of ``override`` is the test split."""
    x, source = raw_data(cfg)
    binary = datasets.is_binary(x)
    kind = diffusion_kind(cfg, binary, source)
    train_idx, test_idx = datasets.split(len(x), cfg.data.test_fraction, cfg.seed)
    if scaling is None:
        mode = "none" if kind == "binomial" else cfg.data.scaling
        scaling = datasets.Scaling.fit(x[train_idx], mode)
    train, test = x[train_idx], x[test_idx]
    if override is not None:
        test = override
    return datasets.Dataset(scaling.apply(train), scaling.apply(test), scaling, binary, source), kind


def resolve_auto(cfg: Config, kind: str) -> None:
    """Replace 'auto' choices by the paper's choice for the process, so that a run's saved
    config names exactly what produced its figures."""
    d = cfg.diffusion
    d.kind = kind
    if d.schedule == "auto":
        d.schedule = "erase" if kind == "binomial" else "learned"
    if d.parameterization == "auto":
        d.parameterization = (BinomialParameterization.FORWARD_OFFSET if kind == "binomial"
                              else GaussianParameterization.REFERENCE).value


def build_diffusion(cfg: Config, kind: str, data_mean: float) -> nn.Module:
    """The configured process; a binomial one is stationary at ``data_mean`` unless the config
    fixes ``stationary_p``."""
    resolve_auto(cfg, kind)
    d = cfg.diffusion
    try:
        schedule = make_schedule(d.schedule, d.T, d.beta_1)
        if kind == "binomial":
            p = d.stationary_p if d.stationary_p is not None else data_mean
            return BinomialDiffusion(schedule, p, d.parameterization, d.decoder)
        return GaussianDiffusion(schedule, d.parameterization, d.decoder)
    except ValueError as e:
        raise UserError(f"diffusion: {e}") from None


def build_model(cfg: Config, diffusion: nn.Module, dim: int) -> nn.Module:
    m = cfg.model
    try:
        return build_vector_net(m.network, dim, diffusion.outputs_per_dim, diffusion.T, m.hidden, m.layers,
                                m.activation, m.readout, m.n_basis, m.bump_width)
    except ValueError as e:
        raise UserError(f"model: {e}") from None


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


def load_state(module: nn.Module, tensors: dict, prefix: str, origin: str) -> None:
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "mismatch"
        raise UserError(f"{origin}: checkpoint does not match this model ({first})") from None


def load_run(run_dir: str | Path, data_path: str | None = None) -> Run:
    """Rebuild a run's data, process and network from ``run_dir`` and load its weights.
    With ``data_path``, those data (original units) replace the test split."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    tensors, meta = load_checkpoint(run_dir / "checkpoint.safetensors")
    cfg = Config.from_dict(meta["config"], origin=str(run_dir / "checkpoint.safetensors"))
    digest = meta["data"].get("sha256")
    if digest and Path(cfg.data.source).is_file() and file_digest(Path(cfg.data.source)) != digest:
        raise UserError(f"{cfg.data.source}: the file changed since run {run_dir} was trained on it")
    scaling = datasets.Scaling(**meta["data"]["scaling"])
    override = None
    if data_path is not None:
        override = datasets.load_array(data_path)
        if override.shape[1] != len(scaling.shift):
            raise UserError(f"{data_path}: has {override.shape[1]} columns but run {run_dir} models {len(scaling.shift)}-dimensional data")
    dataset, kind = prepare_dataset(cfg, override, scaling)
    if kind == "binomial" and override is not None and not datasets.is_binary(override):
        raise UserError(f"{data_path}: data are not binary, but run {run_dir} is a binomial diffusion")
    diffusion = build_diffusion(cfg, kind, float(dataset.train.mean()))
    model = build_model(cfg, diffusion, dataset.train.shape[1])
    load_state(model, tensors, "model.", str(run_dir))
    load_state(diffusion, tensors, "diffusion.", str(run_dir))
    model.eval()
    return Run(run_dir, cfg, dataset, diffusion, model, int(meta["step"]), meta)


def to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32)

