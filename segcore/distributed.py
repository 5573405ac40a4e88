"""Data-parallel training on torch.distributed: what the processes of one run share and split.

``Group`` is the training loop's only view of the process group. Without a group (one process,
the default) every method is the identity, so a single-process run is exactly what it always was.

* **Data.** Every rank draws the same epoch plan (from the seed and the epoch number, as
  ``DistributedSampler`` does with ``set_epoch``) and takes every ``world_size``-th tile of each
  batch: a global batch of B is B / P tiles per process, the batch size means the same whatever
  the number of processes, and a run resumes with another number of processes. Each tile's crop
  and augmentation draw from a generator seeded by (seed, epoch, tile), so a tile looks the same
  whichever process trains it. Each validation tile is evaluated by exactly one process: no
  padding, no tile counted twice.
* **Sums.** Confusion matrices and loss sums are all-reduced: metrics equal the single-process
  ones on the same predictions (integer pixel counts, so exactly).
* **Decisions.** Whatever can end a run early (a diverged loss, a stop request) is agreed on by an
  all-reduce at the same point of every batch, so no rank waits in a collective that the others
  never reach.
* **Shared steps.** The checking pass over the tiles runs on rank 0 alone; its result (or that it
  failed) is broadcast, so the tiles are read once per run, not once per process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")
_CPU = torch.device("cpu")


class PrimaryFailed(Exception):
    """Raised on ranks other than 0 when a step that rank 0 runs for everyone failed there: rank 0
    reports the failure; the others end without a report of their own."""


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world_size: int = 1
    # Collectives run on tensors of this device (CUDA for NCCL, CPU for gloo).
    device: torch.device = _CPU

    @classmethod
    def current(cls) -> Group:
        """The initialised default process group, or a group of one."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def primary(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def share(self, batch: Sequence[T]) -> list[T]:
        """This rank's part of a global batch (its tiles, or anything listed per tile)."""
        return list(batch[self.rank :: self.world_size])

    def shares(self, batch: Sequence[int]) -> list[list[int]]:
        """Every rank's tiles of a global batch (all ranks compute the same)."""
        return [list(batch[r :: self.world_size]) for r in range(self.world_size)]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over all ranks (a new tensor on the values' device)."""
        if not self.parallel:
            return values
        total = values.detach().to(self.device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(values.device)

    def agree(self, flags: Sequence[bool]) -> list[bool]:
        """Each flag set on any rank is set on all of them."""
        if not self.parallel:
            return list(flags)
        votes = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return [bool(v) for v in votes.tolist()]

    def share_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank: each rank's last
        training step updated its own, and evaluation and the saved weights must be one model's."""
        if not self.parallel:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)

    def from_primary(self, step: Callable[[], T]) -> T:
        """``step()`` run on rank 0 and its result given to every rank. When it raises, rank 0
        raises the error and the other ranks PrimaryFailed."""
        if not self.parallel:
            return step()
        outcome: list[object] = [None, None]
        if self.primary:
            try:
                outcome = [step(), None]
            except Exception as exc:
                outcome = [None, f"{type(exc).__name__}: {exc}"]
                dist.broadcast_object_list(outcome, src=0, device=self.device)
                raise
        dist.broadcast_object_list(outcome, src=0, device=self.device)
        if outcome[1] is not None:
            raise PrimaryFailed(str(outcome[1]))
        return outcome[0]  # type: ignore[return-value]


def mixed_seed(*parts: int) -> int:
    """One 63-bit seed from several non-negative integers (seed, epoch, tile): distinct parts give
    unrelated streams."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))
