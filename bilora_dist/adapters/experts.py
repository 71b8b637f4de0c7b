"""LoRA on the fused expert projections of mixture-of-experts models (transformers 5's 3-D expert parameters).

transformers stores a MoE block's experts as one module holding 3-D parameters (`gate_up_proj` or `up_proj`,
and `down_proj`: [E, out, in], or [E, in, out] where the class declares `is_transposed`) and dispatches its
forward through `ExpertsInterface` by `config._experts_implementation`. We register one implementation there,
`bilora_dist`: the routed tokens sorted by expert (as transformers' `grouped_mm` does), then each projection as
one grouped product over all experts, base and low-rank update together (grouped.py): x W_eᵀ + (x A_eᵀ) B_eᵀ,
so no [E, out, in] delta is ever formed, no Python loop runs under autograd, and an expert no token reached
costs nothing. An experts module without adapters runs transformers' `grouped_mm` unchanged.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from bilora_dist.adapters.bank import AdapterBank, LayerShape
from bilora_dist.adapters.grouped import expert_projection
from bilora_dist.errors import UserError

IMPLEMENTATION = "bilora_dist"
PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")  # the 3-D parameters the experts interface computes with
_UPDATE = "_bilora_dist_update"  # the attribute of an adapted experts module holding its ExpertsUpdate


def is_experts_module(module: nn.Module) -> bool:
    """Whether `module` is a transformers experts class dispatched through ExpertsInterface."""
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "has_bias", "num_experts", "config"))


def expert_projections(path: str, module: nn.Module) -> list[str]:
    """Parameter paths of the fused projections of experts module `module` at `path` (e.g. `...experts.down_proj`)."""
    return [f"{path}.{p}" for p in PROJECTIONS if isinstance(getattr(module, p, None), nn.Parameter)]


def expert_shape(model: nn.Module, path: str) -> LayerShape:
    """The LayerShape of fused projection `path`: per expert, out x in as the layer computes x -> W_e x."""
    module_path, attr = path.rsplit(".", 1)
    module = model.get_submodule(module_path)
    param = getattr(module, attr)
    experts, first, second = getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps the full shape in ds_shape
    n, m = (first, second) if module.is_transposed else (second, first)
    return LayerShape(path, n, m, experts)


class ExpertsUpdate:
    """The bank layers of one experts module, by projection name; stored on the module (a plain attribute, so
    the model's parameters and state dict stay the plain HF ones)."""

    def __init__(self, bank: AdapterBank, layers: dict[str, int]):
        self.bank, self.layers = bank, layers


class _Detach:
    """A removable handle (as torch's hooks return) taking an ExpertsUpdate off its module."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        if hasattr(self.module, _UPDATE):
            delattr(self.module, _UPDATE)


def attach_experts(model: nn.Module, bank: AdapterBank) -> list[_Detach]:
    """Put bank layers of fused expert projections onto their experts modules and switch the model's experts
    implementation to ours; returns a handle per module."""
    by_module: dict[str, dict[str, int]] = {}
    for i, shape in enumerate(bank.shapes):
        if shape.experts:
            module_path, attr = shape.name.rsplit(".", 1)
            by_module.setdefault(module_path, {})[attr] = i
    if not by_module:
        return []
    register_implementation()
    handles = []
    for module_path, layers in by_module.items():
        module = model.get_submodule(module_path)
        if getattr(module, "_is_expert_parallel", False):
            raise UserError(f"{module_path}: expert-parallel experts modules are not supported by bilora_dist")
        object.__setattr__(module, _UPDATE, ExpertsUpdate(bank, layers))
        handles.append(_Detach(module))
    model.set_experts_implementation(IMPLEMENTATION)
    return handles


def register_implementation() -> None:
    """Make `bilora_dist` a valid `experts_implementation` of transformers (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, lora_experts_forward)


def lora_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """transformers' grouped experts forward with each adapted projection's low-rank update added."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    update: ExpertsUpdate | None = getattr(self, _UPDATE, None)
    if update is None:
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    num_tokens, top_k = hidden_states.size(0), top_k_index.size(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden_states[perm // top_k]
    if hidden_states.is_meta:  # the memory plan's trace (activations.py): routing unknown, plan balanced experts
        share, extra = divmod(expert_ids.numel(), self.num_experts)
        bounds = list(itertools.accumulate([share + (e < extra) for e in range(self.num_experts)], initial=0))
        offsets = torch.tensor(bounds[1:], dtype=torch.int32, device=expert_ids.device)
    else:
        counts = torch.bincount(expert_ids, minlength=self.num_experts)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        bounds = [0] + offsets.tolist()  # one host sync; the fallback per-expert products slice by it

    def project(name: str, inputs: Tensor) -> Tensor:
        return _projection(self, update, name, inputs, expert_ids, offsets, bounds)

    h = project("gate_up_proj", x) if self.has_gate else project("up_proj", x)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    out = project("down_proj", h)
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    restored = torch.empty_like(out).index_copy_(0, perm, out)
    return restored.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def _projection(module: nn.Module, update: ExpertsUpdate, name: str, x: Tensor, expert_ids: Tensor,
                offsets: Tensor, bounds: list[int]) -> Tensor:
    """One fused projection on expert-sorted tokens x: the base product (bias included) plus, if adapted,
    s·B_e A_e x for the tokens of each expert e, as grouped products (grouped.py)."""
    layer = update.layers.get(name)
    factors = update.bank.update_factors(layer) if layer is not None else None
    out = expert_projection(x, getattr(module, name), offsets, bounds, module.is_transposed, factors)
    return out + getattr(module, f"{name}_bias")[expert_ids] if module.has_bias else out
