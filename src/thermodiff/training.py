"""The training loop: maximise the stochastic estimate of K with Adam or RMSProp, log
metrics, checkpoint atomically, resume exactly (model, optimiser, step and RNG states)."""

import csv
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from thermodiff.bound import training_loss
from thermodiff.checkpoint import (atomic_write_text, flatten_optimizer_state, load_checkpoint, save_checkpoint,
                                   unflatten_optimizer_state)
from thermodiff.config import Config
from thermodiff.errors import UserError
from thermodiff.experiment import (build_diffusion, build_model, file_digest, load_state, prepare_dataset,
                                   resolve_source, to_tensor)

LN2 = math.log(2.0)
METRIC_FIELDS = ["step", "K_bits_running", "loss_bits", "lr", "elapsed_s", "nonfinite_skipped"]


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr)
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=t.lr)
    raise UserError(f"train.optimizer must be 'adam' or 'rmsprop', got {t.optimizer!r}")


def learning_rate(cfg: Config, step: int) -> float:
    t = cfg.train
    if t.lr_decay_every <= 0:
        return t.lr
    return max(t.lr * t.lr_decay ** (step // t.lr_decay_every), min(t.lr_min, t.lr))


def validate_train_config(cfg: Config) -> None:
    t = cfg.train
    for name in ("steps", "batch_size", "checkpoint_every", "log_every", "max_nonfinite"):
        if getattr(t, name) < 1:
            raise UserError(f"train.{name} must be at least 1, got {getattr(t, name)}")
    if not t.lr > 0:
        raise UserError(f"train.lr must be positive, got {t.lr}")
    if t.grad_clip < 0:
        raise UserError(f"train.grad_clip must be >= 0, got {t.grad_clip}")


def rewrite_metrics(run_dir: Path, upto_step: int) -> None:
    """Keep only complete metric records up to the checkpointed step (after a crash or on resume)."""
    path = run_dir / "metrics.jsonl"
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if record.get("step", math.inf) <= upto_step:
                records.append(record)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, METRIC_FIELDS)
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())


def append_metrics(run_dir: Path, record: dict) -> None:
    for name, line in (("metrics.jsonl", json.dumps(record) + "\n"),
                       ("metrics.csv", ",".join(str(record[f]) for f in METRIC_FIELDS) + "\n")):
        with open(run_dir / name, "a", encoding="utf-8") as f:
            f.write(line)


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


def train(cfg: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Train ``cfg`` into ``run_dir``; returns a summary. With ``resume`` the run continues from
    its checkpoint (its own config, with ``cfg.train.steps`` as the new total)."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume, overwrite)
    tensors, meta = (load_checkpoint(run_dir / "checkpoint.safetensors") if resume else ({}, {}))
    if resume:
        steps = cfg.train.steps
        cfg = Config.from_dict(meta["config"], origin=str(run_dir))
        cfg.train.steps = steps
    validate_train_config(cfg)
    torch.manual_seed(cfg.seed)
    dataset, kind = prepare_dataset(cfg)  # bad input fails here, before anything on disk changes
    resolve_source(cfg)
    data_mean = float(dataset.train.mean())
    diffusion = build_diffusion(cfg, kind, data_mean)
    model = build_model(cfg, diffusion, dataset.train.shape[1])
    params = list(model.parameters()) + list(diffusion.parameters())
    optimizer = make_optimizer(cfg, params)
    noise_gen = torch.Generator().manual_seed(cfg.seed + 1)
    order_gen = torch.Generator().manual_seed(cfg.seed + 2)
    step, skipped_total, running = 0, 0, None
    if resume:
        load_state(model, tensors, "model.", str(run_dir))
        load_state(diffusion, tensors, "diffusion.", str(run_dir))
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
        noise_gen.set_state(tensors["rng.noise"])
        order_gen.set_state(tensors["rng.order"])
        step, skipped_total, running = meta["step"], meta["nonfinite_skipped"], meta["K_bits_running"]
    data_info = dataset.describe() | {"kind": kind, "stationary_p": getattr(diffusion, "p", None) and float(diffusion.p),
                                     "seed": cfg.seed}
    if Path(cfg.data.source).is_file():
        data_info["sha256"] = file_digest(Path(cfg.data.source))
    if not resume:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # check_run_dir allowed it: --overwrite of a run
        run_dir.mkdir(parents=True)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    rewrite_metrics(run_dir, step)

    def checkpoint() -> None:
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        state |= {f"diffusion.{k}": v for k, v in diffusion.state_dict().items()}
        optim_tensors, optim_meta = flatten_optimizer_state(optimizer.state_dict())
        state |= optim_tensors | {"rng.noise": noise_gen.get_state(), "rng.order": order_gen.get_state()}
        save_checkpoint(run_dir / "checkpoint.safetensors", state, {
            "config": cfg.to_dict(), "data": data_info, "step": step, "optimizer": optim_meta,
            "nonfinite_skipped": skipped_total, "K_bits_running": running})

    train_x = to_tensor(dataset.train)
    in_a_row, window = 0, []
    start_time, start_step = time.perf_counter(), step
    bar = tqdm(total=cfg.train.steps, initial=step, desc=f"train {cfg.name}", unit="step",
               file=sys.stderr, disable=not progress, mininterval=1.0)
    model.train()
    while step < cfg.train.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        idx = torch.randint(0, len(train_x), (cfg.train.batch_size,), generator=order_gen)
        loss, k = training_loss(diffusion, model, train_x[idx], noise_gen)
        step += 1
        if not torch.isfinite(loss):
            skipped_total += 1
            in_a_row += 1
            if in_a_row >= cfg.train.max_nonfinite:
                checkpoint()
                raise UserError(f"training stopped at step {step}: {in_a_row} non-finite losses in a row "
                                f"(try a lower train.lr or train.grad_clip)")
            continue
        in_a_row = 0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        k_bits = float(k.mean()) / LN2
        window.append(k_bits)
        running = k_bits if running is None else 0.99 * running + 0.01 * k_bits
        bar.update(1)
        bar.set_postfix(K_bits=f"{running:.3f}")
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            append_metrics(run_dir, {"step": step, "K_bits_running": round(running, 6),
                                     "loss_bits": round(-sum(window) / len(window), 6),
                                     "lr": learning_rate(cfg, step - 1),
                                     "elapsed_s": round(time.perf_counter() - start_time, 3),
                                     "nonfinite_skipped": skipped_total})
            window = []
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            checkpoint()
    bar.close()
    if step % cfg.train.checkpoint_every != 0:
        checkpoint()  # the last step may have been a skipped one
    wall = time.perf_counter() - start_time
    return {"run_dir": str(run_dir), "steps": step, "K_bits_running": running, "wall_s": round(wall, 3),
            "steps_per_s": round((step - start_step) / wall, 2) if wall > 0 else None,
            "nonfinite_skipped": skipped_total, "data": data_info}
