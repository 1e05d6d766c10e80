"""Where this process sits in the job: rank, world, expert-parallel group, device.

The training loop talks to collectives only through this object, so the same loop runs in one process
(every collective is the identity) and in a Ray Train worker group.

Rank layout (world = replicas * ep_size): EP groups are blocks of consecutive ranks [0..ep-1], [ep..2ep-1], ...;
a replica group holds the ranks with the same ep_rank, i.e. the copies of the same expert shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    ep_size: int = 1
    device: torch.device = torch.device("cpu")
    # torch.distributed groups, filled in by raymoe.parallel.expert_parallel.ensure_groups; None = not needed
    ep_group: Any = field(default=None, repr=False)
    replica_group: Any = field(default=None, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def replica_index(self) -> int:
        """Which copy of the expert shards this rank holds (0 for the copy that writes checkpoints)."""
        return self.rank // self.ep_size

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.ep_size

    @property
    def ep_ranks(self) -> list[int]:
        """Global ranks of this rank's EP group."""
        first = self.replica_index * self.ep_size
        return list(range(first, first + self.ep_size))

    @property
    def replica_ranks(self) -> list[int]:
        """Global ranks holding the same expert shard as this rank."""
        return list(range(self.ep_rank, self.world_size, self.ep_size))

    @classmethod
    def from_env(cls, ep_size: int, device: torch.device) -> "DistContext":
        """Read rank/world from an initialised torch.distributed process group (Ray Train sets it up)."""
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            if ep_size < 1 or world % ep_size:
                raise ValueError(f"expert-parallel degree {ep_size} must divide the number of workers ({world})")
            return cls(rank=dist.get_rank(), world_size=world, ep_size=ep_size, device=device)
        return cls(ep_size=1, device=device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks (no autograd); identity on one process."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        """Wait for every rank; no-op on one process."""
        if self.distributed:
            dist.barrier()
