"""torch.distributed for ``torchrun ... -m mltk run``: the process group, who writes, gathering results.

torchrun starts one process per GPU (or per CPU worker) and tells each its place through the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without those variables
mltk runs as a single process and nothing here does any communication; with them it joins the process
group, even a group of one (``--nproc-per-node 1``).
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mltk.devices import resolve_device
from mltk.errors import MltkError, first_line


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # by torchrun: a process group even of one process (--nproc-per-node 1 on one GPU)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory and prints; the others only train."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1 or self.launched


def from_environment() -> World:
    """The World torchrun describes in the environment; a single process when it describes none."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise MltkError(f"bad torch.distributed environment (RANK / WORLD_SIZE / LOCAL_RANK): {exc}") from None
    return World(rank, size, local, launched="WORLD_SIZE" in os.environ)


def device_for(world: World, requested: str) -> torch.device:
    """``auto``: this process's GPU (cuda:LOCAL_RANK) when there are GPUs, else the CPU; checked (``mltk.devices``)."""
    return resolve_device(requested, world.local_rank, world.distributed)


def start(world: World, device: torch.device) -> None:
    """Join the process group: NCCL between GPUs, gloo between CPU processes."""
    if not world.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=world.rank, world_size=world.size)
    except (RuntimeError, ValueError) as exc:
        raise MltkError(f"cannot join the torch.distributed group ({backend}, rank {world.rank} of {world.size}): {first_line(exc)}") from None


def stop(finished: bool = True) -> None:
    """Leave the process group. A process that finished waits for the others first (a barrier): tearing its
    connections down while a peer is still inside a collective can abort that peer. After an error nobody
    waits, since the others may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of a tensor over all processes (itself in a single process)."""
    if not world.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world.size


def any_true(flag: bool, world: World, device: torch.device) -> bool:
    """True on every process when it is true on any (one process's plugins stop the run for all)."""
    if not world.distributed:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_rows(rows: torch.Tensor, world: World) -> torch.Tensor:
    """Every process's ``rows`` (N_r, ...) concatenated in rank order; N_r may differ between processes."""
    if not world.distributed:
        return rows
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world.size)]
    dist.all_gather(counts, torch.tensor([len(rows)], device=rows.device))
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])

