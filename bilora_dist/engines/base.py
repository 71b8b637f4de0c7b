"""The engine interface, implemented here for one process; sharding engines override it."""

from __future__ import annotations

import resource
from typing import Any

import torch
from torch import Tensor, nn

from bilora_dist.model.loading import LoadOptions, load_frozen_model


class Engine:
    """One process, nothing sharded. The training loop only ever calls these methods."""

    name = "single"
    rank = 0
    world_size = 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def build(self, path: str, options: LoadOptions) -> nn.Module:
        """The frozen base model from a model directory (a sharding engine creates it already partitioned)."""
        return load_frozen_model(path, options, self.device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """Attach the engine to the frozen, adapter-injected model; returns what forward is called on."""
        return model

    def release(self) -> None:
        """Drop any gathered copies of sharded weights (called after evaluation)."""

    def held_base_numel(self, model: nn.Module) -> tuple[int, int]:
        """(elements of the frozen base this rank holds, elements of the whole base)."""
        total = sum(p.numel() for p in model.parameters())
        return total, total

    def peak_memory_bytes(self) -> int:
        """This process's peak memory: allocated device memory on a GPU, resident set size on the CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def all_reduce_sum_(self, tensor: Tensor) -> None:
        """Sum `tensor` in place over the data-parallel ranks."""

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every rank."""

    def close(self) -> None:
        """Release process groups and hooks."""
