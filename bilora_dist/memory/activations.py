"""The activation memory of one micro-batch, traced on the meta device (no storage is ever allocated).

One forward pass of the decoder (embeddings, blocks, final norm; not the output head, which the loss
accounts for) runs on meta tensors with the adapters attached, and every tensor autograd saves for the
backward pass is counted once per storage: q, k and v save views of one input, which is counted once.
Parameters and buffers are resident anyway and are not counted.

Attention is traced as a fused kernel (SDPA's flash / memory-efficient path, flash-attn), which keeps
q, k, v, the output and the log-sum-exp, never the seq x seq probabilities: on meta, SDPA would pick
its math fallback and save those. `eager` attention is traced as it runs. The 4-D padding mask
(batch x seq x seq booleans) is a block input, as in a padded batch.

Gradient checkpointing (HF's, non-reentrant) of a set of blocks keeps those blocks' inputs instead of what
they save; the other blocks and whatever runs outside the blocks save as without it. Each adapted linear
layer's update factors (Bi-LoRA's [A1; A2] and [s1 B1, s2 B2], LoRA's s1 B1: new tensors, as many bytes as the
adapters) are made once per forward pass, before the first block, and held until the next pass, serving the
recomputation too: they count as saved outside the blocks, checkpointed or not. During backward one
recomputed block at a time holds its saved tensors again on top: the largest such block's is the recompute
peak.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from bilora_dist.adapters import inject
from bilora_dist.adapters.bank import AdapterBank, Branch, LayerShape
from bilora_dist.adapters.layer import LowRankUpdate
from bilora_dist.model.loading import decoder_blocks

META = torch.device("meta")


OUTSIDE = -1  # "saved outside every decoder block", in ActivationTrace.storages


@dataclass(frozen=True)
class ActivationTrace:
    """Saved-for-backward bytes of one micro-batch, by the decoder blocks that saved them or take them in."""

    storages: tuple[tuple[int, frozenset[int], frozenset[int]], ...]  # (bytes, blocks saving it, blocks it enters)
    blocks: int

    def activations(self, recomputed: Collection[int]) -> int:
        """Bytes alive when backward starts with the blocks `recomputed` (indices) checkpointed: what anything
        else saves, and the recomputed blocks' inputs."""
        recomputed = frozenset(recomputed)
        return sum(n for n, saving, entering in self.storages if saving - recomputed or entering & recomputed)

    def recompute(self, recomputed: Collection[int]) -> int:
        """The largest of the `recomputed` blocks' own saved bytes, rebuilt during its backward."""
        own = [0] * self.blocks
        for n, saving, entering in self.storages:
            if not entering and OUTSIDE not in saving:
                for block in saving:
                    own[block] += n
        return max((own[i] for i in recomputed), default=0)


class _MetaTrace(TorchFunctionMode):
    """The trace's torch functions. A real (CPU) buffer meeting meta activations is moved to meta for the
    call (DeepSeek-V3's router adds its `e_score_correction_bias` buffer to the meta scores; a mix would
    fail), once per buffer, its copy resident like the buffer. With `fused`, F.scaled_dot_product_attention
    is routed to the fused kernel, whose meta function saves what the real fused kernels save (meta SDPA
    would otherwise take the math path); where v's head dimension is not q's (DeepSeek's MLA: q and k 192,
    v 128), to the memory-efficient kernel, which SDPA picks for such shapes on a GPU (flash needs equal head
    dimensions, and the CPU flash kernel's meta function would return an output of q's head dimension): it
    saves q, k, v, the output and the log-sum-exp as well."""

    def __init__(self, fused: bool, resident: set[int]):
        super().__init__()
        self.fused, self.resident, self.moved = fused, resident, {}

    def _to_meta(self, t: Any) -> Any:
        if not isinstance(t, Tensor) or t.is_meta or not t.dim():  # a CPU scalar mixes with meta tensors
            return t
        if _key(t) not in self.moved:
            self.moved[_key(t)] = copy = t.to(META)
            self.resident.add(_key(copy))
        return self.moved[_key(t)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _mixes_devices(args, kwargs):
            args, kwargs = tree_map(self._to_meta, (args, kwargs))
        if not self.fused or func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask, causal = kwargs.get("attn_mask"), kwargs.get("is_causal", False)
        if v.shape[-1] != q.shape[-1]:
            bias = None if mask is None else mask.expand(*q.shape[:-1], k.shape[-2])
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, bias, True, kwargs.get("dropout_p", 0.0), causal, scale=kwargs.get("scale"))[0]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, kwargs.get("dropout_p", 0.0), causal, attn_mask=mask, scale=kwargs.get("scale"))[0]


