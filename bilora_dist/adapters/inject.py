"""Choosing the adapted layers (linear layers and fused expert projections) and attaching one adapter bank."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from bilora_dist.adapters.bank import AdapterBank, Branch, LayerShape
from bilora_dist.adapters.experts import attach_experts, expert_projections, expert_shape, is_experts_module
from bilora_dist.adapters.layer import LowRankUpdate
from bilora_dist.errors import UserError

_REGEX_CHARS = set(".*+?[](){}|^$\\")


def select_targets(model: nn.Module, spec: str) -> list[str]:
    """Paths of the layers to adapt: linear layers by module path, fused expert projections of MoE blocks
    by parameter path (`...mlp.experts.gate_up_proj`).

    `all-linear`: every nn.Linear except the output head and the gates of MoE blocks (a linear layer beside
    an experts module, e.g. Qwen2-MoE's `shared_expert_gate`; routers are not linear layers), and every fused
    expert projection; `a,b,c`: layers whose last name component is one of these (PEFT's rule, e.g.
    `gate_up_proj,down_proj`); anything with regex characters: a regex matched against the full path.
    GPT-2-style Conv1D layers that the selection reaches are refused (their weight is stored transposed), and
    so is `all-linear` on a model with a 3-D weight outside the experts modules it knows.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    gates = _moe_gates(model) if spec.strip() == "all-linear" else set()
    candidates = []
    for name, module in model.named_modules():  # in model order, each experts module's projections in place
        if isinstance(module, (nn.Linear, Conv1D)) and module is not output and name not in gates:
            candidates.append(name)
        elif is_experts_module(module):
            candidates += expert_projections(name, module)
    if spec.strip() == "all-linear":
        _check_no_unknown_3d(model, set(candidates))
    names = _matching(candidates, spec.strip())
    modules = dict(model.named_modules())
    conv = next((n for n in names if isinstance(modules.get(n), Conv1D)), None)
    if conv is not None:
        raise UserError(f"--target-modules: {conv} is a GPT-2-style transformers Conv1D layer (weight stored "
                        "[in, out]), which bilora_dist does not adapt; use a model whose projections are nn.Linear")
    if not names:
        raise UserError(f"--target-modules '{spec.strip()}' matches no linear layer of the model")
    return names


def _moe_gates(model: nn.Module) -> set[str]:
    """Module paths of the linear layers that sit directly in a MoE block, beside its experts module."""
    gates = set()
    for name, block in model.named_modules():
        children = dict(block.named_children())
        if any(is_experts_module(c) for c in children.values()):
            gates |= {f"{name}.{c}" if name else c for c, m in children.items() if isinstance(m, nn.Linear)}
    return gates


def _check_no_unknown_3d(model: nn.Module, experts: set[str]) -> None:
    """UserError naming a weight of 3 or more dimensions that no adapter would reach (an experts layout
    outside transformers' ExpertsInterface)."""
    for name, param in model.named_parameters():
        dims = len(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the full shape in ds_shape
        if dims >= 3 and name not in experts:
            raise UserError(f"--target-modules all-linear: {name} is a {dims}-D weight outside any experts module "
                            "bilora_dist adapts (transformers' ExpertsInterface), so it would get no adapter; "
                            "name the layers to adapt with --target-modules")


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
    """The shape of every selected layer (a fused expert projection's with its number of experts)."""
    modules = dict(model.named_modules())
    return [LayerShape(n, modules[n].in_features, modules[n].out_features) if n in modules
            else expert_shape(model, n) for n in names]


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

    A pre-hook on the base model (the decoder every forward of the model runs, the memory plan's trace included)
    splits the bank into per-layer factors once per pass and hands each linear layer its update factors; a
    forward hook drops the split afterwards. One on the output head makes its input contiguous: HF slices the
    hidden states for `logits_to_keep`, and a strided 3-D input sends the vocabulary-sized projection through a
    batched matmul over an expanded weight, several times slower than one matrix product."""
    updates = [LowRankUpdate(bank, i) for i, shape in enumerate(bank.shapes) if not shape.experts]

    def begin_pass(module: nn.Module, args: tuple) -> None:
        bank.begin_pass()
        for update in updates:
            update.refresh()

    decoder = model.base_model
    handles = [decoder.register_forward_pre_hook(begin_pass),
               decoder.register_forward_hook(lambda module, args, output: bank.end_pass())]
    head = model.get_output_embeddings()
    if head is not None:
        handles.append(head.register_forward_pre_hook(lambda module, args: tuple(a.contiguous() for a in args)))
    return handles + attach_experts(model, bank) + [
        model.get_submodule(bank.shapes[update.index].name).register_forward_hook(update) for update in updates]


def peft_target_modules(spec: str, names: list[str]) -> list[str]:
    """PEFT's target_modules matching exactly the adapted linear layers (`names` without the fused expert
    projections, which go to target_parameters): leaf names when the selection was by leaf name (or
    all-linear), full module paths when it was a regex."""
    if _REGEX_CHARS & set(spec.strip()):
        return sorted(names)
    return sorted({n.rsplit(".", 1)[-1] for n in names})
