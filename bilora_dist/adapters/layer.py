"""The low-rank update attached to a frozen linear layer as a forward hook."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bilora_dist.adapters.bank import AdapterBank
from bilora_dist.adapters.product import low_rank_product


class LowRankUpdate:
    """Forward hook making `linear(x)` return `W0 x + B A x`, (A, B) layer `index`'s update factors (scales in B).

    A hook rather than a wrapper module: the model keeps its structure and parameter names (so
    state dicts, ZeRO-3 / FSDP2 sharding and merged export see the plain HF model), and the adapter
    parameters stay outside the model's parameter tree, where no engine partitions them.

    While the bank holds a GradientSketch (Bi-LoRA's diagnostics and refresh steps), the layer's input and
    output gradient go to it.

    The factors are put on the hook once per forward pass (`refresh`, from inject's pre-hook) and kept until
    the next one, which also serves a checkpointed block's recomputation in backward. The hook reads tensors
    only, never its index: a compiled decoder block then holds no per-layer constant, and identical blocks
    share one graph.
    """

    def __init__(self, bank: AdapterBank, index: int):
        self.bank = bank
        self.index = index
        self.factors: tuple[Tensor, Tensor] | None = None

    def refresh(self) -> None:
        """Take this pass's factors from the bank (the primary's, with the auxiliary's while it is active)."""
        self.factors = self.bank.update_factors(self.index)

    def __call__(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        out = output + low_rank_product(args[0], *self.factors).to(output.dtype)
        sketch = self.bank.sketch
        if sketch is not None and out.requires_grad and torch._C._current_graph_task_id() == -1:
            # the weight gradient's sketch takes x and dL/d(out) of this forward (not a checkpoint's recompute)
            x, index = args[0], self.index
            out.register_hook(lambda grad: sketch.add(index, x, grad))
        return out