def _mixes_devices(args: tuple, kwargs: dict) -> bool:
    """Whether a call's tensors (arguments, and the items of list or tuple arguments) mix meta tensors with real
    tensors of one or more dimensions. Runs on every torch call of the trace, so without pytree."""
    meta = real = False
    for a in (*args, *kwargs.values()):
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, Tensor):
                if t.is_meta:
                    meta = True
                elif t.dim():
                    real = True
    return meta and real


def _key(t: Tensor) -> int:
    return t.untyped_storage()._cdata  # the StorageImpl's address: shared by views, unique while alive


def meta_bank(shapes: list[LayerShape], rank: int, aux_rank: int | None) -> AdapterBank:
    """A trainable adapter bank (primary `rank`, auxiliary `aux_rank` if any) on the meta device."""
    def branch(r: int) -> Branch:
        flat = torch.empty(sum(s.numel(r) for s in shapes), device=META)
        return Branch(shapes, [r] * len(shapes), [1.0] * len(shapes), flat)

    return AdapterBank(shapes, branch(rank), branch(aux_rank) if aux_rank else None)


def trace_activations(model: nn.Module, bank: AdapterBank, batch: int, seq: int,
                      attention: str = "sdpa") -> ActivationTrace:
    """Trace one forward pass of `model` (built on meta, frozen) with `bank` (on meta) attached."""
    resident = {_key(t) for t in (*model.parameters(), *model.buffers(), *bank.parameters())}
    blocks = decoder_blocks(model)
    seen: dict[int, tuple[int, set[int], set[int], Tensor]] = {}  # storage -> (bytes, saving, entering, a tensor)
    current = [OUTSIDE]

    def record(t: Tensor) -> tuple[int, set[int], set[int], Tensor]:
        return seen.setdefault(_key(t), (t.untyped_storage().nbytes(), set(), set(), t))  # t keeps the key unique

    def enter(index: int):
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            current[0] = index
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, Tensor) and _key(t) not in resident:
                    record(t)[2].add(index)
        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        current[0] = OUTSIDE

    def pack(t: Tensor) -> Tensor:
        if _key(t) not in resident:
            record(t)[1].add(current[0])
        return t

    def hold_factors(module: nn.Module, args: Any) -> None:  # runs after inject's pre-hook has refreshed them
        for update in updates:
            for t in update.factors:
                if _key(t) not in resident:
                    record(t)[1].add(OUTSIDE)

    handles = inject(model, bank)
    updates = [h for m in model.modules() for h in m._forward_hooks.values() if isinstance(h, LowRankUpdate)]
    handles.append(model.base_model.register_forward_pre_hook(hold_factors))
    for i, block in enumerate(blocks):
        handles += [block.register_forward_pre_hook(enter(i), with_kwargs=True), block.register_forward_hook(leave)]
    ids = torch.zeros(batch, seq, dtype=torch.long, device=META)
    mask = torch.ones(batch, 1, seq, seq, dtype=torch.bool, device=META)  # 4-D: HF reads no values of it
    positions = torch.arange(seq, device=META).expand(batch, seq)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _MetaTrace(attention != "eager", resident):
            model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return ActivationTrace(tuple((n, frozenset(saving), frozenset(entering)) for n, saving, entering, _ in
                                 seen.values() if saving or entering), len(blocks))
