"""The training loop: maximise the stochastic estimate of K with Adam or RMSProp, log
metrics, checkpoint atomically, resume exactly (model, optimiser, step and RNG states)."""

import contextlib
import copy
import csv
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from thermodiff import distributed
from thermodiff.bound import exact_bound
from thermodiff.checkpoint import (atomic_write_text, flatten_optimizer_state, load_checkpoint, save_checkpoint,
                                   umask, unflatten_optimizer_state)
from thermodiff.config import Config
from thermodiff.errors import UserError, first_line
from thermodiff.experiment import (BEST_CHECKPOINT, build_diffusion, build_model, data_bins, dequantizes, file_digest,
                                   load_state, prepare_dataset, resolve_source)
from thermodiff.process import Trainable
from thermodiff.tensors import LN2

METRIC_FIELDS = ["step", "K_bits_running", "loss_bits", "lr", "elapsed_s", "nonfinite_skipped", "val_K_bits"]


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    t = cfg.train
    return {"adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}[t.optimizer](params, lr=t.lr)


def learning_rate(cfg: Config, step: int, progress: float = 0.0) -> float:
    """The learning rate at ``step``: decayed by lr_decay every lr_decay_every steps (the
    ``step`` schedule), or (``cosine``) a linear warm-up over the first ``warmup`` of the run and
    a cosine decay to 0 at its end, ``progress`` in [0, 1] being how much of the run is done (of
    its steps or of its minutes, whichever limit is nearer)."""
    t = cfg.train
    if t.lr_schedule == "cosine":
        warm = min(1.0, progress / t.warmup) if t.warmup > 0 else 1.0
        return t.lr * warm * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if t.lr_decay_every <= 0:
        return t.lr
    return max(t.lr * t.lr_decay ** (step // t.lr_decay_every), min(t.lr_min, t.lr))


def run_progress(cfg: Config, step: int, elapsed_s: float) -> float:
    """How much of the run is done: the larger of its fractions of train.steps and train.max_minutes."""
    t = cfg.train
    return max(step / t.steps if t.steps else 0.0, elapsed_s / (60 * t.max_minutes) if t.max_minutes else 0.0)


def validate_train_config(cfg: Config, world_size: int = 1) -> None:
    cfg.validate()  # the values of every key, also for a Config built in code
    t = cfg.train
    if t.batch_size % world_size:
        raise UserError(f"train.batch_size {t.batch_size} must be divisible by the number of processes ({world_size})")


def read_metrics(run_dir: Path) -> list[dict]:
    """The complete records of a run's metrics.jsonl, in order ([] when there is none)."""
    path = run_dir / "metrics.jsonl"
    records = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
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
    for name, line in (("metrics.jsonl", json.dumps(record) + "\n"),
                       ("metrics.csv", ",".join(str(record.get(f, "")) for f in METRIC_FIELDS) + "\n")):
        with open(run_dir / name, "a", encoding="utf-8") as f:
            f.write(line)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the temporary files of atomic writes that a killed process left behind."""
    for path in run_dir.glob(".*.tmp"):
        path.unlink(missing_ok=True)


def create_run_dir(run_dir: Path, populate) -> None:
    """Make ``run_dir`` appear complete or not at all: ``populate(folder)`` fills a temporary
    sibling folder (config, first checkpoint), which is then renamed into place, so a run
    directory always holds a checkpoint to resume from. An existing run (``--overwrite``) is
    moved aside first and deleted last."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.new."))
    try:
        os.chmod(staging, 0o777 & ~umask())  # mkdtemp's 0700 would make the run private
        populate(staging)
        old = None
        if run_dir.exists():
            old = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.old."))
            os.replace(run_dir, old / run_dir.name)
        os.replace(staging, run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
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
    weights (0.999^884 = 41% after a 10-minute CPU run of the U-Net)."""

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


class Validator:
    """Scores the weights that evaluation uses (the EMA's, if any) by the bound on the validation
    split, always with the same noise (so that two checkpoints' scores differ by their weights,
    not their draws), and keeps the best as ``best.safetensors``, which runs are loaded from."""

    #: steps per example of the stratified estimate of the validation examples' bound (the same
    #: steps and noise every time, so that scores differ by the weights)
    T_SAMPLES = 50

    def __init__(self, objective: "Objective", dataset, cfg: Config, device: torch.device, best: dict | None):
        self.copy = copy.deepcopy(objective)  # holds the weights being scored
        self.copy.eval()
        val = dataset.val[: cfg.train.val_examples]
        self.x = dataset.to_model(val, torch.Generator().manual_seed(cfg.seed + 3), device,
                                  dequantize=dequantizes(objective.diffusion))
        self.batch_size, self.seed = cfg.eval.batch_size, cfg.seed + 4
        self.best = best  # {"K_bits", "stderr_bits", "step"} of the best so far

    def score(self, weights: dict[str, torch.Tensor]) -> tuple[float, float]:
        """K (bits per example) of ``weights`` (an Objective state dict) and its standard error."""
        self.copy.load_state_dict(weights, strict=False)
        generator = torch.Generator(self.x.device).manual_seed(self.seed)
        estimate = exact_bound(self.copy.diffusion, self.copy.model, torch.split(self.x, self.batch_size), 1,
                               generator, t_samples=self.T_SAMPLES)
        return estimate.mean / LN2, estimate.stderr / LN2

    def update(self, weights: dict[str, torch.Tensor], step: int, path: Path, meta: dict) -> float:
        """Score ``weights``; if they are the best so far, write them to ``path`` with ``meta``."""
        k_bits, stderr = self.score(weights)
        if self.best is None or k_bits > self.best["K_bits"]:
            self.best = {"K_bits": k_bits, "stderr_bits": stderr, "step": step, "n_examples": len(self.x)}
            state = {k: v.detach().clone() for k, v in self.copy.state_dict().items()}
            save_checkpoint(path, state, meta | {"step": step, "validation": self.best})
        return k_bits


def autocast(cfg: Config, device: torch.device):
    """The network's mixed precision: bf16 on any device (on CPUs with AVX-512 BF16 it trains
    faster; benchmarks/throughput.py --precisions fp32,bf16 measures it), fp16 only on CUDA (it needs the gradient scaler); the bound's own
    arithmetic stays in float32/float64 either way (autocast only lowers convolutions and matmuls)."""
    precision = cfg.train.precision
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def train(cfg: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False, progress: bool = True,
          device: str = "auto", max_minutes: float | None = None) -> dict:
    """Train ``cfg`` into ``run_dir``; returns a summary. With ``resume`` the run continues from
    its checkpoint (its own config, with ``cfg.train.steps`` as the new total). ``max_minutes``,
    when given, replaces train.max_minutes, also of a resumed run (the training time counts on
    across resumes, so extending a time-limited run needs a new total). Under ``torchrun``
    every process trains on its shard of each global batch and process 0 writes the files."""
    ctx = distributed.setup(device)
    try:
        return _train(cfg, Path(run_dir), resume, overwrite, progress and ctx.is_main, ctx, max_minutes)
    finally:
        distributed.teardown(ctx)


# what a checkpoint must hold to be resumed (the metrics state added later is optional)
RESUME_FIELDS = {"config": dict, "step": int, "optimizer": dict, "nonfinite_skipped": int}
RESUME_TENSORS = ("rng.noise", "rng.order")


def _train(cfg: Config, run_dir: Path, resume: bool, overwrite: bool, progress: bool, ctx: distributed.Context,
           max_minutes: float | None = None) -> dict:
    check_run_dir(run_dir, resume, overwrite)
    ctx.barrier()  # every process has checked before process 0 creates the folder
    tensors, meta = (load_checkpoint(run_dir / "checkpoint.safetensors", RESUME_FIELDS, RESUME_TENSORS)
                     if resume else ({}, {}))
    if resume:
        steps = cfg.train.steps
        cfg = Config.from_dict(meta["config"], origin=str(run_dir))
        cfg.train.steps = steps
    if max_minutes is not None:
        cfg.train.max_minutes = max_minutes
    cfg.validate()
    torch.manual_seed(cfg.seed)
    dataset, kind = prepare_dataset(cfg)  # bad input fails here, before anything on disk changes
    validate_train_config(cfg, ctx.world_size)  # with every "auto" decided
    resolve_source(cfg)
    diffusion = build_diffusion(cfg, kind, float(dataset.train.mean()), data_bins(dataset))
    model = build_model(cfg, diffusion, dataset.event_shape)
    objective = Objective(model, diffusion)
    noise_gen = torch.Generator(ctx.device).manual_seed(cfg.seed + 1)
    order_gen = torch.Generator().manual_seed(cfg.seed + 2)
    # the state that makes a resumed run continue bit for bit: the logging window and the
    # non-finite streak too, so metrics.jsonl matches an uninterrupted run's as well
    step, skipped_total, running, window, in_a_row, elapsed = 0, 0, None, [], 0, 0.0
    if resume:  # load before moving and wrapping in DDP
        load_state(model, tensors, "model.", str(run_dir))
        load_state(diffusion, tensors, "diffusion.", str(run_dir))
        step, skipped_total, running = meta["step"], meta["nonfinite_skipped"], meta.get("K_bits_running")
        window, in_a_row, elapsed = meta.get("window", []), meta.get("nonfinite_in_a_row", 0), meta.get("elapsed_s", 0.0)
    objective.to(ctx.device)
    params = list(objective.parameters())
    optimizer = make_optimizer(cfg, params)
    ema = EMA(objective, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    if resume:
        try:
            noise_gen.set_state(tensors["rng.noise"])
            order_gen.set_state(tensors["rng.order"])
            optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
            if ema is not None and any(k.startswith("ema.") for k in tensors):
                ema.shadow = {k: tensors[f"ema.{k}"].to(ctx.device) for k in ema.shadow}
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{run_dir}: checkpoint does not match this model ({first_line(e)})") from None
    trainer = DistributedDataParallel(objective) if ctx.distributed else objective
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.precision == "fp16" and ctx.device.type == "cuda")
    if resume and scaler.is_enabled() and meta.get("grad_scaler"):
        scaler.load_state_dict(meta["grad_scaler"])  # fp16's loss scale continues, not restarted
    data_info = dataset.describe() | {"kind": kind, "stationary_p": diffusion.stationary_p,
                                     "seed": cfg.seed}
    if Path(cfg.data.source).is_file():
        data_info["sha256"] = file_digest(Path(cfg.data.source))

    saved_step = step if resume else None  # the step of the checkpoint in the run directory
    has_val = dataset.val is not None and len(dataset.val) > 0
    best = meta.get("best")
    if resume and (run_dir / BEST_CHECKPOINT).exists():  # it may be newer than the checkpoint (a kill in between)
        best = load_checkpoint(run_dir / BEST_CHECKPOINT, {"validation": dict})[1]["validation"]
    validator = Validator(objective, dataset, cfg, ctx.device, best) if has_val and ctx.is_main else None
    val_every = 60 * cfg.train.val_minutes or math.inf
    next_val = meta.get("next_val_s", val_every)  # training seconds at which to score the validation split next

    def checkpoint(folder: Path = run_dir) -> None:
        nonlocal saved_step
        saved_step = step
        if not ctx.is_main:
            return
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        state |= {f"diffusion.{k}": v for k, v in diffusion.state_dict().items()}
        if ema is not None:
            state |= {f"ema.{k}": v for k, v in ema.shadow.items()}
        optim_tensors, optim_meta = flatten_optimizer_state(optimizer.state_dict())
        state |= optim_tensors | {"rng.noise": noise_gen.get_state(), "rng.order": order_gen.get_state()}
        save_checkpoint(folder / "checkpoint.safetensors", state, {
            "config": cfg.to_dict(), "data": data_info, "step": step, "optimizer": optim_meta,
            "nonfinite_skipped": skipped_total, "nonfinite_in_a_row": in_a_row, "K_bits_running": running,
            "window": window, "elapsed_s": time.perf_counter() - start_time, "world_size": ctx.world_size,
            "grad_scaler": scaler.state_dict(), "best": validator and validator.best, "next_val_s": next_val})

    def validate() -> float | None:
        """Score the evaluated weights on the validation split (process 0), keeping the best."""
        if validator is None:
            return None
        weights = ema.shadow if ema is not None else objective.state_dict()
        return validator.update(weights, step, run_dir / BEST_CHECKPOINT, {"config": cfg.to_dict(), "data": data_info})

    start_time, start_step = time.perf_counter() - elapsed, step  # elapsed_s counts on across resumes
    session_start = time.perf_counter()
    time_limit = 60 * cfg.train.max_minutes or math.inf
    if ctx.is_main and not resume:  # check_run_dir allowed it: a new run, or --overwrite of a run

        def populate(folder: Path) -> None:
            atomic_write_text(folder / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            checkpoint(folder)  # step 0

        create_run_dir(run_dir, populate)
    if ctx.is_main:
        remove_stale_temporaries(run_dir)
        rewrite_metrics(run_dir, step)
    shard = ctx.shard(cfg.train.batch_size)
    dequantize = dequantizes(diffusion)
    # under a time budget the bar counts steps without a total
    timed = math.isfinite(time_limit)
    bar = tqdm(total=cfg.train.steps if cfg.train.steps and not timed else None, initial=step, unit="step",
               file=sys.stderr, desc=f"train {cfg.name}" + (f" ({cfg.train.max_minutes:g} min)" if timed else ""),
               disable=not progress, mininterval=1.0)
    objective.train()
    out_of_time, val_bits = False, None
    if validator is not None and not resume:  # the untrained weights too (for whitened Gaussian data, the exact model)
        val_bits = validate()
    while (not cfg.train.steps or step < cfg.train.steps) and not out_of_time:
        lr = learning_rate(cfg, step, run_progress(cfg, step, time.perf_counter() - start_time))
        for group in optimizer.param_groups:
            group["lr"] = lr
        # every process draws the whole global batch and its randomness, then takes its shard:
        # the same numbers as one process training on the global batch
        idx = torch.randint(0, len(dataset.train), (cfg.train.batch_size,), generator=order_gen)
        x0 = dataset.to_model(dataset.train[idx.numpy()], order_gen, ctx.device, dequantize=dequantize)
        draws = objective.draws(x0, noise_gen)
        with autocast(cfg, ctx.device):
            loss, k = trainer(x0[shard], draws[shard])
        step += 1
        bar.update(1)
        now = time.perf_counter() - start_time
        stats = ctx.all_reduce_sum(torch.tensor([float(k.sum()), float(not torch.isfinite(loss)), float(len(k)),
                                                 float(now >= time_limit), float(now >= next_val)],
                                                dtype=torch.float64, device=k.device))
        out_of_time, due = bool(stats[3] > 0), bool(stats[4] > 0)  # one process due: all act together
        if stats[1] > 0:  # any process saw a non-finite loss: all skip the step together
            skipped_total += 1
            in_a_row += 1
            if in_a_row >= cfg.train.max_nonfinite:
                checkpoint()
                raise UserError(f"training stopped at step {step}: {in_a_row} non-finite losses in a row "
                                f"(try a lower train.lr or train.grad_clip)")
            continue
        in_a_row = 0
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.train.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(objective, step)
        k_bits = float(stats[0] / stats[2]) / LN2
        window.append(k_bits)
        running = k_bits if running is None else 0.99 * running + 0.01 * k_bits
        last = out_of_time or step == cfg.train.steps
        if due or (last and validator is not None):
            val_bits = validate()
            next_val = now + val_every
            ctx.barrier()
        shown = {"K_bits": f"{running:.3f}"}
        if val_bits is not None:
            shown |= {"val_K": f"{val_bits:.3f}", "best": f"{validator.best['K_bits']:.3f}"}
        bar.set_postfix(shown, refresh=False)
        if ctx.is_main and (step % cfg.train.log_every == 0 or last or due):
            record = {"step": step, "K_bits_running": round(running, 6), "loss_bits": round(-sum(window) / len(window), 6),
                      "lr": lr, "elapsed_s": round(time.perf_counter() - start_time, 3), "nonfinite_skipped": skipped_total}
            if (due or last) and val_bits is not None:
                record["val_K_bits"] = round(val_bits, 6)
            append_metrics(run_dir, record)
            window = []
        if step % cfg.train.checkpoint_every == 0 or due:
            checkpoint()
    bar.close()
    if saved_step != step:
        checkpoint()  # the last step (logged above, or a skipped one)
    ctx.barrier()
    wall = time.perf_counter() - session_start
    return {"run_dir": str(run_dir), "steps": step, "K_bits_running": running, "wall_s": round(wall, 3),
            "steps_per_s": round((step - start_step) / wall, 2) if wall > 0 else None,
            "nonfinite_skipped": skipped_total, "world_size": ctx.world_size, "device": str(ctx.device),
            "best": validator and validator.best, "auto_choices": cfg.auto, "data": data_info}
