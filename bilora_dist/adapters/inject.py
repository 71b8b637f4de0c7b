"""Choosing target layers and wrapping them with LoRALinear around one adapter bank."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from bilora_dist.adapters.bank import AdapterBank, Branch, LayerShape
from bilora_dist.adapters.layer import LowRankUpdate
from bilora_dist.errors import UserError

_REGEX_CHARS = set(".*+?[](){}|^$\\")


def select_targets(model: nn.Module, spec: str) -> list[str]:
    """Module paths of the linear layers to adapt.

    `all-linear`: every nn.Linear except the output head; `a,b,c`: layers whose last name component
    is one of these (PEFT's rule); anything with regex characters: a regex matched against the full path.
    GPT-2-style Conv1D layers that the selection reaches are refused (their weight is stored transposed).
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    candidates = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not output]
    names = _matching(candidates, spec.strip())
    modules = dict(model.named_modules())
    conv = next((n for n in names if isinstance(modules[n], Conv1D)), None)
    if conv is not None:
        raise UserError(f"--target-modules: {conv} is a GPT-2-style transformers Conv1D layer (weight stored "
                        "[in, out]), which bilora_dist does not adapt; use a model whose projections are nn.Linear")
    if not names:
        raise UserError(f"--target-modules '{spec.strip()}' matches no linear layer of the model")
    return names


def _matching(names: list[str], spec: str) -> list[str]:
    """The module paths of `names` that `spec` selects (all-linear, leaf names or a regex)."""
    if spec == "all-linear":
        return names
    if _REGEX_CHARS & set(spec):
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise UserError(f"--target-modules: invalid regex '{spec}' ({exc})") from None
        return [n for n in names if pattern.fullmatch(n)]
    wanted = {w.strip() for w in spec.split(",") if w.strip()}
    return [n for n in names if n.rsplit(".", 1)[-1] in wanted]


def layer_shapes(model: nn.Module, names: list[str]) -> list[LayerShape]:
    modules = dict(model.named_modules())
    return [LayerShape(n, modules[n].in_features, modules[n].out_features) for n in names]


def check_rank(shapes: list[LayerShape], rank: int, flag: str) -> None:
    for s in shapes:
        if rank > min(s.in_features, s.out_features):
            raise UserError(f"{flag} {rank} exceeds min(in, out) = {min(s.in_features, s.out_features)} "
                            f"of layer {s.name}")


def build_bank(shapes: list[LayerShape], rank: int, alpha: float, aux_rank: int | None, aux_scale: float,
               seed: int) -> AdapterBank:
    """A fresh bank: primary (rank, alpha/rank) and optionally auxiliary (aux_rank, aux_scale), seeded
    so that every data-parallel rank builds bit-identical factors."""
    check_rank(shapes, rank, "--rank")
    generator = torch.Generator().manual_seed(seed)
    n = len(shapes)
    primary = Branch.initialized(shapes, [rank] * n, [alpha / rank] * n, generator)
    aux = None
    if aux_rank is not None:
        check_rank(shapes, aux_rank, "--aux-rank")
        aux = Branch.initialized(shapes, [aux_rank] * n, [aux_scale] * n, generator)
    return AdapterBank(shapes, primary, aux)


def inject(model: nn.Module, bank: AdapterBank) -> list[torch.utils.hooks.RemovableHandle]:
    """Attach layer i's low-rank update from the bank to each target linear; returns the hook handles.

    A pre-hook on the model splits the bank into per-layer factors once per forward pass (a forward hook
    drops them afterwards), and one on the output head makes its input contiguous: HF slices the hidden
    states for `logits_to_keep`, and a strided 3-D input sends the vocabulary-sized projection through a
    batched matmul over an expanded weight, several times slower than one matrix product."""
    handles = [model.register_forward_pre_hook(lambda module, args: bank.begin_pass()),
               model.register_forward_hook(lambda module, args, output: bank.end_pass())]
    head = model.get_output_embeddings()
    if head is not None:
        handles.append(head.register_forward_pre_hook(lambda module, args: tuple(a.contiguous() for a in args)))
    return handles + [model.get_submodule(shape.name).register_forward_hook(LowRankUpdate(bank, i))
                      for i, shape in enumerate(bank.shapes)]


def peft_target_modules(spec: str, names: list[str]) -> list[str]:
    """PEFT's target_modules matching exactly the adapted layers: leaf names when the selection was by
    leaf name (or all-linear), full module paths when it was a regex."""
    if _REGEX_CHARS & set(spec.strip()):
        return sorted(names)
    return sorted({n.rsplit(".", 1)[-1] for n in names})
