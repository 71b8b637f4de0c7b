"""The low-rank update attached to a frozen linear layer as a forward hook."""

from __future__ import annotations

from torch import Tensor, nn

from bilora_dist.adapters.bank import AdapterBank


class LowRankUpdate:
    """Forward hook making `linear(x)` return `W0 x + bank.delta(index, x)`.

    A hook rather than a wrapper module: the model keeps its structure and parameter names (so
    state dicts, ZeRO-3 / FSDP2 sharding and merged export see the plain HF model), and the adapter
    parameters stay outside the model's parameter tree, where no engine partitions them.
    """

    def __init__(self, bank: AdapterBank, index: int):
        self.bank = bank
        self.index = index

    def __call__(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return output + self.bank.delta(self.index, args[0]).to(output.dtype)
