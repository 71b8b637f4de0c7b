"""Which decoder blocks recompute their activations in backward (gradient checkpointing).

`--gradient-checkpointing false|true` forces none or all (with `--checkpoint-every K`, every K-th block);
`auto` (the default) takes the least recomputation whose planned peak (planning.py) fits the memory budget
less HEADROOM: none, then every K-th block for K from the number of blocks down, then all. The budget is
`--memory-budget` or what the device has free before the model is loaded: the GPU's free memory, or on a
CPU the machine's available memory shared by the ranks on it. All ranks take the smallest budget.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


HEADROOM = 0.10  # of the budget, left for what the plan does not see (allocator fragmentation, kernels' workspace)


@dataclass(frozen=True)
class Recompute:
    """Every `every`-th of `total` decoder blocks is checkpointed (0: none, 1: all), and why."""

    every: int
    total: int  # 0 where not counted (all or none forced by the flags)
    why: str

    @property
    def blocks(self) -> frozenset[int]:
        """The checkpointed blocks: 0, every, 2·every, ..."""
        return frozenset(range(0, self.total, self.every)) if self.every else frozenset()

    def describe(self) -> str:
        if self.every == 0:
            return "off"
        if self.every == 1:
            return f"all {self.total} blocks" if self.total else "all blocks"
        return f"every {self.every}-th block ({len(self.blocks)} of {self.total})"


def choose(total: int, peak_of: Callable[[frozenset[int]], int], budget: int) -> Recompute:
    """The fewest recomputed blocks whose planned peak fits `budget` less HEADROOM (all if none fits)."""
    limit = int(budget * (1 - HEADROOM))
    candidates = {len(r.blocks): r for r in (Recompute(k, total, "") for k in range(total, 0, -1))}  # evenest last
    peak = 0
    for count in sorted({0, *candidates}):
        every = candidates[count].every if count else 0
        peak = peak_of(Recompute(every, total, "").blocks)
        if peak <= limit:
            return Recompute(every, total, f"planned peak {_gib(peak)} within {_gib(limit)} ({_gib(budget)} budget "
                                           f"less {HEADROOM:.0%} headroom)")
    return Recompute(1, total, f"planned peak {_gib(peak)} exceeds {_gib(limit)} even so ({_gib(budget)} budget less "
                               f"{HEADROOM:.0%} headroom): expect to run out of memory")


def forced(setting: str, every: int, total: int) -> Recompute:
    """What `--gradient-checkpointing true|false` (and `--checkpoint-every`) ask for."""
    if setting == "false":
        return Recompute(0, total, "--gradient-checkpointing false")
    return Recompute(max(every, 1), total, "--gradient-checkpointing true" +
                     (f" --checkpoint-every {every}" if every > 1 else ""))


def free_memory_bytes(device: torch.device) -> int:
    """What this rank may use: the GPU's free memory, or the machine's available memory over its local ranks."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    else:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def apply_recompute(model: nn.Module, recompute: Recompute) -> None:
    """Switch transformers' non-reentrant activation checkpointing on for exactly the chosen decoder blocks
    (its `every_n_layers` counts the blocks as Recompute.blocks does)."""
    if recompute.every:
        model.activation_checkpointing_enable(every_n_layers=recompute.every)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
