"""Causal-LM loss as a token sum, so micro-batches and ranks combine exactly by summation.

Full-vocabulary fp32 logits for a whole micro-batch do not fit a GPU (128k vocabulary x 8 x 4096 tokens is
17 GB, three times that with softmax and gradient). `attach_head_loss` therefore computes the loss inside the
output head's forward, where every engine has the head's weight gathered: `linear_cross_entropy` projects
`chunk` tokens at a time and keeps, for backward, only the gradient of the head's input, so backward needs
neither logits nor the (by then released) head weight.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bilora_dist.data import IGNORE

_ATTR = "_bilora_head_loss"


def _chunk_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, softcap: float | None,
                with_grad: bool) -> tuple[Tensor, Tensor | None]:
    """One chunk: (sum_i CE(softcap(h_i W^T + b), t_i), d sum / d hidden if `with_grad`).

    The fp32 logits are transformed in place (a second buffer only for the softcap's slope); the gradient
    passes through the weight's dtype, as autograd of `logits.float()` would."""
    t = targets[:, None]
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        tanh = logits.div_(softcap).tanh_()
        slope = tanh.square().neg_().add_(1) if with_grad else None  # d softcap(l) / d l
        logits = tanh.mul_(softcap)
    top = logits.amax(dim=-1, keepdim=True)
    target_logits = logits.gather(1, t)
    exp = logits.sub_(top).exp_()
    total = exp.sum(dim=-1, keepdim=True)
    loss = (total.log() + top - target_logits).sum()
    if not with_grad:
        return loss, None
    probs = exp.div_(total)
    probs.scatter_add_(1, t, torch.full_like(t, -1, dtype=probs.dtype))
    if softcap:
        probs.mul_(slope)
    return loss, probs.to(weight.dtype) @ weight


def _chunked_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                  softcap: float | None, with_grad: bool) -> tuple[Tensor, Tensor | None]:
    """`_chunk_loss` over `chunk` rows at a time (0: all at once): only one chunk's logits exist at a time."""
    n = hidden.shape[0]
    step = chunk or max(n, 1)
    grad = torch.empty_like(hidden) if with_grad else None
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        chunk_loss, chunk_grad = _chunk_loss(hidden[rows], weight, bias, targets[rows], softcap, with_grad)
        loss += chunk_loss
        if grad is not None:
            grad[rows] = chunk_grad
    return loss, grad


class LinearCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of a frozen linear head whose forward also computes the gradient of its
    input and saves only that (N x d): backward needs neither logits nor the head's weight."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                softcap: float | None) -> Tensor:
        assert not ctx.needs_input_grad[1] and not ctx.needs_input_grad[2], "the output head is frozen"
        loss, grad = _chunked_loss(hidden, weight, bias, targets, chunk, softcap, with_grad=True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                         softcap: float | None = None) -> Tensor:
    """Summed cross-entropy of the frozen head `weight`/`bias` (logits softcapped if `softcap`) over the rows
    of `hidden` (N x d) whose `targets` are not IGNORE; only those rows are projected, `chunk` at a time."""
    valid = targets != IGNORE
    hidden, targets = hidden[valid], targets[valid]
    if torch.is_grad_enabled() and hidden.requires_grad:
        return LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, softcap)
    return _chunked_loss(hidden, weight, bias, targets, chunk, softcap, with_grad=False)[0]


class HeadLoss:
    """Hooks on the output head that, while `active`, replace its projection by `linear_cross_entropy`.

    The pre-hook keeps the head's input and lets the head project only the last position (detached): the
    model returns those logits, post-processed as it does, and `matches` checks that the post-processing
    is the softcap modelled here. The forward hook runs first among the head's forward hooks, so before
    ZeRO-3 or FSDP2 release the gathered weight, and computes the loss from the kept input."""

    def __init__(self, chunk: int, softcap: float | None):
        self.chunk, self.softcap = chunk, softcap
        self.targets: Tensor | None = None
        self.hidden: Tensor | None = None
        self.loss: Tensor | None = None
        self.probe: Tensor | None = None
        self.verified: bool | None = None  # None: not checked yet

    @contextmanager
    def active(self, targets: Tensor) -> Iterator[None]:
        """The head computes the loss against `targets` (one per input position but the last) in this block."""
        self.targets = targets
        try:
            yield
        finally:
            self.targets = self.hidden = None

    def before_head(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self.targets is None:
            return None
        self.hidden = args[0]
        return (args[0][:, -1:].detach(), *args[1:])

    def after_head(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if self.targets is None:
            return
        hidden = self.hidden[:, :-1]
        self.loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), module.weight, module.bias,
                                         self.targets.reshape(-1), self.chunk, self.softcap)
        self.probe = output

    def matches(self, logits: Tensor) -> bool:
        """Whether the model's logits are the softcapped head output (checked once: a model that rescales
        its logits otherwise, as Cohere or Granite do, falls back to the full-logits loss)."""
        if self.verified is None:
            want = self.probe.float()
            if self.softcap:
                want = self.softcap * torch.tanh(want / self.softcap)
            tol = 4 * torch.finfo(self.probe.dtype).eps * float(want.abs().max())
            self.verified = logits.shape == want.shape and float((logits.float() - want).abs().max()) <= tol
        self.probe = None
        return self.verified


def attach_head_loss(model: nn.Module, chunk: int) -> HeadLoss:
    """Make `token_loss_sum(model, ...)` project `chunk` tokens at a time (0: all at once). Call before the
    engine wraps the model."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    head_loss = HeadLoss(chunk, softcap)
    head.register_forward_pre_hook(head_loss.before_head)
    head.register_forward_hook(head_loss.after_head, prepend=True)
    setattr(model, _ATTR, head_loss)
    return head_loss


def _logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], logits_to_keep=batch["logits_to_keep"], use_cache=False).logits


def token_loss_sum(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(sum of cross-entropy over supervised tokens, number of supervised tokens).

    With `attach_head_loss`, no full-vocabulary logits exist for more than its chunk of tokens; without
    (or for a model whose logit post-processing it does not reproduce), fp32 logits of the whole suffix."""
    labels = batch["labels"]
    targets = labels[:, labels.shape[1] - batch["logits_to_keep"] + 1:]
    tokens = (targets != IGNORE).sum().to(torch.float32)
    head_loss: HeadLoss | None = getattr(model, _ATTR, None)
    if head_loss is not None and head_loss.verified is not False:
        with head_loss.active(targets):
            logits = _logits(model, batch)
        loss, head_loss.loss = head_loss.loss, None
        if head_loss.matches(logits):
            return loss, tokens
        warnings.warn(f"{type(model).__name__} post-processes its logits in a way the chunked loss does not "
                      "reproduce: its loss uses full-vocabulary logits (memory grows with the batch)")
    logits = _logits(model, batch)[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"), tokens
