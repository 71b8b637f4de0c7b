"""The engine interface, implemented here for one process; sharding engines override it."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


class Engine:
    """One process, nothing sharded. The training loop only ever calls these methods."""

    name = "single"
    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def build(self, load: Callable[[], nn.Module]) -> nn.Module:
        """Create the frozen base model (a sharding engine creates it already partitioned)."""
        return load()

    def wrap(self, model: nn.Module) -> nn.Module:
        """Attach the engine to the frozen, adapter-injected model; returns what forward is called on."""
        return model

    def all_reduce_sum_(self, tensor: Tensor) -> None:
        """Sum `tensor` in place over the data-parallel ranks."""

    def broadcast_(self, tensor: Tensor, src: int = 0) -> None:
        """Overwrite `tensor` on every rank with rank src's copy."""

    def barrier(self) -> None:
        """Wait for every rank."""

    def close(self) -> None:
        """Release process groups and hooks."""
