"""Faster kernels for the frozen base: Liger-Kernel's fused RMSNorm, RoPE and SwiGLU (--kernels) and regional
torch.compile of the decoder blocks (--compile).

The output head's loss stays ours (loss.py: chunked, token-summed, ignore-index -100), so micro-batches and
ranks combine exactly whichever kernels run; Liger's fused linear cross-entropy is not used.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from bilora_dist.errors import UserError
from bilora_dist.modeling import decoder_blocks

KERNELS = ("auto", "liger", "none")


@dataclass(frozen=True)
class KernelChoice:
    """The kernels a run uses and why (the start-up line)."""

    name: str
    why: str

    def describe(self) -> str:
        return f"kernels {self.name}: {self.why}"


def liger_model_types() -> set[str] | None:
    """The model types Liger-Kernel patches (None: liger-kernel is not installed)."""
    if importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None:
        return None
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def choose_kernels(flag: str, device: torch.device, model_type: str, supported: set[str] | None) -> KernelChoice:
    """--kernels `flag` for a `model_type` model on `device`, `supported` the types Liger patches (None: not
    installed). auto takes Liger on CUDA where it is installed and patches the architecture, else none; liger
    refuses, in one line, where it cannot run."""
    if flag == "none":
        return KernelChoice("none", "as asked")
    problem = ("it runs on CUDA only" if device.type != "cuda" else
               "liger-kernel is not installed (pip install 'bilora_dist[gpu]')" if supported is None else
               f"Liger-Kernel has no kernels for model type {model_type!r}" if model_type not in supported else None)
    if problem is None:
        return KernelChoice("liger", "Liger-Kernel's RMSNorm, RoPE and SwiGLU; the loss stays ours")
    if flag == "liger":
        raise UserError(f"--kernels liger: {problem}; use --kernels auto or none")
    return KernelChoice("none", f"auto: Liger not used, {problem}")


def apply_kernels(model: nn.Module, choice: KernelChoice) -> None:
    """Patch `model`'s norms, rotary embedding and gated MLPs with Liger's kernels where `choice` says so. The
    MLP's projections are still called as modules, so their adapters' hooks run unchanged."""
    if choice.name != "liger":
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def compile_blocks(model: nn.Module) -> int:
    """torch.compile each decoder block in place (regional compilation: the blocks share one graph, so the
    compile time does not grow with depth); returns how many were compiled. Models with fused experts are
    refused: their routing's token counts change every step."""
    if any(p.dim() == 3 for p in model.parameters()):
        raise UserError("--compile: this model has fused expert weights, whose per-step routing recompiles the "
                        "blocks; train it without --compile")
    blocks = decoder_blocks(model)
    for block in blocks:
        block.compile()
    return len(blocks)
