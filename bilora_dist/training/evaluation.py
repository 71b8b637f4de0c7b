"""Held-out evaluation, always with the auxiliary branch off: loss and, for classification data, accuracy."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bilora_dist.adapters.bank import AdapterBank
from bilora_dist.data import IGNORE, Example, Prepared, collate, ids_and_labels, to_device
from bilora_dist.engines.base import Engine
from bilora_dist.training.loss import token_loss_sum

MAX_CHOICES = 64


@dataclass(frozen=True)
class ChoiceTask:
    """Eval records whose completions come from a small set of single-token labels.

    Accuracy is the argmax of the label log-likelihood after the prompt; for single-token labels
    that is one forward pass per prompt, reading the logits of the candidate tokens.
    """

    prompts: list[Example]
    candidate_ids: list[int]
    gold: list[int]


def choice_task(data: Prepared, tokenizer: Any, seq_len: int) -> ChoiceTask | None:
    """The classification view of a prompt/completion eval set, or None if its completions are not
    single-token labels."""
    if data.fmt != "prompt_completion":
        return None
    completions = list(data.records["completion"])
    labels = sorted(set(completions))
    if not 2 <= len(labels) <= MAX_CHOICES:
        return None
    ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
    if any(len(i) != 1 for i in ids):
        return None
    prompts = []
    for prompt in data.records["prompt"]:
        p = tokenizer(prompt)["input_ids"][-seq_len:]
        prompts.append(Example(p, [IGNORE] * len(p)))
    return ChoiceTask(prompts, [i[0] for i in ids], [labels.index(c) for c in completions])


def rank_share(lengths: Sequence[int], engine: Engine, batch_size: int) -> list[list[int]]:
    """This rank's eval batches of indices into `lengths`, sequences of similar length together: the indices in
    length order, dealt rank::world, padded with -1 so every rank runs the same count of forward passes
    (sharded engines gather weights collectively inside forward). The order changes sums over the set by float
    rounding only."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    mine = order[engine.rank::engine.world_size]
    per_rank = -(-len(lengths) // engine.world_size)
    mine += [-1] * (per_rank - len(mine))
    return [mine[i:i + batch_size] for i in range(0, per_rank, batch_size)]


def held_out_batches(examples: Sequence[Any], engine: Engine, batch_size: int, pad_id: int) -> Iterator[dict]:
    """This rank's share of `examples` as collated batches on its device; the rows that only even out the
    ranks' counts of forward passes have no targets."""
    lengths = [len(ids_and_labels(e)[0]) for e in examples]
    filler = min(range(len(lengths)), key=lengths.__getitem__)  # the shortest: widens no batch
    for idx in rank_share(lengths, engine, batch_size):
        batch = collate([examples[i if i >= 0 else filler] for i in idx], pad_id)
        batch["labels"][[i < 0 for i in idx]] = IGNORE
        yield to_device(batch, engine.device)


@torch.no_grad()
def evaluate(model: nn.Module, bank: AdapterBank, examples: Sequence[Any], task: ChoiceTask | None,
             engine: Engine, batch_size: int, pad_id: int) -> dict[str, float]:
    """eval_loss (token-mean over the whole set) and, with a ChoiceTask, accuracy; identical on every rank."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, device=engine.device)  # loss sum, tokens, correct, scored
    with bank.primary_only():
        for batch in held_out_batches(examples, engine, batch_size, pad_id):
            loss, tokens = token_loss_sum(model, batch)
            totals[0] += loss
            totals[1] += tokens
        if task is not None:
            cand = torch.tensor(task.candidate_ids, device=engine.device)
            lengths = [len(p.input_ids) for p in task.prompts]
            filler = min(range(len(lengths)), key=lengths.__getitem__)
            for idx in rank_share(lengths, engine, batch_size):
                batch = to_device(collate([task.prompts[i if i >= 0 else filler] for i in idx], pad_id), engine.device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"], logits_to_keep=1, use_cache=False).logits
                pred = logits[:, -1, cand].argmax(-1)
                for row, i in enumerate(idx):
                    if i >= 0:
                        totals[2] += int(pred[row]) == task.gold[i]
                        totals[3] += 1
    engine.all_reduce_sum_(totals)
    engine.release()
    model.train(was_training)
    out = {"eval_loss": float(totals[0] / totals[1])}
    if task is not None:
        out["accuracy"] = float(totals[2] / totals[3])
    return out
