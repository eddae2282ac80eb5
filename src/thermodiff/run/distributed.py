"""Data-parallel training with PyTorch's own engine: DDP launched by ``torchrun`` (gloo on CPU,
NCCL on GPU). A single process is the world of size 1 and needs no launcher."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from thermodiff.errors import UserError


@dataclass(frozen=True)
class Context:
    """This process's place in the run: ``Context()`` is a single process on the CPU."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """This process's part of a global batch of ``n`` examples."""
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def any(self, *flags: bool) -> list[bool]:
        """Each flag, true if it is true in any process (so that all processes act together)."""
        summed = self.all_reduce_sum(torch.tensor(flags, dtype=torch.float64, device=self.device))
        return [bool(value > 0) for value in summed]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available here")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if name != "cpu":
        raise UserError(f"--device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}")
    return torch.device("cpu")


def setup(device: str = "auto") -> Context:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Context(rank, world_size, dev)


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
