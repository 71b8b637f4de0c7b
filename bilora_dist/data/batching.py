"""Batches: the tokenized example, left-padded or packed collation and the step-indexed batch plan.

In either layout the first token of every example is never a target: nothing before it belongs to the example.
"""

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


def ids_and_labels(example: Example | Mapping[str, list[int]]) -> tuple[list[int], list[int]]:
    """An Example's or a row's {"input_ids", "labels"} (as an Arrow dataset of tokenized examples returns them)."""
    if isinstance(example, Example):
        return example.input_ids, example.labels
    return example["input_ids"], example["labels"]


def _logits_to_keep(labels: Tensor) -> int:
    """Columns from the one before the batch's first supervised target to the end: where logits are needed."""
    supervised = (labels[:, 1:] != IGNORE).any(0).nonzero()
    first_target = int(supervised[0]) + 1 if len(supervised) else labels.shape[1] - 1
    return labels.shape[1] - first_target + 1


def collate(examples: Sequence[Example | Mapping[str, list[int]]], pad_id: int) -> dict[str, Tensor | int]:
    """Left-padded batch with explicit position ids and an attention mask.

    Left padding puts every sequence's end at the last column, so the supervised tail of the batch
    is a short suffix: `logits_to_keep` asks the model for logits over that suffix only.
    """
    pairs = [ids_and_labels(e) for e in examples]
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(pairs):
        n = len(ids)
        input_ids[row, width - n:] = torch.tensor(ids)
        labels[row, width - n + 1:] = torch.tensor(labs[1:], dtype=torch.long)  # a pad never predicts a token
        mask[row, width - n:] = 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels,
            "logits_to_keep": _logits_to_keep(labels)}


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the indices of `lengths` per row, every row's total at most `capacity`.

    Longest first (ties by index), each into the first row with room, so the packing is deterministic.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"an example of {lengths[i]} tokens does not fit a row of {capacity}")
        row = next((r for r, free in enumerate(room) if lengths[i] <= free), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(capacity)
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def collate_packed(examples: Sequence[Example | Mapping[str, list[int]]], seq_len: int | None,
                   pad_id: int) -> dict[str, Tensor | int | None]:
    """The examples packed into rows of at most `seq_len` tokens (`pack_rows`), or into one row when `seq_len`
    is None, each with its own position ids 0..n-1 and no attention mask.

    Transformers reads the restarting position ids as separate sequences: sdpa, eager and flex attention get
    a block-causal mask; flash attention runs varlen, but only on a batch of one row (hence None). Rows shorter
    than the longest end in a run of pad tokens with positions 0..p-1: a sequence of its own that no example
    attends to, with no targets.
    """
    pairs = [ids_and_labels(e) for e in examples]
    lengths = [len(ids) for ids, _ in pairs]
    rows = pack_rows(lengths, sum(lengths) if seq_len is None else seq_len)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            (ids, labs), n = pairs[i], lengths[i]
            input_ids[r, col:col + n] = torch.tensor(ids)
            labels[r, col + 1:col + n] = torch.tensor(labs[1:], dtype=torch.long)  # not predicted by its neighbour
            position_ids[r, col:col + n] = torch.arange(n)
            col += n
        position_ids[r, col:] = torch.arange(width - col)
    return {"input_ids": input_ids, "attention_mask": None, "position_ids": position_ids, "labels": labels,
            "logits_to_keep": _logits_to_keep(labels)}


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
