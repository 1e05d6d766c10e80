"""Where this process sits in the job: rank, world, expert-parallel group, device.

The training loop talks to collectives only through this object, so the same loop runs in one process
(every collective is the identity) and in a Ray Train worker group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    ep_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @classmethod
    def from_env(cls, ep_size: int, device: torch.device) -> "DistContext":
        """Read rank/world from an initialised torch.distributed process group (Ray Train sets it up)."""
        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), ep_size=ep_size, device=device)
        return cls(ep_size=1, device=device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks (no autograd); identity on one process."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t
