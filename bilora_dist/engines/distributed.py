"""Data parallelism over a process group: the base replicated, adapters replicated, one all-reduce a step."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bilora_dist.engines.base import Engine


def single_process_defaults() -> None:
    """Let `python launch/train.py --engine fsdp|deepspeed` (no launcher) run as a group of one."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))


class DataParallelEngine(Engine):
    """Every rank holds the whole frozen base (what ZeRO-1/2 amount to when only adapters train)."""

    name = "replicated"

    def __init__(self, timeout_s: float = 1800.0):
        single_process_defaults()
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)

    def all_reduce_sum_(self, tensor: Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        dist.barrier()  # destroying the group while a peer still sends can abort the process
        dist.destroy_process_group()
