"""Loading the frozen base model and its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bilora_dist import embedded
from bilora_dist.errors import UserError


def resolve_model(spec: str) -> str:
    """The model directory or hub id to load ('' means the embedded default)."""
    return str(embedded.default_model_dir()) if not spec else spec


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
    """The model's architecture with no storage behind its parameters (for sharded loading and planning)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(path), dtype=dtype)
    model.requires_grad_(False)
    return model


def load_frozen_model(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base causal LM with every parameter frozen."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.requires_grad_(False)
    return model
