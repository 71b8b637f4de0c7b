"""FSDP2: the frozen base built on the meta device, `fully_shard` per decoder block (and per untied
embedding / head), then each rank materialises and loads only its own shards, tensor by tensor. A 4-bit
base shards each linear layer's NF4 bytes (`engines/nf4.py`).

The adapters are not parameters of the model, so FSDP never shards or reduces them; the training
loop's single all-reduce of the adapter bucket is the only adapter communication.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from bilora_dist.engines.distributed import DataParallelEngine
from bilora_dist.engines.nf4 import PackedLinear4bit, pack_linear_layers
from bilora_dist.errors import UserError
from bilora_dist.model.loading import CheckpointSource, LoadOptions, build_on_meta, checkpoint_sources, safetensors_index, shard_units


class FSDPEngine(DataParallelEngine):
    name = "fsdp2"

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        # the frozen base is stored in the compute dtype already; the policy states it and keeps any
        # reduction in fp32 (the adapters' own gradient sync is ours, in fp32, outside FSDP)
        self.mp_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        self._root: nn.Module | None = None

    def build(self, path: str, options: LoadOptions) -> nn.Module:
        model = build_on_meta(path, options)
        if options.quantize == "4bit":
            pack_linear_layers(model, options.dtype, self.device)
        # to_empty gives every buffer new, uninitialised storage: keep the values the model computed
        buffers = dict(model.named_buffers(remove_duplicate=False))
        index = safetensors_index(Path(path), f"--model {path}: --engine fsdp needs a directory with .safetensors weights")
        handles = {file: safe_open(str(file), framework="pt") for file in set(index.values())}
        sources = checkpoint_sources(model, index, handles)  # before fully_shard renames the model's class
        for unit in shard_units(model):
            fully_shard(unit, mesh=self.mesh, mp_policy=self.mp_policy)
        fully_shard(model, mesh=self.mesh, mp_policy=self.mp_policy)
        model.to_empty(device=self.device)
        self._load_local_shards(model, path, sources, buffers)
        self._root = model
        return model

    def _load_local_shards(self, model: nn.Module, path: str, sources: dict[str, CheckpointSource],
                           buffers: dict[str, torch.Tensor]) -> None:
        """Read each checkpoint tensor (one at a time, memory-mapped; fused expert tensors as transformers fuses
        them) and keep this rank's shard of it (of its NF4 bytes for a PackedLinear4bit, quantised on this
        device); a buffer the checkpoint does not hold (non-persistent ones: rotary frequencies, embedding
        scales, ...) gets its value from `buffers`, as the model computed it."""
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        if head is not None and head.weight is embed.weight:
            # tied: named_parameters lists the shared weight once, by the embedding's name; a checkpoint may hold it
            # under the head's name only (from_pretrained ties it from either)
            names = {module: name for name, module in model.named_modules()}
            embed_key, head_key = names[embed] + ".weight", names[head] + ".weight"
            if embed_key not in sources and head_key in sources:
                sources = {**sources, embed_key: sources[head_key]}
        packed = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, PackedLinear4bit)}
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name not in sources:
                    raise UserError(f"--model {path}: checkpoint has no tensor '{name}'")
                full = sources[name].read()
                if name in packed:
                    full = packed[name].quantize_(full.to(self.device, self.mp_policy.param_dtype))
                full = full.to(param.dtype)
                if isinstance(param, DTensor):
                    local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                    param.to_local().copy_(local.to_local())
                else:
                    param.copy_(full)
            for name, buf in model.named_buffers(remove_duplicate=False):
                buf.copy_(sources[name].read() if name in sources else buffers[name])

    def release(self) -> None:
        if self._root is not None:
            self._root.reshard()  # the root keeps its parameters gathered after a no-grad forward

    def held_base_numel(self, model: nn.Module) -> tuple[int, int]:
        params = list(model.parameters())
        held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
        return held, sum(p.numel() for p in params)
