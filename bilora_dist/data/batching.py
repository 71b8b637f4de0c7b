"""Batches: the tokenized example, left-padded collation and the step-indexed batch plan."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One tokenized sequence; labels are IGNORE where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def collate(examples: Sequence[Example | Mapping[str, list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Left-padded batch with explicit position ids, from Examples or rows {"input_ids", "labels"} (as an
    Arrow dataset of tokenized examples returns them).

    Left padding puts every sequence's end at the last column, so the supervised tail of the batch
    is a short suffix: `logits_to_keep` asks the model for logits over that suffix only.
    """
    pairs = [(e.input_ids, e.labels) if isinstance(e, Example) else (e["input_ids"], e["labels"]) for e in examples]
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(pairs):
        n = len(ids)
        input_ids[row, width - n:] = torch.tensor(ids)
        labels[row, width - n:] = torch.tensor(labs)
        mask[row, width - n:] = 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    supervised = (labels[:, 1:] != IGNORE).any(0).nonzero()
    first_target = int(supervised[0]) + 1 if len(supervised) else width - 1
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels,
            "logits_to_keep": width - first_target + 1}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors moved to `device` (ints such as logits_to_keep stay as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class BatchPlan:
    """Which examples every optimizer step uses: a pure function of the step number.

    The data stream is a concatenation of seeded per-epoch permutations; step t takes the next
    global batch (micro x accum x world). Rank k takes the k-th contiguous share and splits it into
    micro-batches, so any world size sees the same global batch and resume is exact. A resumed run
    continues the stream at the example where the checkpoint left it (`start_example` at
    `start_step`), whatever its own global batch.
    """

    def __init__(self, n_examples: int, global_batch: int, seed: int, start_step: int = 0, start_example: int = 0):
        self.n, self.global_batch, self.seed = n_examples, global_batch, seed
        self.start_step, self.start_example = start_step, start_example
        self._perms: dict[int, list[int]] = {}

    def consumed(self, step: int) -> int:
        """Examples of the stream used by steps before `step`."""
        return self.start_example + (step - self.start_step) * self.global_batch

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perms[epoch]

    def global_indices(self, step: int) -> list[int]:
        start = self.consumed(step)
        return [self._perm(k // self.n)[k % self.n] for k in range(start, start + self.global_batch)]

    def micro_batches(self, step: int, rank: int, world: int, accum: int) -> list[list[int]]:
        share = self.global_batch // world
        mine = self.global_indices(step)[rank * share:(rank + 1) * share]
        micro = share // accum
        return [mine[j * micro:(j + 1) * micro] for j in range(accum)]
