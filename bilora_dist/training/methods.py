"""One optimizer step of each method: lora, bilora (specs/bilora.md), lora-sam (two-pass baseline).

Gradients are taken of the *summed* token loss; one all-reduce over the bank's gradient bucket (which
also carries the loss sum and token count) then divides by the global token count. A step therefore
equals the single-process step on the same global batch, whatever the world size.

A method is a step class registered in METHOD_STEPS; `from_config` picks its options from the run's
configuration, so a new method is one class plus one `register_method` call.

A step whose reduced loss or gradient is not finite is skipped: no optimizer update (moments untouched),
no projection, `StepStats.skipped` says why. Every rank reads the same all-reduced bucket, so all agree
without another collective.

The first finite step with tokens checks, before it updates anything, that every bank layer got a gradient
(`check_reached`): a layer without one has had its forward replaced by something that skips its adapter (a
kernel patch such as Liger's fused MoE, a wrapper), and would never train. All ranks read the same reduced
bucket, so all stop together, with one line naming those layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bilora_dist.adapters.bank import AdapterBank
from bilora_dist.training.aux_ascent import (AuxVariant, clean_loss, diagnostics, normalized_ascent, reachable_spectra,
                                   refresh)
from bilora_dist.engines.base import Engine
from bilora_dist.errors import UserError
from bilora_dist.training.loss import token_loss_sum

if TYPE_CHECKING:
    from bilora_dist.config.train import TrainConfig


@dataclass
class StepStats:
    loss: float
    tokens: int
    grad_norm: float
    aux_norm: float | None = None
    skipped: str | None = None  # why no update was made: "non-finite loss" or "non-finite gradient"
    diagnostics: dict[str, float] | None = None  # Bi-LoRA's aux_* fields of a diagnostics step


def build_optimizer(bank: AdapterBank, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, aux_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """One AdamW over the bank: the primary descends with the configured decay; the auxiliary (Bi-LoRA)
    ascends (`maximize`) with none, at `aux_lr_scale` times the lr (its own group, so its own schedule)."""
    groups = [{"params": [bank.primary.flat], "weight_decay": weight_decay}]
    if bank.aux is not None:
        groups.append({"params": [bank.aux.flat], "weight_decay": 0.0, "maximize": True, "lr": lr * aux_lr_scale})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


class LoRAStep:
    """Plain LoRA: forward/backward every micro-batch, reduce, clip, one optimizer step.

    The base of the other methods, which reuse its pass, reduction and clipping."""

    passes = 1

    def __init__(self, model: nn.Module, bank: AdapterBank, optimizer: torch.optim.Optimizer, engine: Engine,
                 max_grad_norm: float):
        self.model, self.bank, self.optimizer, self.engine = model, bank, optimizer, engine
        self.max_grad_norm = max_grad_norm
        self.reach_pending = True  # until the first applied step with tokens has checked every layer's gradient
        bank.bind_grad_bucket()  # the bank re-binds it whenever it replaces a branch (rank change)

    @classmethod
    def from_config(cls, model: nn.Module, bank: AdapterBank, optimizer: torch.optim.Optimizer, engine: Engine,
                    cfg: TrainConfig) -> LoRAStep:
        """The step with the options `cfg` sets for this method."""
        return cls(model, bank, optimizer, engine, cfg.max_grad_norm)

    def forward_backward(self, micro_batches: list[dict[str, Tensor]]) -> tuple[float, int]:
        """Accumulate summed-loss gradients, reduce over ranks, normalise by the global token count."""
        bucket = self.bank.grad_bucket
        assert bucket is not None
        bucket.zero_()
        for batch in micro_batches:
            loss, tokens = token_loss_sum(self.model, batch)
            loss.backward()
            bucket.add_loss(loss, tokens)
        self.engine.all_reduce_sum_(bucket.flat)
        loss_sum, tokens = bucket.loss_sum, bucket.tokens
        bucket.flat.div_(max(tokens, 1))
        return loss_sum / max(tokens, 1), tokens

    def nonfinite(self, loss: float) -> str | None:
        """Why the step just reduced cannot be applied, or None."""
        if not math.isfinite(loss):
            return "non-finite loss"
        assert self.bank.grad_bucket is not None
        largest = torch.linalg.vector_norm(self.bank.grad_bucket.flat, float("inf"))  # nan or inf if any is
        return None if bool(torch.isfinite(largest)) else "non-finite gradient"

    def check_reached(self, tokens: int) -> None:
        """On the first finite step with tokens (this process's, so also after a resume): UserError naming the
        bank layers whose primary factors got no gradient at all. The primary's B starts at 0, so its A gets
        none at the first step, but its B does wherever the adapter runs; a fused expert tensor counts as one
        layer (an expert no token reached leaves its slice zero). The auxiliary is not read: it runs in the same
        product as the primary, so it is bypassed with it."""
        if not self.reach_pending or tokens == 0:
            return
        self.reach_pending = False
        shapes = self.bank.shapes
        missing = [shapes[i].name for i in (self.bank.primary.grad_peaks() == 0).nonzero().flatten().tolist()]
        if missing:
            named = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise UserError(f"the adapters of {len(missing)} of {len(shapes)} layers got no gradient in the first "
                            f"step ({named}): something replaced their forward (a kernel patch such as Liger's "
                            "fused MoE, or a wrapper), so they would never train; stopped before the first update "
                            "(try --kernels none)")

    def clip_primary(self) -> float:
        """Clip the primary gradient only (the auxiliary is never clipped with it); return its norm."""
        grad = self.bank.primary.flat.grad
        norm = float(grad.norm())
        if self.max_grad_norm > 0 and norm > self.max_grad_norm:
            grad.mul_(self.max_grad_norm / (norm + 1e-6))
        return norm

    def __call__(self, micro_batches: list[dict[str, Tensor]], step: int = 0) -> StepStats:
        """Optimizer step `step` (0-based: what is due at it) on this rank's micro-batches."""
        loss, tokens = self.forward_backward(micro_batches)
        if skipped := self.nonfinite(loss):
            return StepStats(loss, tokens, math.nan, skipped=skipped)
        self.check_reached(tokens)
        norm = self.clip_primary()
        self.optimizer.step()
        return StepStats(loss, tokens, norm)


class _RadiusStep(LoRAStep):
    """A method with a perturbation radius rho (`--rho`)."""

    def __init__(self, model: nn.Module, bank: AdapterBank, optimizer: torch.optim.Optimizer, engine: Engine,
                 max_grad_norm: float, rho: float):
        super().__init__(model, bank, optimizer, engine, max_grad_norm)
        self.rho = rho

    @classmethod
    def from_config(cls, model: nn.Module, bank: AdapterBank, optimizer: torch.optim.Optimizer, engine: Engine,
                    cfg: TrainConfig) -> LoRAStep:
        assert cfg.rho is not None, "cfg.resolved() sets rho"
        return cls(model, bank, optimizer, engine, cfg.max_grad_norm, cfg.rho)


class BiLoRAStep(_RadiusStep):
    """Bi-LoRA: one pass through both branches; the primary descends, the auxiliary ascends (its AdamW
    group has `maximize`, or normalised gradient ascent), then the auxiliary is projected onto the rho-ball,
    or on a refresh step set to the top singular part of the weight gradient (aux_ascent.py). A diagnostics
    step adds one forward without the auxiliary and logs how far the auxiliary follows the ascent."""

    def __init__(self, model: nn.Module, bank: AdapterBank, optimizer: torch.optim.Optimizer, engine: Engine,
                 max_grad_norm: float, rho: float, variant: AuxVariant = AuxVariant()):
        super().__init__(model, bank, optimizer, engine, max_grad_norm, rho)
        self.variant = variant

    @classmethod
    def from_config(cls, model: nn.Module, bank: AdapterBank, optimizer: torch.optim.Optimizer, engine: Engine,
                    cfg: TrainConfig) -> LoRAStep:
        assert cfg.rho is not None, "cfg.resolved() sets rho"
        return cls(model, bank, optimizer, engine, cfg.max_grad_norm, cfg.rho, AuxVariant.of(cfg))

    def __call__(self, micro_batches: list[dict[str, Tensor]], step: int = 0) -> StepStats:
        bank, variant = self.bank, self.variant
        assert bank.aux is not None
        diagnosing = bool(variant.diagnostics_every) and step % variant.diagnostics_every == 0
        clean = clean_loss(self.model, bank, micro_batches, self.engine) if diagnosing else math.nan
        sketch = bank.sketch = variant.sketch_for(bank, step)
        try:
            loss, tokens = self.forward_backward(micro_batches)
        finally:
            bank.sketch = None
        if sketch is not None:
            self.engine.all_reduce_sum_(sketch.flat)
            sketch.flat.div_(max(tokens, 1))
        if skipped := self.nonfinite(loss):
            return StepStats(loss, tokens, math.nan, skipped=skipped)
        self.check_reached(tokens)
        spectra = reachable_spectra(bank, sketch, self.engine) if sketch is not None else None
        found = diagnostics(bank, spectra, loss, clean) if diagnosing and spectra is not None else None
        norm = self.clip_primary()
        self._update()
        if variant.refresh and step % variant.refresh == 0 and spectra is not None:
            aux_norm = refresh(bank, spectra, self.rho, self.optimizer, self.engine)
        else:
            aux_norm = min(bank.project_aux(self.rho), self.rho)
        return StepStats(loss, tokens, norm, aux_norm, diagnostics=found)

    def _update(self) -> None:
        """The optimizer step; under normalised ascent the auxiliary moves first and AdamW skips it."""
        if not self.variant.normalized:
            self.optimizer.step()
            return
        aux = self.bank.aux
        assert aux is not None
        normalized_ascent(self.bank, self.optimizer.param_groups[1]["lr"])
        grad, aux.flat.grad = aux.flat.grad, None  # AdamW skips a parameter without a gradient
        try:
            self.optimizer.step()
        finally:
            aux.flat.grad = grad  # the bucket's view, as bound


class SAMStep(_RadiusStep):
    """LoRA-SAM: gradient at theta, climb to theta + rho g/||g||, gradient there, restore, step."""

    passes = 2

    def __call__(self, micro_batches: list[dict[str, Tensor]], step: int = 0) -> StepStats:
        flat = self.bank.primary.flat
        loss, tokens = self.forward_backward(micro_batches)
        if skipped := self.nonfinite(loss):
            return StepStats(loss, tokens, math.nan, skipped=skipped)
        self.check_reached(tokens)
        theta = flat.detach().clone()
        with torch.no_grad():
            flat.add_(flat.grad * (self.rho / (float(flat.grad.norm()) + 1e-12)))
        perturbed_loss, _ = self.forward_backward(micro_batches)
        with torch.no_grad():
            flat.copy_(theta)  # exactly theta: subtracting the step back would round
        if skipped := self.nonfinite(perturbed_loss):
            return StepStats(loss, tokens, math.nan, skipped=f"{skipped} at the perturbed point")
        norm = self.clip_primary()
        self.optimizer.step()
        return StepStats(loss, tokens, norm)


METHOD_STEPS: dict[str, type[LoRAStep]] = {}
"""Every training method by its `--method` name."""


def register_method(name: str, step: type[LoRAStep]) -> None:
    """Make `step` the method `name` (`--method name`, checkpoints, metrics)."""
    METHOD_STEPS[name] = step


for _name, _step in (("lora", LoRAStep), ("bilora", BiLoRAStep), ("lora-sam", SAMStep)):
    register_method(_name, _step)
