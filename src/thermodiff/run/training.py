"""The training loop: maximise the stochastic estimate of K with Adam or RMSProp, log
metrics, checkpoint atomically, resume exactly (model, optimiser, step and RNG states).

Everything a run needs to continue bit for bit is its :class:`TrainState`; one optimiser step
(:func:`train_step`) serves the loop and the benchmarks alike."""

import contextlib
import copy
import csv
import errno
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from thermodiff.data.dataset import Dataset
from thermodiff.errors import UserError, first_line, os_error_message
from thermodiff.process.bound import exact_bound, standard_error
from thermodiff.process.contract import Trainable
from thermodiff.process.tensors import LN2
from thermodiff.run import autoconfig, distributed, lock
from thermodiff.run.checkpoint import (
    atomic_write_text,
    flatten_optimizer_state,
    load_checkpoint,
    save_checkpoint,
    umask,
    unflatten_optimizer_state,
)
from thermodiff.run.config import Config, Precision, TrainConfig
from thermodiff.run.distributed import Context
from thermodiff.run.experiment import BEST_CHECKPOINT, Parts, assemble, file_digest, load_state, resolve_source
from thermodiff.run.machine import native_bf16
from thermodiff.run.stopping import RunStopped, StopRequest, stop_requests

CHECKPOINT = "checkpoint.safetensors"
#: the clocks that train.clock names: wall seconds, or the process's CPU seconds (all threads)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
#: the columns of metrics.csv; K_bits_window is the mean K of the steps since the previous record
#: (before it was named, as the loss_bits column, by its negative; :func:`read_metrics` converts)
METRIC_FIELDS = ["step", "K_bits_running", "K_bits_window", "lr", "elapsed_s", "nonfinite_skipped", "val_K_bits"]


