"""Held-out evaluation in length-ordered batches against one-example-at-a-time references."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from bilora_dist.data import IGNORE, Example
from bilora_dist.engines.base import Engine
from bilora_dist.training.evaluation import ChoiceTask, evaluate, rank_share
from tests_support import random_adapted_model, tiny_llama_config

VOCAB = 61
LABELS = [5, 9, 17]  # single-token class labels


class Rank(Engine):
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_share_deals_every_index_once_in_length_order(world_size):
    lengths = [7, 3, 9, 3, 12, 1, 8, 5, 6, 2, 11]
    shares = [rank_share(lengths, Rank(r, world_size), 2) for r in range(world_size)]
    assert len({len(s) for s in shares}) == 1  # the same count of forward passes on every rank
    dealt = [i for s in shares for batch in s for i in batch if i >= 0]
    assert sorted(dealt) == list(range(len(lengths)))
    for share in shares:  # each rank reads its indices shortest first
        mine = [i for batch in share for i in batch if i >= 0]
        assert [lengths[i] for i in mine] == sorted(lengths[i] for i in mine)


def test_evaluate_equals_one_example_at_a_time():
    """Loss over the set and accuracy from batches of mixed lengths (left padding, sorted, a short last batch)
    against each example alone, unpadded, with every position's logits and F.cross_entropy."""
    model, bank = random_adapted_model(tiny_llama_config(VOCAB))
    model.eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(20, VOCAB, (n,), generator=gen).tolist() for n in (6, 13, 4, 9, 9, 2, 15, 7, 11)]
    gold = [int(torch.randint(0, len(LABELS), (), generator=gen)) for _ in prompts]
    examples = [Example(p + [LABELS[g], 1], [IGNORE] * len(p) + [LABELS[g], 1]) for p, g in zip(prompts, gold)]
    task = ChoiceTask([Example(p, [IGNORE] * len(p)) for p in prompts], LABELS, gold)

    got = evaluate(model, bank, examples, task, Engine(), batch_size=4, pad_id=0)

    loss, tokens, correct = 0.0, 0, 0
    with torch.no_grad(), bank.primary_only():
        for ex, p, g in zip(examples, prompts, gold):
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0].double()
            targets = torch.tensor(ex.labels[1:])
            loss += float(F.cross_entropy(logits[:-1], targets, ignore_index=IGNORE, reduction="sum"))
            tokens += int((targets != IGNORE).sum())
            correct += int(logits[len(p) - 1, LABELS].argmax()) == g
    assert got["eval_loss"] == pytest.approx(loss / tokens, rel=1e-5)
    assert got["accuracy"] == pytest.approx(correct / len(prompts), abs=1e-6)  # one example is 0.11
    assert 0 < correct < len(prompts)  # the check tells right from wrong predictions
