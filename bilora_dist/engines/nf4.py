"""A 4-bit base FSDP2 can shard: each frozen linear layer's NF4 bytes as a plain parameter of the base dtype.

transformers' 4-bit layers keep their quantisation state on the weight (a bitsandbytes `Params4bit`), which
FSDP2 loses when it turns the weight into a DTensor. Here the packed bytes are an ordinary frozen parameter,
stored in the base dtype (bitsandbytes' `quant_storage`, equal to FSDP2's parameter dtype, so its all-gather
copies the bytes unchanged), and the small quantisation state (a byte per 64 weights) lives on the module,
replicated. Each rank quantises a layer's full weight exactly as `from_pretrained` does and keeps its shard.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bilora_dist.model.loading import NF4_BLOCK, check_4bit_layer, quantized_linears


class PackedLinear4bit(nn.Linear):
    """y = x W^T + b with W stored as NF4 (double quantisation) packed into `weight`, a frozen
    ((in * out + 1) // (2 * itemsize), 1) tensor of the storage dtype; `quantize_` sets it up."""

    def __init__(self, linear: nn.Linear, storage: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        rows = (self.in_features * self.out_features + 1) // (2 * storage.itemsize)
        self.weight = nn.Parameter(torch.empty(rows, 1, dtype=storage, device=linear.weight.device),
                                   requires_grad=False)
        self.bias = linear.bias
        self.quant_state = None

    def quantize_(self, weight: Tensor) -> Tensor:
        """Quantises the full weight `weight` (out, in); keeps its quantisation state and returns the packed
        bytes, shaped like `self.weight` (the caller copies its shard of them in)."""
        from bitsandbytes.functional import quantize_4bit

        packed, self.quant_state = quantize_4bit(weight, blocksize=NF4_BLOCK, compress_statistics=True,
                                                 quant_type="nf4", quant_storage=self.weight.dtype)
        return packed

    def forward(self, x: Tensor) -> Tensor:
        import bitsandbytes as bnb

        dtype = self.quant_state.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return bnb.matmul_4bit(x.to(dtype), self.weight, bias=bias, quant_state=self.quant_state).to(x.dtype)


def pack_linear_layers(model: nn.Module, storage: torch.dtype, device: torch.device) -> None:
    """Swaps each layer `--quantize 4bit` quantises on the other engines (modeling.quantized_linears) for a
    PackedLinear4bit on the same device (meta, before sharding); UserError for a layer bitsandbytes cannot
    compute on `device`."""
    for name, linear in quantized_linears(model):
        check_4bit_layer(name, linear.in_features, NF4_BLOCK, device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, PackedLinear4bit(linear, storage))
