"""Refuse sizes that cannot fit, before allocating them: the memory of a training run, of a
sampling or of a Parzen estimate is estimated and compared with what the machine has left, so
that ``--T 1000000000`` is a one-line error in a second rather than an OOM kill minutes later
(with a run directory left behind). Estimates are conservative and cheap: what grows with T or
with the batch is measured on the network at a small T and batch and scaled, so that any
network is covered without a formula per architecture. ``--ignore-memory-check`` skips them."""

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from thermodiff.errors import UserError
from thermodiff.run.config import MEMORY_OVERRIDE_FLAG

_MEMINFO = Path("/proc/meminfo")
# cgroup v2, then v1: (limit, usage); a container's limit can be far below the machine's memory
_CGROUPS = ((Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
            (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes")))


def _meminfo_available() -> int | None:
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    for limit_path, usage_path in _CGROUPS:
        try:
            limit = limit_path.read_text().strip()
            if limit != "max":
                return max(0, int(limit) - int(usage_path.read_text()))
        except (OSError, ValueError):
            continue
    return None


def available_memory(device: torch.device | str = "cpu") -> tuple[int, str]:
    """Bytes this process can still allocate on ``device``, and where the figure comes from:
    a GPU's free memory, or the lowest of MemAvailable (/proc/meminfo) and the cgroup's limit
    less its usage (os.sysconf's free pages where neither can be read)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    found = [(value, source) for value, source in ((_meminfo_available(), "MemAvailable in /proc/meminfo"),
                                                   (_cgroup_available(), "the cgroup's memory limit less its usage"))
             if value is not None]
    if not found:
        found = [(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free pages (os.sysconf)")]
    return min(found)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class Estimate:
    """What a task needs in memory, by part (bytes), and which settings reduce it."""

    what: str  # e.g. "training", "sampling 1000 examples"
    parts: dict[str, float]
    advice: str  # e.g. "lower diffusion.T or train.batch_size"

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def require_fits(estimate: Estimate, device: torch.device | str = "cpu") -> None:
    """Refuse ``estimate`` with one line giving it and the available memory if it exceeds it."""
    available, source = available_memory(device)
    if estimate.total > available:
        parts = ", ".join(f"{name} {format_bytes(size)}" for name, size in estimate.parts.items() if size > 0)
        raise UserError(f"{estimate.what} needs about {format_bytes(estimate.total)} of memory ({parts}) but "
                        f"{format_bytes(available)} is available ({source}); {estimate.advice}, or pass "
                        f"{MEMORY_OVERRIDE_FLAG} if you know it fits")


def state_bytes(modules: Iterable[nn.Module]) -> tuple[int, int]:
    """The bytes of the parameters and of the buffers of ``modules``."""
    modules = list(modules)
    params = sum(p.nbytes for m in modules for p in m.parameters())
    return params, sum(b.nbytes for m in modules for b in m.buffers())


def saved_bytes(forward: Callable[[], object], exclude: Iterable[Tensor]) -> int:
    """The bytes that autograd keeps for the backward pass of ``forward()``, the tensors of
    ``exclude`` (the weights) not counted: the activations, measured rather than derived from
    a network's shapes."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total


def loss_activation_bytes(diffusion: nn.Module, model: nn.Module, x0: Tensor) -> int:
    """:func:`saved_bytes` of one training loss on the batch ``x0``; the global random state is
    left as it was (the probe must not change a run's draws)."""
    with torch.random.fork_rng(devices=[]):
        draws = diffusion.training_draws(x0, torch.Generator(x0.device).manual_seed(0))
        weights = [*model.parameters(), *model.buffers(), *diffusion.parameters(), *diffusion.buffers()]
        return saved_bytes(lambda: diffusion.training_loss(model, x0, draws), weights)


def training_estimate(params: int, buffers: int, activations: float, batch_bytes: float, ema: bool,
                      validator: bool) -> Estimate:
    """A training run's memory from its network and process (``params`` and ``buffers``, bytes
    at the run's T), its batch's saved ``activations`` and input (``batch_bytes``)."""
    average = int(ema)
    kept = params * (3 + average) + buffers * (1 + average)  # weights, Adam's two moments, the average
    return Estimate("training", {
        "weights, gradients and optimiser state": kept + params,
        "a checkpoint being written": kept + 2 * params,  # its bytes, and the optimiser state's copy
        "the validation copy": (params + buffers) * validator,
        "the batch's activations": 2 * activations,  # and their gradients, as large, in the backward pass
        "the batch": batch_bytes,
    }, "lower diffusion.T (--T), train.batch_size or the network's size")
