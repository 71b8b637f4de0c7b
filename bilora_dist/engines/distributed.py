"""Data parallelism over a process group: the base replicated, adapters replicated, one all-reduce a step."""

from __future__ import annotations

import os
import re
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bilora_dist.engines.base import Engine
from bilora_dist.errors import UserError


def single_process_defaults() -> None:
    """Let `python launch/train.py --engine fsdp|deepspeed` (no launcher) run as a group of one, its store on a
    port that was free a moment ago (unless MASTER_PORT names one)."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def port_in_use(exc: BaseException) -> bool:
    """Whether `exc` is the store's failure to listen on a port another process holds."""
    text = str(exc)
    return "EADDRINUSE" in text or "address already in use" in text.lower()


def port_in_use_error(exc: BaseException) -> UserError:
    """The one line for a rendezvous port that is taken (another run on the same --master_port)."""
    found = re.search(r"port:? (\d+)", str(exc))
    port = found[1] if found else os.environ.get("MASTER_PORT", "?")
    where = os.environ.get("MASTER_ADDR", "127.0.0.1")
    return UserError(f"port {port} on {where} (the process group's rendezvous) is already in use, by another run? "
                     "Give this launch a free port: deepspeed --master_port N, torchrun --master-port N (or "
                     "--rdzv-endpoint HOST:N), or MASTER_PORT=N without a launcher")


def init_process_group(backend: str, timeout_s: float) -> None:
    """The default process group over env:// (the launchers' variables). Under torchrun, the rendezvous store
    outlives a restart of the group (`--max-restarts`) and still holds the dead attempt's addresses, which the
    new ranks would read and fail to connect to; each attempt therefore keys its group under its own prefix.
    A rendezvous port another process holds is a UserError naming it (rank 0, which listens on it); under
    torchrun its agent listens there, and fails, before any rank starts."""
    timeout = timedelta(seconds=timeout_s)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    try:
        if attempt is None:
            dist.init_process_group(backend, timeout=timeout)
            return
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    except RuntimeError as exc:  # torch's DistNetworkError / DistStoreError, or a plain RuntimeError
        if port_in_use(exc):
            raise port_in_use_error(exc) from None
        raise
    dist.init_process_group(backend, store=dist.PrefixStore(f"bilora_dist/attempt_{attempt}", store), rank=rank,
                            world_size=world_size, timeout=timeout)


class DataParallelEngine(Engine):
    """Every rank holds the whole frozen base (what ZeRO-1/2 amount to when only adapters train)."""

    name = "replicated"

    def __init__(self, timeout_s: float = 1800.0):
        single_process_defaults()
        if not dist.is_initialized():
            init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout_s)
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
