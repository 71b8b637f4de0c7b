"""Per-rank memory plan of a run, computed from shapes alone (the model is built on the meta device).

What a rank holds: its part of the frozen base (whole for single / ZeRO-1/2, a 1/N partition for
ZeRO-3 plus the small parameters it keeps resident, a dim-0 shard for FSDP2), the replicated fp32
adapters with their gradient bucket and AdamW moments, and transiently the largest block gathered
for a forward or backward.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import nn

from bilora_dist.modeling import shard_units

ADAPTER_BYTES = 4  # adapters, their gradients and optimizer moments are fp32 whatever the base dtype
DEFAULT_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default


@dataclass(frozen=True)
class RankPlan:
    rank: int
    base_bytes: int
    adapter_bytes: int
    adapter_grad_bytes: int
    optimizer_bytes: int
    gathered_block_bytes: int

    @property
    def total_bytes(self) -> int:
        return (self.base_bytes + self.adapter_bytes + self.adapter_grad_bytes + self.optimizer_bytes
                + self.gathered_block_bytes)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _shard_rows(rows: int, world: int, rank: int) -> int:
    """Rows of a dim-0 shard that `rank` holds (torch.chunk semantics, as FSDP2's Shard(0))."""
    per = math.ceil(rows / world)
    return max(0, min(per, rows - rank * per))


def base_bytes_on_rank(model: nn.Module, engine: str, world: int, rank: int,
                       persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD) -> int:
    """Bytes of the frozen base resident on `rank` once training runs (gathered copies released)."""
    total = 0
    for p in model.parameters():
        n, size = p.numel(), p.element_size()
        if engine == "zero3":
            total += (math.ceil(n / world) + (n if n <= persistence_threshold else 0)) * size
        elif engine == "fsdp" and p.dim() > 0:
            total += _shard_rows(p.shape[0], world, rank) * (n // max(p.shape[0], 1)) * size
        else:
            total += n * size
    return total


def largest_gathered_block_bytes(model: nn.Module, engine: str) -> int:
    """The largest unit whose full weights a sharding engine materialises at once (0 when nothing is sharded)."""
    if engine not in ("zero3", "fsdp"):
        return 0
    return max(sum(p.numel() * p.element_size() for p in unit.parameters()) for unit in shard_units(model))


def plan_memory(model: nn.Module, adapter_numel: int, engine: str, world: int,
                persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD) -> list[RankPlan]:
    """One RankPlan per rank; `engine` is single, replicated (ZeRO-1/2, plain data parallel), zero3 or fsdp."""
    adapters = adapter_numel * ADAPTER_BYTES
    block = largest_gathered_block_bytes(model, engine)
    return [RankPlan(rank, base_bytes_on_rank(model, engine, world, rank, persistence_threshold), adapters,
                     adapters, 2 * adapters, block) for rank in range(world)]


def format_plan(plans: list[RankPlan], header: str) -> str:
    """A table, one row per rank, in GiB."""
    gib = 1024 ** 3
    cols = ("base_bytes", "adapter_bytes", "adapter_grad_bytes", "optimizer_bytes", "gathered_block_bytes",
            "total_bytes")
    names = ("base shard", "adapters", "adapter grads", "AdamW state", "gathered block", "total")
    lines = [header, "rank " + "".join(f"{n:>16}" for n in names)]
    for p in plans:
        d = p.as_dict()
        lines.append(f"{p.rank:>4} " + "".join(f"{d[c] / gib:>12.3f} GiB" for c in cols))
    return "\n".join(lines)
