"""Faster kernels for the frozen base: Liger-Kernel's fused RMSNorm, RoPE and SwiGLU (--kernels) and regional
torch.compile of the decoder blocks (--compile).

The output head's loss stays ours (loss.py: chunked, token-summed, ignore-index -100), so micro-batches and
ranks combine exactly whichever kernels run; Liger's fused linear cross-entropy is not used.

No patch may replace the forward of a computation that carries adapters. Liger's instance patch rebinds `forward`
on modules of the model: its RMSNorm and RoPE touch no adapted layer; its dense SwiGLU / GEGLU MLPs
(LigerSwiGLUMLP and kin) still call `gate_proj(x)`, `up_proj(x)`, `down_proj(...)` as modules, so the adapters'
forward hooks run; but on a transformers-5 MoE model its `swiglu` also binds LigerExperts.forward onto every
experts module, a fused MoE function that reads the 3-D expert weights directly, so our ExpertsInterface
implementation (adapters/experts.py) never runs and adapted experts would get no gradient. `swiglu` is therefore
left out wherever an expert tensor is adapted (`liger_patches`); the first step's gradient check (methods.py)
catches any other forward that bypasses an adapter.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bilora_dist.adapters.bank import LayerShape
from bilora_dist.errors import UserError
from bilora_dist.model.loading import decoder_blocks

KERNELS = ("auto", "liger", "none")
LIGER_PATCHES = ("rms_norm", "rope", "swiglu")  # the Liger flags a run may set (its losses: never)
_PATCH_NAMES = {"rms_norm": "RMSNorm", "rope": "RoPE", "swiglu": "SwiGLU"}


@dataclass(frozen=True)
class KernelChoice:
    """The kernels a run uses and why (the start-up line); `patches`: the Liger flags it sets (LIGER_PATCHES)."""

    name: str
    why: str
    patches: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"kernels {self.name}: {self.why}"


def liger_model_types() -> set[str] | None:
    """The model types Liger-Kernel patches (None: liger-kernel is not installed)."""
    if importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None:
        return None
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def liger_patches(shapes: Sequence[LayerShape]) -> tuple[tuple[str, ...], str | None]:
    """The Liger patches that leave every adapted computation of layers `shapes` ours, and why any is left out
    (None: all taken). Its SwiGLU is left out where a fused expert projection is adapted: on MoE models it
    rebinds the experts modules' forward to its fused MoE function, which never runs our expert adapters. Dense
    adapted MLP projections keep it: Liger's SwiGLU MLPs call them as modules, so their hooks run."""
    experts = [s for s in shapes if s.experts]
    if not experts:
        return LIGER_PATCHES, None
    return (tuple(p for p in LIGER_PATCHES if p != "swiglu"),
            f"SwiGLU left out (its fused MoE would replace the experts' forward, bypassing the adapters of "
            f"{len(experts)} expert tensors)")


def choose_kernels(flag: str, device: torch.device, model_type: str, supported: set[str] | None,
                   shapes: Sequence[LayerShape] = ()) -> KernelChoice:
    """--kernels `flag` for a `model_type` model on `device` with adapted layers `shapes`, `supported` the types
    Liger patches (None: not installed). auto takes Liger on CUDA where it is installed and patches the
    architecture, else none; liger refuses, in one line, where it cannot run. Either takes only the patches that
    leave the adapters' computations ours (liger_patches), and says what it left out."""
    if flag == "none":
        return KernelChoice("none", "as asked")
    problem = ("it runs on CUDA only" if device.type != "cuda" else
               "liger-kernel is not installed (pip install 'bilora_dist[gpu]')" if supported is None else
               f"Liger-Kernel has no kernels for model type {model_type!r}" if model_type not in supported else None)
    if problem is None:
        patches, left_out = liger_patches(shapes)
        names = [_PATCH_NAMES[p] for p in patches]
        taken = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
        return KernelChoice("liger", f"Liger-Kernel's {taken}" + (f"; {left_out}" if left_out else "")
                            + "; the loss stays ours", patches)
    if flag == "liger":
        raise UserError(f"--kernels liger: {problem}; use --kernels auto or none")
    return KernelChoice("none", f"auto: Liger not used, {problem}")


def apply_kernels(model: nn.Module, choice: KernelChoice) -> None:
    """Patch `model` with the Liger kernels `choice` takes (its norms, rotary embedding and, unless left out,
    gated MLPs); every flag is passed, so a patch Liger turns on by default cannot slip in."""
    if choice.name != "liger":
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, **{p: p in choice.patches for p in LIGER_PATCHES},
                                    cross_entropy=False, fused_linear_cross_entropy=False)


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
