"""Folding an adapter into its base model: W = W0 + s·B A, streamed into sharded safetensors.

The base is read one tensor at a time (each file opened only for that tensor, so no mapping grows
with the model) and written in shards of at most `shard_bytes`; peak memory is about one shard plus
twice the largest tensor (its copy and its mapped file pages), whatever the model size. Adapted layers
are folded in fp32 and cast back to the base dtype. A model with tied input/output embeddings whose
head is adapted gets an untied head. A base saved pre-quantised by bitsandbytes (4-bit NF4/FP4) has
every 4-bit weight dequantised to the dtype it was quantised from, adapted or not, so the result is
one plain model without a quantization_config. An adapted fused expert projection is read as transformers
loads it (its per-expert checkpoint tensors fused by transformers' conversion), gets W_e + s·B_e A_e for
every expert, and is written as the one fused 3-D tensor, which `from_pretrained` loads as it is.

`nf4_dtype` (export's `--merge-base nf4`, the default for an adapter trained with `--quantize 4bit`): every layer
that `--quantize 4bit` stores in NF4 (every linear layer but the head) is first quantised as training quantised it
(bitsandbytes NF4, 64-value blocks, double quantisation, from the weight cast to `nf4_dtype`) and dequantised, so
the adapter is folded into dequant(NF4(W0)), the weights it was trained against (QLoRA's and PEFT's convention).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from bilora_dist.adapters.bank import Branch
from bilora_dist.errors import UserError
from bilora_dist.files import atomic_directory, read_json
from bilora_dist.model.loading import (NF4_BLOCK, CheckpointSource, build_on_meta, checkpoint_sources, quantized_linears,
                                  safetensors_index)

DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_QUANT_STATE = ".quant_state.bitsandbytes__"  # marks a bitsandbytes 4-bit weight's serialised state


class _ShardWriter:
    """Collects tensors and writes a shard whenever the next tensor would pass `shard_bytes`."""

    def __init__(self, directory: Path, shard_bytes: int):
        self.directory, self.shard_bytes = directory, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []

    def make_room(self, size: int) -> None:
        """Write the pending shard if a tensor of `size` bytes would take it past `shard_bytes`."""
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()

    def _flush(self) -> None:
        save_file(self.pending, str(self.directory / f"shard-{len(self.shards)}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> int:
        """Write the last shard, name the shards as Hugging Face does, write the index; returns bytes total."""
        if self.pending:
            self._flush()
        count = len(self.shards)
        names = ["model.safetensors"] if count == 1 else \
            [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        total = 0
        for i, name in enumerate(names):
            file = self.directory / f"shard-{i}.tmp"
            total += file.stat().st_size
            file.rename(self.directory / name)
        if count > 1:
            weight_map = {key: name for keys, name in zip(self.shards, names) for key in keys}
            (self.directory / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        return total


def _read(file: Path, key: str, writer: _ShardWriter) -> torch.Tensor:
    """One tensor of `file`; the writer first flushes a shard the tensor would overflow, so the pending
    shard, the tensor and its mapped file pages are never all at their largest at once."""
    with safe_open(str(file), framework="pt") as f:
        header = f.get_slice(key)
        writer.make_room(math.prod(header.get_shape()) * DTYPE_BYTES[header.get_dtype()])
        return f.get_tensor(key)


def _quantized_weights(index: dict[str, Path]) -> dict[str, list[str]]:
    """The 4-bit bitsandbytes weights of a pre-quantised base: packed weight key -> its quant-state keys."""
    packed = {k.split(_QUANT_STATE)[0] for k in index if _QUANT_STATE in k}
    return {k: [c for c in index if c.startswith(k + ".")] for k in packed}


def _read_dequantized(index: dict[str, Path], key: str, state_keys: list[str], writer: _ShardWriter) -> torch.Tensor:
    """A 4-bit weight dequantised by bitsandbytes to the dtype it was quantised from."""
    try:
        from bitsandbytes.functional import QuantState, dequantize_4bit
    except ImportError:
        raise UserError(f"--merged: the base holds 4-bit weights ({key}); install bitsandbytes "
                        "(pip install 'bilora_dist[quant]') to dequantise them") from None
    parts = {}
    for name in state_keys:
        with safe_open(str(index[name]), framework="pt") as f:
            parts[name[len(key) + 1:]] = f.get_tensor(name)
    state = QuantState.from_dict(parts, device=torch.device("cpu"))
    writer.make_room(math.prod(state.shape) * state.dtype.itemsize)
    with safe_open(str(index[key]), framework="pt") as f:
        return dequantize_4bit(f.get_tensor(key), state)


def nf4_round_trip(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dequant(NF4(weight)): `weight` cast to `dtype` and quantised as `--quantize 4bit` quantises it (bitsandbytes
    NF4, 64-value blocks, double quantisation), then dequantised by bitsandbytes (to `dtype`)."""
    try:
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    except ImportError:
        raise UserError("--merge-base nf4 needs bitsandbytes to quantise the base as training did; install it "
                        "(pip install 'bilora_dist[quant]') or pass --merge-base original") from None
    packed, state = quantize_4bit(weight.to(dtype), blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4",
                                  quant_storage=dtype)
    return dequantize_4bit(packed, state)


