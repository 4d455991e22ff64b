"""One code path for one process or many (torchrun + DistributedDataParallel).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them this is a world of one and every
helper below is a no-op. NCCL on GPUs, gloo on CPU. Before validation the trainer gives every
rank rank 0's batch-norm statistics with timm.utils.distribute_bn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from siimcovid.engine.devices import torch_device
from siimcovid.utils import LOGGER


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 and torch_dist.is_available() and torch_dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def gather(self, obj) -> list:
        """Every rank gets the list of every rank's obj (picklable), in rank order."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch_dist.all_reduce(t)
        return t.tolist()


def setup(device: str | None = None) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch_device(device, local_rank)
    if world > 1 and dev.type == "cuda" and dev.index != local_rank:
        # device=0 under torchrun would put every process on one GPU: each takes its own
        LOGGER.warning(f"device={device} under torchrun: process {rank} uses cuda:{local_rank} (its LOCAL_RANK)")
        dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # also for one process on cuda:1: no stray context on GPU 0
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def cleanup(d: Dist) -> None:
    if d.active:
        torch_dist.destroy_process_group()
