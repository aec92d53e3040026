"""Data parallel runs over processes, GPUs and nodes with torch.distributed.

Under `torchrun` (which sets RANK, WORLD_SIZE and LOCAL_RANK) every process holds the whole
prepared data and the same map, evaluates its share of every minibatch (or of every pass over
the images), and the sums it contributes (gradients, posterior statistics, NLLs) are
all-reduced, so every rank takes the same step and holds the same state. Rank 0 alone writes
files. Without torchrun, `World()` is one process and every helper is a no-op, so a run is
bit-identical to one without this module.

Backend: gloo on the CPU, NCCL on GPUs, where `--device cuda` means cuda:LOCAL_RANK (one GPU a
process; choose the GPUs with CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from cryostoch.engine.run_folder import removed_if_failed_and_empty
from cryostoch.errors import InputError, SharedInputError

T = TypeVar("T")


def share_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of rank `rank`'s contiguous share of n items split over `size` ranks:
    shares differ by at most one item, the later ranks take the larger ones, and together
    they cover 0..n-1 once, in order."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside a world of {size}")
    if n < 0:
        raise ValueError(f"cannot split {n} items")
    return rank * n // size, (rank + 1) * n // size


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (one process: rank 0 of 1).

    device: the torch device this process computes on (cuda:LOCAL_RANK under torchrun with
    --device cuda).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, logs and draws progress bars."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def share(self, rows: T) -> T:
        """This rank's contiguous share of `rows` (anything sliceable with a length)."""
        start, stop = share_bounds(len(rows), self.rank, self.size)
        return rows[start:stop]

    def sum_(self, tensor: Tensor) -> Tensor:
        """All-reduce (sum) `tensor` in place over the ranks and return it; complex tensors
        as their real and imaginary parts. A no-op for one process."""
        if not self.parallel:
            return tensor
        wire = torch.view_as_real(tensor) if tensor.is_complex() else tensor
        comm = self._on_comm_device(wire)
        dist.all_reduce(comm, op=dist.ReduceOp.SUM)
        if comm is not wire:
            wire.copy_(comm)
        return tensor

    def sum_float(self, value: float) -> float:
        """The sum of a Python number over the ranks (float64 on the wire)."""
        if not self.parallel:
            return value
        return float(self.sum_(torch.tensor([value], dtype=torch.float64))[0])

    def gathered_rows(self, n: int, local: Tensor) -> Tensor:
        """(n, ...) rows of which this rank computed its contiguous share `local`
        (share, ...): every rank's share in place, on every rank. Each row comes from one
        rank and zeros from the others, so the sum is exact."""
        if not self.parallel:
            return local
        start, stop = share_bounds(n, self.rank, self.size)
        full = local.new_zeros((n, *local.shape[1:]))
        full[start:stop] = local
        return self.sum_(full)

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (pickled; for small state such as a checkpoint)."""
        if not self.parallel:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def on_main(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0 alone and hand its result to every rank; an InputError it
        raises is raised on every rank (rank 0 prints it, see `SharedInputError`), so no rank
        goes on alone. Any other exception ends rank 0, and torchrun then stops the others."""
        if not self.parallel:
            return work()
        outcome: tuple[bool, object] = (True, None)
        if self.is_main:
            try:
                outcome = (True, work())
            except InputError as err:
                outcome = (False, (err.source, err.problem))
        ok, value = self.broadcast(outcome)
        if ok:
            return value
        source, problem = value
        if self.is_main:
            raise InputError(source, problem)
        raise SharedInputError(source, problem)

    def check_same(self, tensor: Tensor, what: str) -> None:
        """RuntimeError unless `tensor` is bitwise the same on every rank (the ranks apply the
        same reduced sums in the same way, so a difference is a bug, or a mix of hardware
        that rounds differently)."""
        if not self.parallel:
            return
        values = tensor.detach().double().flatten().cpu()
        weights = torch.linspace(1.0, 2.0, values.numel(), dtype=torch.float64)
        digest = torch.stack([values.sum(), (values * weights).sum()])
        both = self._on_comm_device(torch.cat([digest, -digest]))
        dist.all_reduce(both, op=dist.ReduceOp.MAX)  # the largest and minus the smallest
        high, low = both[:2].cpu(), -both[2:].cpu()
        if not torch.equal(high, low):
            raise RuntimeError(f"the ranks hold different {what} (digests {low.tolist()} to "
                               f"{high.tolist()})")

    def _on_comm_device(self, tensor: Tensor) -> Tensor:
        """`tensor` where the backend needs it: CUDA for NCCL, the CPU for gloo; contiguous."""
        need = torch.device(self.device) if dist.get_backend() == "nccl" else torch.device("cpu")
        if tensor.device == need and tensor.is_contiguous():
            return tensor
        return tensor.to(need).contiguous()

    def _object_device(self) -> torch.device | None:
        return torch.device(self.device) if dist.get_backend() == "nccl" else None


#: The world of a run without torchrun (immutable: a default argument, not shared state).
ONE_PROCESS = World()


def world_from_env(device: str, environ: Mapping[str, str] = os.environ) -> World:
    """The World that torchrun's variables describe, with this process's device; InputError
    for a device choice that cannot work with several processes."""
    size = int(environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=device)
    rank, local_rank = int(environ.get("RANK", "0")), int(environ.get("LOCAL_RANK", "0"))
    parsed = torch.device(device)
    if parsed.type == "cuda":
        if parsed.index is not None:
            raise InputError("--device", f"{device} under torchrun: give --device cuda (each "
                             "process takes cuda:LOCAL_RANK; choose GPUs with "
                             "CUDA_VISIBLE_DEVICES)")
        device = f"cuda:{local_rank}"
    return World(rank, size, local_rank, device)


@contextlib.contextmanager
def joined(device: str) -> Iterator[World]:
    """The World of this process, with the process group set up for the duration (gloo for
    the CPU, NCCL for CUDA) when torchrun started several processes; a group that exists
    already (reconstruct --refine) is used and left in place."""
    world = world_from_env(device)
    if not world.parallel or dist.is_initialized():
        yield world
        return
    if world.device.startswith("cuda"):
        if not torch.cuda.is_available() or torch.cuda.device_count() <= world.local_rank:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise InputError("--device", f"process {world.local_rank} of this node needs "
                             f"{world.device}, but torch sees {count} GPU(s): start at most "
                             "as many processes per node as GPUs (--nproc-per-node)")
        torch.cuda.set_device(torch.device(world.device))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size)
    try:
        yield world
        # leave together: a rank that tears its group down while another still talks closes
        # the pairs under it (seen as an abort, "terminate called without an active
        # exception", under load); after an error the others are not waited for
        dist.barrier()
    finally:
        dist.destroy_process_group()


def cleaned_up_by_main(world: World, out: Path) -> contextlib.AbstractContextManager:
    """`removed_if_failed_and_empty(out)` on rank 0, which alone creates the folder."""
    return removed_if_failed_and_empty(out) if world.is_main else contextlib.nullcontext()


__all__ = ["ONE_PROCESS", "World", "cleaned_up_by_main", "joined",
           "share_bounds", "world_from_env"]
