"""Causal-LM loss as a token sum, so micro-batches and ranks combine exactly by summation."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bilora_dist.data import IGNORE


def shifted_logits(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Logits over the batch's supervised suffix and the tokens they predict (IGNORE where unsupervised)."""
    keep = batch["logits_to_keep"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=keep, use_cache=False).logits
    labels = batch["labels"]
    return logits[:, :-1].float(), labels[:, labels.shape[1] - keep + 1:]


def token_loss_sum(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(sum of cross-entropy over supervised tokens, number of supervised tokens)."""
    logits, targets = shifted_logits(model, batch)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (targets != IGNORE).sum().to(torch.float32)
