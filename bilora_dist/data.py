"""Training data: reading records, tokenizing with loss masks, the step-indexed batch plan, collation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import Tensor

from bilora_dist.errors import UserError

IGNORE = -100
RECORD_KINDS = ("prompt/completion", "messages", "text")


def _record_error(record: Any) -> str | None:
    """Why a record is not usable, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if "prompt" in record or "completion" in record:
        if not (isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str)):
            return "'prompt' and 'completion' must both be strings"
        return None if record["completion"] else "'completion' is empty"
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            return "'messages' must be a non-empty list of {role, content} strings"
        return None if any(m["role"] == "assistant" for m in msgs) else "'messages' has no assistant turn"
    if "text" in record:
        return None if isinstance(record["text"], str) and record["text"] else "'text' must be a non-empty string"
    return f"expected one of the record forms {', '.join(RECORD_KINDS)}; keys are {sorted(record)}"


def load_records(path: str, flag: str) -> list[dict[str, Any]]:
    """Read .jsonl / .json / .parquet or a saved `datasets` directory; one error line per problem."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag}: file not found: {path}")
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"{flag} {path}: not a saved datasets directory ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        rows = [(i + 1, r) for i, r in enumerate(ds)]
        where = "row"
    elif p.suffix == ".parquet":
        rows = [(i + 1, r) for i, r in enumerate(datasets.Dataset.from_parquet(str(p)))]
        where = "row"
    elif p.suffix == ".jsonl":
        rows, where = [], "line"
        for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{flag} {path}: line {lineno}: malformed JSON ({exc.msg})") from None
    elif p.suffix == ".json":
        try:
            loaded = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{flag} {path}: malformed JSON at line {exc.lineno} ({exc.msg})") from None
        if not isinstance(loaded, list):
            raise UserError(f"{flag} {path}: expected a JSON array of records")
        rows, where = [(i + 1, r) for i, r in enumerate(loaded)], "record"
    else:
        raise UserError(f"{flag} {path}: unsupported file type '{p.suffix}' (use .jsonl, .json, .parquet or a datasets dir)")
    if not rows:
        raise UserError(f"{flag} {path}: dataset is empty")
    for number, record in rows:
        problem = _record_error(record)
        if problem:
            raise UserError(f"{flag} {path}: {where} {number}: {problem}")
    return [r for _, r in rows]


@dataclass(frozen=True)
class Example:
    """One tokenized sequence; labels are IGNORE where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def tokenize(record: dict[str, Any], tokenizer: Any, seq_len: int) -> Example:
    """Tokens and loss mask of a record, truncated to seq_len (a prompt loses its start, not its completion)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "prompt" in record:
        prompt = tokenizer(record["prompt"])["input_ids"]
        answer = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + eos
        answer = answer[:seq_len]
        prompt = prompt[len(prompt) - (seq_len - len(answer)):] if len(prompt) + len(answer) > seq_len else prompt
        return Example(prompt + answer, [IGNORE] * len(prompt) + answer)
    if "messages" in record:
        ids: list[int] = []
        labels: list[int] = []
        msgs = record["messages"]
        for i, msg in enumerate(msgs):
            upto = tokenizer.apply_chat_template(msgs[:i + 1], tokenize=True, return_dict=False)
            new = list(upto[len(ids):])
            ids.extend(new)
            labels.extend(new if msg["role"] == "assistant" else [IGNORE] * len(new))
        return Example(ids[:seq_len], labels[:seq_len])
    ids = (tokenizer(record["text"])["input_ids"] + eos)[:seq_len]
    return Example(ids, list(ids))


def tokenize_all(records: list[dict[str, Any]], tokenizer: Any, seq_len: int, flag: str) -> list[Example]:
    examples = [tokenize(r, tokenizer, seq_len) for r in records]
    kept = [e for e in examples if any(t != IGNORE for t in e.labels[1:])]
    if not kept:
        raise UserError(f"{flag}: no record keeps a supervised token within --seq-len {seq_len}")
    return kept


def collate(examples: list[Example], pad_id: int) -> dict[str, Tensor]:
    """Left-padded batch with explicit position ids.

    Left padding puts every sequence's end at the last column, so the supervised tail of the batch
    is a short suffix: `logits_to_keep` asks the model for logits over that suffix only.
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, width - n:] = torch.tensor(e.input_ids)
        labels[row, width - n:] = torch.tensor(e.labels)
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