def _fused_sources(meta: torch.nn.Module, index: dict[str, Path], experts: dict[str, int]) -> dict[str, CheckpointSource]:
    """How each adapted fused expert projection is read, through transformers' key conversion."""
    if not experts:
        return {}
    handles = {file: safe_open(str(file), framework="pt") for file in set(index.values())}
    return {name: source for name, source in checkpoint_sources(meta, index, handles).items() if name in experts}


def _merged_experts(meta: torch.nn.Module, name: str, source: CheckpointSource, branch: Branch, layer: int,
                    writer: _ShardWriter) -> torch.Tensor:
    """The fused projection `name` with s·B_e A_e added to every expert's weight (in its stored layout)."""
    parameter = meta.get_parameter(name)
    writer.make_room(parameter.numel() * parameter.element_size())
    tensor = source.read()
    A, B = branch.factors(layer)
    delta = branch.scales[layer] * (B.float() @ A.float())  # (E, out, in)
    if meta.get_submodule(name.rsplit(".", 1)[0]).is_transposed:
        delta = delta.mT
    return (tensor.float() + delta).to(tensor.dtype)


def _write_other_files(model_dir: Path, tmp: Path, untie: bool, dequantised: bool) -> None:
    """config.json (the head untied where it was adapted, no quantization_config where every 4-bit weight was
    written dequantised) and every non-weight file of `model_dir` (tokenizer, generation config, ...)."""
    config = read_json(model_dir / "config.json")
    if untie and config.get("tie_word_embeddings", False):
        config["tie_word_embeddings"] = False  # the head now differs from the embedding
    if dequantised:
        config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for file in model_dir.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(file, tmp / file.name)


def merge_into_base(model_dir: Path, branch: Branch, out_dir: Path, shard_bytes: int,
                    nf4_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Write the merged model (weights, config, tokenizer and the other non-weight files of `model_dir`)
    to `out_dir`, which appears complete or not at all; with `nf4_dtype`, into the dequantised NF4 weights (see the
    module's note). Returns counts for the report."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    index = safetensors_index(model_dir, f"--merged: {model_dir} holds no .safetensors weights to merge into")
    meta = build_on_meta(str(model_dir))
    names = {module: name for name, module in meta.named_modules()}
    embed_key = names[meta.get_input_embeddings()] + ".weight"
    head = meta.get_output_embeddings()
    head_key = names[head] + ".weight" if head is not None else None
    layers = {shape.name + ".weight": i for i, shape in enumerate(branch.shapes) if not shape.experts}
    experts = {shape.name: i for i, shape in enumerate(branch.shapes) if shape.experts}
    quantized = _quantized_weights(index)
    round_trip = {names[m] + ".weight" for _, m in quantized_linears(meta)} if nf4_dtype is not None else set()
    state_keys = {k for keys in quantized.values() for k in keys}
    sources = {k: f for k, f in index.items() if k not in state_keys}
    # a tied head absent from the files is read from the embedding when it is adapted
    if head_key in layers and head_key not in sources:
        sources[head_key] = index[embed_key]
    fused = _fused_sources(meta, index, experts)
    for key in {k for source in fused.values() for k in source.keys}:  # read through the fused tensor instead
        sources.pop(key, None)
    missing = sorted([k[:-len(".weight")] for k in layers if k not in sources] + [k for k in experts if k not in fused])
    if missing:
        raise UserError(f"--merged: the adapter adapts {missing[0]}, which {model_dir} has no weight for")

    with atomic_directory(out_dir) as tmp:
        writer = _ShardWriter(tmp, shard_bytes)
        order = sorted(sources, key=lambda k: (str(sources[k]), k))
        with torch.no_grad():
            for key in tqdm(order, desc="merge", unit="tensor", dynamic_ncols=True):
                if key in quantized:
                    tensor = _read_dequantized(index, key, quantized[key], writer)
                else:
                    tensor = _read(sources[key], embed_key if key == head_key and key not in index else key, writer)
                stored = tensor.dtype
                if key in round_trip and key not in quantized:  # a pre-quantised weight is dequantised already
                    tensor = nf4_round_trip(tensor, nf4_dtype)
                if key in layers:
                    A, B = branch.factors(layers[key])
                    scale = branch.scales[layers[key]]
                    tensor = tensor.float() + scale * (B.float() @ A.float())
                writer.add(key, tensor.to(stored))
                del tensor
            for name, source in tqdm(fused.items(), desc="merge experts", unit="tensor", dynamic_ncols=True):
                writer.add(name, _merged_experts(meta, name, source, branch, experts[name], writer))
        total = writer.close()
        _write_other_files(model_dir, tmp, untie=head_key in layers, dequantised=bool(quantized))
    return {"tensors": len(order) + len(fused), "merged_layers": len(layers) + len(fused), "shards": len(writer.shards), "bytes": total}
