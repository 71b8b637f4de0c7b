"""One optimizer step of each method: lora, bilora (specs/bilora.md), lora-sam (two-pass baseline).

Gradients are taken of the *summed* token loss; one all-reduce over the bank's flat gradient
bucket (which also carries the loss sum and token count) then divides by the global token count.
A step therefore equals the single-process step on the same global batch, whatever the world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bilora_dist.adapters.bank import AdapterBank
from bilora_dist.engines.base import Engine
from bilora_dist.loss import token_loss_sum


@dataclass
class StepStats:
    loss: float
    tokens: int
    grad_norm: float
    aux_norm: float | None = None


def build_optimizer(bank: AdapterBank, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """One AdamW over the bank: the primary with the configured decay, the auxiliary with none."""
    groups = [{"params": [bank.primary.flat], "weight_decay": weight_decay}]
    if bank.aux is not None:
        groups.append({"params": [bank.aux.flat], "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


class LoRAStep:
    """Plain LoRA: forward/backward every micro-batch, reduce, clip, one optimizer step.

    The base of the other methods, which reuse its pass, reduction and clipping."""

    passes = 1

    def __init__(self, model: nn.Module, bank: AdapterBank, optimizer: torch.optim.Optimizer, engine: Engine,
                 max_grad_norm: float, rho: float):
        self.model, self.bank, self.optimizer, self.engine = model, bank, optimizer, engine
        self.max_grad_norm, self.rho = max_grad_norm, rho
        self.bucket = bank.bind_grad_bucket(extra=2)

    def rebind(self) -> None:
        """Re-attach the gradient bucket after the bank's tensors were replaced (rank change)."""
        self.bucket = self.bank.bind_grad_bucket(extra=2)

    def forward_backward(self, micro_batches: list[dict[str, Tensor]]) -> tuple[float, int]:
        """Accumulate summed-loss gradients, reduce over ranks, normalise by the global token count."""
        self.bucket.zero_()
        for batch in micro_batches:
            loss, tokens = token_loss_sum(self.model, batch)
            loss.backward()
            self.bucket[-2] += loss.detach()
            self.bucket[-1] += tokens
        self.engine.all_reduce_sum_(self.bucket)
        loss_sum, tokens = float(self.bucket[-2]), int(self.bucket[-1])
        self.bucket.div_(max(tokens, 1))
        return loss_sum / max(tokens, 1), tokens

    def clip_primary(self) -> float:
        """Clip the primary gradient only (the auxiliary is never clipped with it); return its norm."""
        grad = self.bank.primary.flat.grad
        norm = float(grad.norm())
        if self.max_grad_norm > 0 and norm > self.max_grad_norm:
            grad.mul_(self.max_grad_norm / (norm + 1e-6))
        return norm

    def __call__(self, micro_batches: list[dict[str, Tensor]]) -> StepStats:
        loss, tokens = self.forward_backward(micro_batches)
        norm = self.clip_primary()
        self.optimizer.step()
        return StepStats(loss, tokens, norm)


class BiLoRAStep(LoRAStep):
    """Bi-LoRA: one pass through both branches; primary descends, auxiliary ascends, then projection."""

    def __call__(self, micro_batches: list[dict[str, Tensor]]) -> StepStats:
        assert self.bank.aux is not None
        loss, tokens = self.forward_backward(micro_batches)
        norm = self.clip_primary()
        self.bank.aux.flat.grad.neg_()  # Adam is sign-equivariant: descent on -g is exact ascent
        self.optimizer.step()
        before = self.bank.project_aux(self.rho)
        return StepStats(loss, tokens, norm, aux_norm=min(before, self.rho))


class SAMStep(LoRAStep):
    """LoRA-SAM: gradient at theta, climb to theta + rho g/||g||, gradient there, restore, step."""

    passes = 2

    def __call__(self, micro_batches: list[dict[str, Tensor]]) -> StepStats:
        flat = self.bank.primary.flat
        loss, tokens = self.forward_backward(micro_batches)
        with torch.no_grad():
            eps = flat.grad * (self.rho / (float(flat.grad.norm()) + 1e-12))
            flat.add_(eps)
        self.forward_backward(micro_batches)
        with torch.no_grad():
            flat.sub_(eps)
        norm = self.clip_primary()
        self.optimizer.step()
        return StepStats(loss, tokens, norm)


METHOD_STEPS: dict[str, type[LoRAStep]] = {"lora": LoRAStep, "bilora": BiLoRAStep, "lora-sam": SAMStep}