def make_optimizer(t: TrainConfig, params) -> torch.optim.Optimizer:
    """``train.optimizer`` (a value the config checked when it was loaded) at ``train.lr``, its
    step implemented as ``train.optimizer_kernel`` says, if torch has that kernel for it."""
    kernel = {} if t.optimizer_kernel == "default" else {t.optimizer_kernel: True}
    try:
        return {"adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}[t.optimizer](params, lr=t.lr, **kernel)
    except (TypeError, RuntimeError) as e:  # TypeError: no such keyword (RMSprop has no fused step)
        raise UserError(f"train.optimizer_kernel = {t.optimizer_kernel!r} is not available for "
                        f"train.optimizer = {t.optimizer!r} in this torch ({first_line(e)})") from None


def learning_rate(t: TrainConfig, step: int, progress: float = 0.0) -> float:
    """The learning rate at ``step``: decayed by lr_decay every lr_decay_every steps (the
    ``step`` schedule), or (``cosine``) a linear warm-up over the first ``warmup`` of the run and
    a cosine decay to 0 at its end, ``progress`` in [0, 1] being how much of the run is done (of
    its steps or of its minutes, whichever limit is nearer)."""
    if t.lr_schedule == "cosine":
        warm = min(1.0, progress / t.warmup) if t.warmup > 0 else 1.0
        return t.lr * warm * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if t.lr_decay_every <= 0:
        return t.lr
    return max(t.lr * t.lr_decay ** (step // t.lr_decay_every), min(t.lr_min, t.lr))


def run_progress(t: TrainConfig, step: int, elapsed_s: float) -> float:
    """How much of the run is done: the larger of its fractions of train.steps and train.max_minutes."""
    return max(step / t.steps if t.steps else 0.0, elapsed_s / (60 * t.max_minutes) if t.max_minutes else 0.0)


def validate_train_config(cfg: Config, world_size: int = 1) -> None:
    cfg.validate()  # the values of every key, also for a Config built in code
    t = cfg.train
    if t.batch_size % world_size:
        raise UserError(f"train.batch_size {t.batch_size} must be divisible by the number of processes ({world_size})")
    if cfg.baseline.kind and cfg.data.val_fraction:  # the validator scores checkpoints by a diffusion's bound
        raise UserError(f"data.val_fraction = {cfg.data.val_fraction:g} scores checkpoints by a diffusion's bound; a "
                        f"{cfg.baseline.kind} baseline keeps its last weights: set data.val_fraction = 0")


def autocast(precision: Precision, device: torch.device):
    """The network's mixed precision: bf16 on any device (on CPUs with AVX-512 BF16 it trains
    faster; benchmarks/throughput.py --precisions fp32,bf16 measures it), fp16 only on CUDA (it
    needs the gradient scaler); the bound's own arithmetic stays in float32/float64 either way (autocast only lowers convolutions and matmuls)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def sampling_network(network: nn.Module, t: TrainConfig, asked: Precision | None = None) -> "AutocastNetwork":
    """``network`` as it samples: in ``asked``, else in bf16 if it trained in bf16 and its device
    computes bf16 natively (bf16 samples the image default's U-Net 1.7 times as fast as fp32 on a
    CPU with AMX, throughput_cpu_options.json, and far slower where it is emulated), else in fp32
    (a GPU's fp16 included). The result's ``precision`` attribute says which."""
    weight = next(network.parameters(), None)
    native = t.precision == "bf16" and native_bf16(torch.device("cpu") if weight is None else weight.device)
    return AutocastNetwork(network, asked or ("bf16" if native else "fp32"))


class AutocastNetwork(nn.Module):
    """``network`` called under :func:`autocast` for ``precision``, its output at least float32: the
    network alone is lowered, while the process's own arithmetic (a VDM's learned schedule
    included) keeps its precision. Other attributes are the network's (a VAE's ``decode``)."""

    def __init__(self, network: nn.Module, precision: Precision):
        super().__init__()
        self.network, self.precision = network, precision

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, x_t.device):
            out = self.network(x_t, t)
        return out.to(torch.promote_types(out.dtype, torch.float32))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.network, name)


def speed_up(net: nn.Module, t: TrainConfig) -> None:
    """The network in place as ``train.channels_last`` and ``train.compile`` say: the layout
    changes only its 4-D weights (convolutions'); compiling in place, unlike wrapping it in
    torch.compile(net), keeps the keys of its state dict (no "_orig_mod." prefix)."""
    if t.channels_last:
        net.to(memory_format=torch.channels_last)
    if t.compile:
        net.compile()


def match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give the optimiser's per-weight state its weight's memory layout. A checkpoint stores it
    contiguous, and torch's fused Adam on a CPU pairs the elements of a state and a weight of
    different layouts by memory order: channels_last weights would be updated wrongly, silently."""
    for param, entry in optimizer.state.items():
        for name, value in entry.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                entry[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def read_metrics(run_dir: Path) -> list[dict]:
    """The complete records of a run's metrics.jsonl, in order ([] when there is none), those of
    older versions with their loss_bits column as K_bits_window (its negative). A last line
    without its newline was cut short by a kill and is left out; any other line that is not a
    JSON record is damage, refused rather than dropped."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_bytes().split(b"\n") if path.exists() else [b""]
    records = []
    for number, line in enumerate(lines[:-1], 1):  # the last item is b"" or the line cut short
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {number} is damaged (not a JSON record: {line[:40]!r}); delete that line "
                            "(or the whole file: the checkpoint does not need it) and run the command again")
        if "loss_bits" in record:  # written by an older version
            record["K_bits_window"] = -record.pop("loss_bits")
        records.append(record)
    return records


def rewrite_metrics(run_dir: Path, upto_step: int) -> None:
    """Keep only complete metric records up to the checkpointed step (after a crash or on resume)."""
    records = [r for r in read_metrics(run_dir) if r.get("step", math.inf) <= upto_step]
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, METRIC_FIELDS, lineterminator="\n", extrasaction="ignore")  # as append_metrics
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())


def append_metrics(run_dir: Path, record: dict) -> None:
    """Append ``record`` to both logs; a failed write (a full disk) is undone, so that no log
    ends in a partial line."""
    for name, line in (("metrics.jsonl", json.dumps(record) + "\n"),
                       ("metrics.csv", ",".join(str(record.get(f, "")) for f in METRIC_FIELDS) + "\n")):
        with open(run_dir / name, "ab", buffering=0) as f:  # unbuffered: truncate must not flush first
            end = f.tell()
            try:
                data = line.encode("utf-8")
                if f.write(data) != len(data):  # a short write: the disk filled
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run_dir / name))
            except OSError:
                f.truncate(end)  # frees space: possible on a full disk
                raise


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the temporary files of atomic writes that a killed process left behind."""
    for path in run_dir.glob(".*.tmp"):
        path.unlink(missing_ok=True)


def create_run_dir(run_dir: Path, populate) -> None:
    """Make ``run_dir`` appear complete or not at all: ``populate(folder)`` fills a temporary
    sibling folder (config, first checkpoint), which is then renamed into place, so a run
    directory always holds a checkpoint to resume from. An existing run (``--overwrite``) is
    moved aside first and deleted last; put back if the new one cannot take its place."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.new."))
    old = None
    try:
        os.chmod(staging, 0o777 & ~umask())  # mkdtemp's 0700 would make the run private
        populate(staging)
        if run_dir.exists():
            old = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.old."))
            os.replace(run_dir, old / run_dir.name)
        os.replace(staging, run_dir)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError) and str(e.filename).startswith(f"{staging}{os.sep}"):  # the new run's file
            e.filename = str(run_dir / Path(e.filename).relative_to(staging))
        if old is not None:
            if (old / run_dir.name).exists():
                os.replace(old / run_dir.name, run_dir)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber anything: only an existing *run* may be replaced, and only with
    ``overwrite``; ``resume`` needs a checkpoint."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a directory")
    if resume:
        if not (run_dir / "checkpoint.safetensors").exists():
            raise UserError(f"{run_dir}: nothing to resume (no checkpoint.safetensors)")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{run_dir}: already exists; pass --resume to continue it or --overwrite to replace it")
        if not any((run_dir / name).exists() for name in ("checkpoint.safetensors", "config.json")):
            raise UserError(f"{run_dir}: is not a thermodiff run directory; refusing to delete it with --overwrite")


class Objective(nn.Module):
    """The network and the process together, so that DDP synchronises a learned schedule too;
    trained on the process's own objective (process.Trainable)."""

    def __init__(self, model: nn.Module, diffusion: Trainable):
        super().__init__()
        self.model, self.diffusion = model, diffusion

    def draws(self, x0: torch.Tensor, generator: torch.Generator):
        """The randomness of one training step (drawn for the whole global batch, then sharded)."""
        return self.diffusion.training_draws(x0, generator)

    def forward(self, x0: torch.Tensor, draws) -> tuple[torch.Tensor, torch.Tensor]:
        return self.diffusion.training_loss(self.model, x0, draws)


class EMA:
    """Exponential moving average of the floating-point weights (evaluated in place of them).

    The decay warms up as TensorFlow's ExponentialMovingAverage(num_updates) does, min(decay,
    (1 + step) / (10 + step)): without it the average of a short run is mostly its initial
    weights (at decay 0.999, a weight of 0.999^1000 = 37% after a thousand updates)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Average in the weights after optimiser update number ``step`` (1-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v, 1 - decay)


@dataclass
class TrainState:
    """Everything that makes a resumed run continue bit for bit: weights, optimiser, weight
    average, loss scale, both generators, the step, the non-finite counts, the running K and
    its logging window, the training time, the best validation score and when to score next."""

    objective: Objective
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    scaler: torch.amp.GradScaler
    noise_gen: torch.Generator  # the steps' randomness (t, noise), on the training device
    order_gen: torch.Generator  # which examples each batch holds, and their dequantisation
    trainer: nn.Module  # what the forward pass runs through: the objective, or its DDP wrapper
    step: int = 0
    nonfinite_skipped: int = 0
    nonfinite_in_a_row: int = 0
    K_bits_running: float | None = None
    window: list[float] = field(default_factory=list)  # the steps' K since the last metrics record
    clock: Callable[[], float] = time.perf_counter  # train.clock's: what training time counts
    start_time: float = field(default_factory=time.perf_counter)  # when training time was 0, on ``clock``
    best: dict | None = None  # {"K_bits", "stderr_bits", "step", "n_examples"} of the best validation score
    next_val_s: float = math.inf  # the training time at which to score the validation split next

    #: what a checkpoint must hold to be resumed (the metrics state added later is optional)
    RESUME_FIELDS = {"config": dict, "step": int, "optimizer": dict, "nonfinite_skipped": int}
    RESUME_TENSORS = ("rng.noise", "rng.order")

    @classmethod
    def start(cls, model: nn.Module, diffusion: nn.Module, t: TrainConfig, seed: int,
              ctx: Context = Context()) -> "TrainState":
        """A new run's state, on ``ctx``'s device, for the weights as they are."""
        objective = Objective(model, diffusion).to(ctx.device)
        speed_up(model, t)
        return cls(objective, make_optimizer(t, list(objective.parameters())),
                   EMA(objective, t.ema_decay) if t.ema_decay > 0 else None,
                   torch.amp.GradScaler("cuda", enabled=t.precision == "fp16" and ctx.device.type == "cuda"),
                   torch.Generator(ctx.device).manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2),
                   DistributedDataParallel(objective) if ctx.distributed else objective,
                   clock=CLOCKS[t.clock], start_time=CLOCKS[t.clock](), next_val_s=60 * t.val_minutes or math.inf)

    @classmethod
    def from_checkpoint(cls, model: nn.Module, diffusion: nn.Module, t: TrainConfig, seed: int,
                        tensors: dict[str, torch.Tensor], meta: dict, ctx: Context = Context(),
                        origin: str = "checkpoint") -> "TrainState":
        """The state that :meth:`to_checkpoint` wrote (``tensors`` and ``meta``), continued on
        ``ctx``'s device; the weights load into ``model`` and ``diffusion`` first, so that the
        optimiser and the weight average start from them."""
        load_state(model, tensors, "model.", origin)
        load_state(diffusion, tensors, "diffusion.", origin)
        state = cls.start(model, diffusion, t, seed, ctx)
        try:
            state.noise_gen.set_state(tensors["rng.noise"])
            state.order_gen.set_state(tensors["rng.order"])
            state.optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
            match_layouts(state.optimizer)
            if state.ema is not None and any(k.startswith("ema.") for k in tensors):
                state.ema.shadow = {k: tensors[f"ema.{k}"].to(ctx.device) for k in state.ema.shadow}
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{origin}: checkpoint does not match this model ({first_line(e)})") from None
        if state.scaler.is_enabled() and meta.get("grad_scaler"):
            state.scaler.load_state_dict(meta["grad_scaler"])  # fp16's loss scale continues, not restarted
        state.step, state.nonfinite_skipped = meta["step"], meta["nonfinite_skipped"]
        state.nonfinite_in_a_row, state.K_bits_running = meta.get("nonfinite_in_a_row", 0), meta.get("K_bits_running")
        state.window, state.best = meta.get("window", []), meta.get("best")
        state.start_time = state.clock() - meta.get("elapsed_s", 0.0)  # training time counts on across resumes
        state.next_val_s = meta.get("next_val_s", state.next_val_s)
        return state

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The tensors and the JSON record of this state, as :meth:`from_checkpoint` reads them."""
        tensors = dict(self.objective.state_dict())  # model.* and diffusion.*
        if self.ema is not None:
            tensors |= {f"ema.{k}": v for k, v in self.ema.shadow.items()}
        optim_tensors, optim_meta = flatten_optimizer_state(self.optimizer.state_dict())
        tensors |= optim_tensors | {"rng.noise": self.noise_gen.get_state(), "rng.order": self.order_gen.get_state()}
        return tensors, {"step": self.step, "optimizer": optim_meta, "nonfinite_skipped": self.nonfinite_skipped,
                         "nonfinite_in_a_row": self.nonfinite_in_a_row, "K_bits_running": self.K_bits_running,
                         "window": self.window, "elapsed_s": self.elapsed_s, "grad_scaler": self.scaler.state_dict(),
                         "best": self.best, "next_val_s": self.next_val_s}

    @property
    def elapsed_s(self) -> float:
        """Training time so far, in seconds of train.clock, across resumes."""
        return self.clock() - self.start_time

    def evaluated_weights(self) -> dict[str, torch.Tensor]:
        """The weights that evaluation uses: the average's, if any (an Objective state dict)."""
        return self.ema.shadow if self.ema is not None else self.objective.state_dict()


class NonFiniteLosses(UserError):
    """train.max_nonfinite non-finite losses in a row: training stops."""


def draw_batch(state: TrainState, dataset: Dataset, batch_size: int, device: torch.device) -> torch.Tensor:
    """A global batch drawn with replacement from the training split (by ``state.order_gen``),
    in model units."""
    idx = torch.randint(0, len(dataset.train), (batch_size,), generator=state.order_gen)
    return dataset.to_model(dataset.train[idx.numpy()], state.order_gen, device,
                            dequantize=state.objective.diffusion.dequantizes)


def train_step(state: TrainState, x0: torch.Tensor, t: TrainConfig, ctx: Context = Context()) -> float | None:
    """One optimiser step on the global batch ``x0``, the same in every process, at the learning
    rate of the run's progress; the gradients clipped, fp16's loss scaled, the weights averaged.
    A non-finite loss in any process skips the step in all (counted; :class:`NonFiniteLosses`
    after train.max_nonfinite in a row). Returns the batch's K in bits per example, or None
    for a skipped step."""
    lr = learning_rate(t, state.step, run_progress(t, state.step, state.elapsed_s))
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    # every process draws the whole global batch's randomness, then takes its shard: the same
    # numbers as one process training on the global batch
    draws, shard = state.objective.draws(x0, state.noise_gen), ctx.shard(len(x0))
    if t.channels_last and x0.ndim == 4:  # after the draws, whose numbers do not depend on the layout
        x0 = x0.contiguous(memory_format=torch.channels_last)
    with autocast(t.precision, ctx.device):
        loss, k = state.trainer(x0[shard], draws[shard])
    state.step += 1
    stats = torch.tensor([float(k.sum()), float(not torch.isfinite(loss)), float(len(k))], dtype=torch.float64,
                         device=k.device)
    k_sum, nonfinite, n = ctx.all_reduce_sum(stats).tolist()
    if nonfinite:  # any process saw a non-finite loss: all skip the step together
        state.nonfinite_skipped += 1
        state.nonfinite_in_a_row += 1
        if state.nonfinite_in_a_row >= t.max_nonfinite:
            raise NonFiniteLosses(f"training stopped at step {state.step}: {state.nonfinite_in_a_row} non-finite "
                                  f"losses in a row (try a lower train.lr or train.grad_clip)")
        return None
    state.nonfinite_in_a_row = 0
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if t.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(list(state.objective.parameters()), t.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.ema is not None:
        state.ema.update(state.objective, state.step)
    k_bits = k_sum / n / LN2
    state.window.append(k_bits)
    state.K_bits_running = k_bits if state.K_bits_running is None else 0.99 * state.K_bits_running + 0.01 * k_bits
    return k_bits


class Validator:
    """Scores weights by the bound on the validation split, always with the same noise (so that
    two checkpoints' scores differ by their weights, not their draws)."""

    #: steps per example of the stratified estimate of the validation examples' bound (the same
    #: steps and noise every time, so that scores differ by the weights)
    T_SAMPLES = 50

    def __init__(self, objective: Objective, dataset: Dataset, cfg: Config, device: torch.device):
        self.copy = copy.deepcopy(objective)  # holds the weights being scored
        self.copy.eval()
        val = dataset.val[: cfg.train.val_examples]
        self.x = dataset.to_model(val, torch.Generator().manual_seed(cfg.seed + 3), device,
                                  dequantize=objective.diffusion.dequantizes)
        self.batch_size, self.seed = cfg.eval.batch_size, cfg.seed + 4

    def score(self, weights: dict[str, torch.Tensor]) -> tuple[float, float | None]:
        """K (bits per example) of ``weights`` (an Objective state dict) and its standard error
        (None for a single validation example)."""
        self.copy.load_state_dict(weights, strict=False)
        generator = torch.Generator(self.x.device).manual_seed(self.seed)
        estimate = exact_bound(self.copy.diffusion, self.copy.model, torch.split(self.x, self.batch_size), 1,
                               generator, t_samples=self.T_SAMPLES)
        return estimate.mean / LN2, standard_error(estimate.per_example, LN2)


@dataclass
class Session:
    """What one training session works with besides its :class:`TrainState`: the run's config,
    folder and data, process 0's validator, and the step of the checkpoint on disk."""

    cfg: Config
    run_dir: Path
    ctx: Context
    dataset: Dataset
    data: dict  # the data record of the run's checkpoints
    validator: Validator | None
    saved_step: int | None = None
    start_time: float = field(default_factory=time.perf_counter)

    def record(self) -> dict:
        """What every checkpoint of the run records besides the state."""
        return {"config": self.cfg.to_dict(), "data": self.data}


def save(state: TrainState, session: Session, folder: Path | None = None) -> None:
    """Checkpoint ``state`` into the run directory (or ``folder``); process 0 writes it."""
    if session.ctx.is_main:
        tensors, meta = state.to_checkpoint()
        save_checkpoint((folder or session.run_dir) / CHECKPOINT, tensors,
                        session.record() | meta | {"world_size": session.ctx.world_size})
    session.saved_step = state.step  # only once written: a failed write leaves the previous one the last


def validate(state: TrainState, session: Session) -> float | None:
    """Score the evaluated weights on the validation split (process 0), keeping the best as
    ``best.safetensors``, which runs are loaded from; None without a validator."""
    if session.validator is None:
        return None
    k_bits, stderr = session.validator.score(state.evaluated_weights())
    if state.best is None or k_bits > state.best["K_bits"]:
        state.best = {"K_bits": k_bits, "stderr_bits": stderr, "step": state.step, "n_examples": len(session.validator.x)}
        weights = {k: v.detach().clone() for k, v in session.validator.copy.state_dict().items()}
        save_checkpoint(session.run_dir / BEST_CHECKPOINT, weights,
                        session.record() | {"step": state.step, "validation": state.best})
    return k_bits


def validate_untrained(state: TrainState, session: Session) -> float | None:
    """:func:`validate` before the first step, its score a metrics row of its own (step 0, no
    training estimate yet): the best checkpoint may be the untrained weights."""
    val_bits = validate(state, session)
    if val_bits is not None and not any(r["step"] == 0 and "K_bits_running" not in r  # a run resumed at step 0
                                        for r in read_metrics(session.run_dir)):     # may have it already
        append_metrics(session.run_dir, {"step": state.step, "elapsed_s": round(state.elapsed_s, 3),
                                         "val_K_bits": round(val_bits, 6)})
    return val_bits


def log_metrics(state: TrainState, session: Session, val_bits: float | None) -> None:
    """Append a metrics record (process 0) and start a new window of steps."""
    if session.ctx.is_main:
        record = {"step": state.step, "K_bits_running": round(state.K_bits_running, 6),
                  "K_bits_window": round(sum(state.window) / len(state.window), 6),
                  "lr": state.optimizer.param_groups[0]["lr"], "elapsed_s": round(state.elapsed_s, 3),
                  "nonfinite_skipped": state.nonfinite_skipped}
        if val_bits is not None:
            record["val_K_bits"] = round(val_bits, 6)
        append_metrics(session.run_dir, record)
    state.window = []


def show(bar: tqdm, state: TrainState, val_bits: float | None) -> None:
    """The running K on the progress bar, and the last validation score and the best."""
    shown = {"K_bits": f"{state.K_bits_running:.3f}"}
    if val_bits is not None:
        shown |= {"val_K": f"{val_bits:.3f}", "best": f"{state.best['K_bits']:.3f}"}
    bar.set_postfix(shown, refresh=False)


def train(cfg: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False, progress: bool = True,
          device: str = "auto", max_minutes: float | None = None, memory_check: bool = True) -> dict:
    """Train ``cfg`` into ``run_dir``; returns a summary. With ``resume`` the run continues from
    its checkpoint (its own config, with ``cfg.train.steps`` as the new total). ``max_minutes``,
    when given, replaces train.max_minutes, also of a resumed run (the training time counts on
    across resumes, so extending a time-limited run needs a new total). Under ``torchrun``
    every process trains on its shard of each global batch and process 0 writes the files.
    ``memory_check``: refuse a run whose estimated memory exceeds the device's available memory
    before any file is written (:func:`thermodiff.run.experiment.training_memory`)."""
    ctx = distributed.setup(device)
    try:
        return _train(cfg, named(Path(run_dir)), resume, overwrite, progress and ctx.is_main, ctx, max_minutes,
                      memory_check)
    finally:
        distributed.teardown(ctx)


def named(run_dir: Path) -> Path:
    """``run_dir`` as given, unless it names no folder of its own (``.``, ``runs/..``): then
    absolute, so that the run is created beside, and renamed as, the folder it means."""
    return Path(os.path.abspath(run_dir)) if run_dir.name in ("", "..") else run_dir


def _train(cfg: Config, run_dir: Path, resume: bool, overwrite: bool, progress: bool, ctx: Context,
           max_minutes: float | None = None, memory_check: bool = True) -> dict:
    """Train while holding the run's lock (one writer per run: taken before the run is looked at)
    and catching SIGINT / SIGTERM (checkpoint the current step, then :class:`RunStopped`)."""
    with lock.hold_in_main(run_dir, ctx), stop_requests() as stop:
        return _train_locked(cfg, run_dir, resume, overwrite, progress, ctx, max_minutes, memory_check, stop)


def _train_locked(cfg: Config, run_dir: Path, resume: bool, overwrite: bool, progress: bool, ctx: Context,
                  max_minutes: float | None, memory_check: bool, stop: StopRequest) -> dict:
    check_run_dir(run_dir, resume, overwrite)
    ctx.barrier()  # every process has checked before process 0 creates the folder
    tensors, meta = (load_checkpoint(run_dir / CHECKPOINT, TrainState.RESUME_FIELDS, TrainState.RESUME_TENSORS)
                     if resume else ({}, {}))
    cfg = run_config(cfg, meta, str(run_dir), max_minutes)
    autoconfig.resolve_for_device(cfg, ctx.device)  # a new run's "auto"; a resumed run keeps its own
    # bad input, and sizes that cannot fit, fail here, before anything on disk changes
    parts = assemble(cfg, memory_device=ctx.device if memory_check else None)
    validate_train_config(cfg, ctx.world_size)  # with every "auto" decided
    resolve_source(cfg)
    if cfg.train.precision == "bf16" and ctx.is_main and not native_bf16(ctx.device):
        print(f"thermodiff train: warning: train.precision = 'bf16' on {ctx.device}, which has no native bf16 "
              "arithmetic: bf16 is emulated here, slower than fp32 (--set train.precision=fp32 for a new run)",
              file=sys.stderr)
    if resume:
        state = TrainState.from_checkpoint(parts.model, parts.diffusion, cfg.train, cfg.seed, tensors, meta, ctx,
                                           str(run_dir))
        if (run_dir / BEST_CHECKPOINT).exists():  # it may be newer than the checkpoint (a kill in between)
            state.best = load_checkpoint(run_dir / BEST_CHECKPOINT, {"validation": dict})[1]["validation"]
    else:
        state = TrainState.start(parts.model, parts.diffusion, cfg.train, cfg.seed, ctx)
    session = open_session(cfg, run_dir, parts, state, ctx, resume)
    start_step = state.step
    # the untrained weights are scored too (for whitened Gaussian data, the exact model)
    run_loop(state, session, progress, None if state.step else validate_untrained(state, session), stop)
    ctx.barrier()
    wall = time.perf_counter() - session.start_time
    return {"run_dir": str(run_dir), "steps": state.step, "new_steps": state.step - start_step,
            "K_bits_running": state.K_bits_running,
            "wall_s": round(wall, 3), "steps_per_s": round((state.step - start_step) / wall, 2) if wall > 0 else None,
            "nonfinite_skipped": state.nonfinite_skipped, "world_size": ctx.world_size, "device": str(ctx.device),
            "best": state.best if session.validator else None, "auto_choices": cfg.auto, "data": session.data}


def run_config(cfg: Config, meta: dict, origin: str, max_minutes: float | None) -> Config:
    """The config to train: a resumed run's own (``meta`` of its checkpoint) with ``cfg``'s
    train.steps as the new total; ``max_minutes``, when given, replaces train.max_minutes."""
    if meta:
        steps = cfg.train.steps
        if 0 < steps < meta["step"]:  # it would train nothing and say it trained
            raise UserError(f"{origin}: the run is already at step {meta['step']}, past train.steps = {steps} (--steps); "
                            f"pass --steps above {meta['step']} to train it further")
        cfg = Config.from_dict(meta["config"], origin=origin)
        cfg.train.steps = steps
    if max_minutes is not None:
        cfg.train.max_minutes = max_minutes
    cfg.validate()
    return cfg


def data_record(cfg: Config, parts: Parts) -> dict:
    """What a run's checkpoints record of its data (load_run rebuilds the data from it)."""
    diffusion = parts.diffusion
    record = parts.dataset.describe() | {"kind": parts.kind, "stationary_p": diffusion.stationary_p,
                                         "seed": cfg.seed}
    if Path(cfg.data.source).is_file():
        record["sha256"] = file_digest(Path(cfg.data.source))
    return record


def open_session(cfg: Config, run_dir: Path, parts: Parts, state: TrainState, ctx: Context, resume: bool) -> Session:
    """Process 0 creates a new run's directory with its config and step-0 checkpoint, or tidies
    a resumed one (stale temporary files, metrics past the checkpoint)."""
    has_val = parts.dataset.val is not None and len(parts.dataset.val) > 0
    validator = Validator(state.objective, parts.dataset, cfg, ctx.device) if has_val and ctx.is_main else None
    session = Session(cfg, run_dir, ctx, parts.dataset, data_record(cfg, parts), validator,
                      saved_step=state.step if resume else None)
    if ctx.is_main and not resume:  # check_run_dir allowed it: a new run, or --overwrite of a run

        def populate(folder: Path) -> None:
            atomic_write_text(folder / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            save(state, session, folder)

        create_run_dir(run_dir, populate)
    if ctx.is_main:
        remove_stale_temporaries(run_dir)
        rewrite_metrics(run_dir, state.step)
    return session


def run_loop(state: TrainState, session: Session, progress: bool, val_bits: float | None, stop: StopRequest) -> None:
    """:func:`train_loop`, ended early as :class:`RunStopped` by a signal (its step checkpointed)
    or a failed write (the last checkpoint intact)."""
    steps, minutes = session.cfg.train.steps, session.cfg.train.max_minutes
    try:
        stopped = train_loop(state, session, progress, val_bits, stop)
    except OSError as e:
        raise RunStopped(f"{os_error_message(e)}; the checkpoint of step {session.saved_step} in {session.run_dir} "
                         "is intact", session.run_dir, session.saved_step, steps, 2, minutes) from None
    if stopped:
        raise RunStopped.by_signal(stop.signum, session.run_dir, state.step, steps, minutes)


def train_loop(state: TrainState, session: Session, progress: bool, val_bits: float | None,
               stop: StopRequest) -> bool:
    """Train until train.steps or train.max_minutes, whichever comes first, or until ``stop``
    holds a signal; score the validation split every train.val_minutes and at the end, log every
    train.log_every steps, checkpoint every train.checkpoint_every steps and at the end (or the
    stop). Returns whether a signal stopped it; a stop logs nothing extra, so that the resumed
    run ends as an uninterrupted one."""
    t, ctx = session.cfg.train, session.ctx
    time_limit, val_every = 60 * t.max_minutes or math.inf, 60 * t.val_minutes or math.inf
    state.objective.train()
    out_of_time = stopping = False
    with progress_bar(session.cfg, state.step, progress) as bar:  # closed on a failed write too
        while not out_of_time and not stopping and (not t.steps or state.step < t.steps):
            try:
                k_bits = train_step(state, draw_batch(state, session.dataset, t.batch_size, ctx.device), t, ctx)
            except NonFiniteLosses:
                save(state, session)  # the last good weights
                raise
            bar.update(1)
            now = state.elapsed_s
            out_of_time, due, stopping = ctx.any(now >= time_limit, now >= state.next_val_s,  # one process:
                                                 stop.signum is not None)  # all act together
            if k_bits is None:  # a skipped step
                continue
            last = out_of_time or state.step == t.steps
            if due or (last and session.validator is not None):
                val_bits = validate(state, session)
                state.next_val_s = now + val_every
            if due:
                ctx.barrier()
            show(bar, state, val_bits)
            if state.step % t.log_every == 0 or last or due:
                log_metrics(state, session, val_bits if due or last else None)
            if state.step % t.checkpoint_every == 0 or due:
                save(state, session)
    if session.saved_step != state.step:
        save(state, session)  # the last step (logged above, a skipped one, or where a signal stopped it)
    return stopping


def progress_bar(cfg: Config, step: int, enabled: bool) -> tqdm:
    """Steps done out of train.steps; under a time budget, steps without a total."""
    timed = bool(cfg.train.max_minutes)
    return tqdm(total=cfg.train.steps if cfg.train.steps and not timed else None, initial=step, unit="step",
                file=sys.stderr, desc=f"train {cfg.name}" + (f" ({cfg.train.max_minutes:g} min)" if timed else ""),
                disable=not enabled, mininterval=1.0)
