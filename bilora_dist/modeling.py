"""Loading the frozen base model and its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from huggingface_hub import constants, snapshot_download
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bilora_dist import embedded
from bilora_dist.errors import UserError


def resolve_model(spec: str, flag: str = "--model") -> str:
    """The local model directory `spec` names: '' the embedded default, a directory itself, a hub id its
    snapshot in the local Hugging Face cache (nothing is ever downloaded)."""
    if not spec:
        return str(embedded.default_model_dir())
    if Path(spec).is_dir():
        return spec
    try:
        return snapshot_download(spec, local_files_only=True)
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), not a repo id (HFValidationError)
        raise UserError(f"{flag} {spec}: neither a local directory nor a model in the local Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}); nothing is downloaded") from None


def load_config(path: str) -> Any:
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {path}: cannot load a model config ({str(exc).splitlines()[0]})") from None


def load_tokenizer(path: str) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def safetensors_index(path: Path, missing: str) -> dict[str, Path]:
    """Tensor name -> the .safetensors file in directory `path` holding it; UserError(`missing`) if none."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise UserError(missing)
    index = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            index.update({key: file for key in f.keys()})
    return index


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The units a sharding engine gathers one at a time: the decoder blocks (HF's _no_split_modules)
    and, when not tied, the input embedding and the output head."""
    block_types = set(getattr(model, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in block_types]
    if not units:
        raise UserError(f"{type(model).__name__} declares no decoder block type (_no_split_modules); "
                        "it cannot be sharded block by block")
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is not embed.weight:
        units += [embed, head]
    return units


def build_on_meta(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model's architecture with its parameters on the meta device (no storage) and its buffers real,
    computed as the model computes them (rotary frequencies, embedding scales), on the CPU."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(load_config(path), dtype=dtype)
    model.tie_weights()  # accelerate re-creates each parameter on meta, which unties a tied head
    model.requires_grad_(False)
    return model


def load_frozen_model(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base causal LM with every parameter frozen."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.requires_grad_(False)
    return model
