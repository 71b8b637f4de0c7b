"""Loading the frozen base model and its tokenizer."""

from __future__ import annotations

import copy
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from huggingface_hub import constants, snapshot_download
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bilora_dist.model import embedded
from bilora_dist.model.attention import PACKED, packed_supported
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
    """The model's config; UserError if it cannot be read, is not a causal language model, or a weight file of the
    directory is not a readable safetensors file (corrupt or truncated)."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {path}: cannot load a model config ({str(exc).splitlines()[0]})") from None
    check_causal_lm(config, path)
    if Path(path).is_dir():
        check_weight_files(Path(path))
    return config


def check_causal_lm(config: Any, path: str) -> None:
    """UserError unless `config` describes a causal language model: transformers must have a causal-LM class for it,
    and a model that is a decoder only when its config says so (BERT-like, `is_decoder`) must say so. Such a model is
    built on the meta device to see whether its self-attention is causal (GPT-NeoX keeps `is_decoder` false yet is
    causal; BART's causal LM sets it itself)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    name = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"--model {path}: {name} ({config.model_type}) is not a causal language model "
                        "(transformers has no causal-LM class for it); train a decoder-only model")
    if getattr(config, "is_decoder", True):
        return  # no such switch (Llama, the MoE families, ...), or set
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "add is_decoder=True" warning: the error line says it
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        hf_logging.set_verbosity(verbosity)
    if getattr(model.config, "is_decoder", True):
        return
    bidirectional = [n for n, m in model.named_modules() if False in (getattr(m, "is_causal", None), getattr(
        m, "is_decoder", None)) and not getattr(m, "is_cross_attention", False) and "cross" not in n.lower()]
    if bidirectional:
        raise UserError(f"--model {path}: {name} ({config.model_type}) is configured as a bidirectional encoder "
                        f"(is_decoder false; {bidirectional[0]} attends both ways), not a causal language model; "
                        "set \"is_decoder\": true in its config.json or train a decoder-only model")


def check_weight_files(path: Path) -> None:
    """UserError naming the first .safetensors file of directory `path` whose header cannot be read (a corrupt or
    truncated file: safetensors checks the header and that the data it lists fits the file)."""
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise UserError(f"--model {path}: weight file {file.name} is corrupt or truncated "
                            f"({str(exc).splitlines()[0]}); download or copy it again") from None


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
        try:
            with safe_open(str(file), framework="pt") as f:
                index.update({key: file for key in f.keys()})
        except (SafetensorError, OSError) as exc:  # a corrupt or truncated file
            raise UserError(f"{file}: not a readable safetensors file, corrupt or truncated "
                            f"({str(exc).splitlines()[0]})") from None
    return index


@dataclass(frozen=True)
class CheckpointSource:
    """How one model tensor is read from a checkpoint: the checkpoint keys it is made of, and `read()`, its
    full value (once: a converter's collected tensors are consumed)."""

    keys: tuple[str, ...]
    read: Callable[[], torch.Tensor]


def checkpoint_sources(model: nn.Module, index: dict[str, Path], handles: dict[Path, Any]) -> dict[str, CheckpointSource]:
    """Model tensor name -> how to read it from the checkpoint, through transformers' own key conversion (its
    renamings, and the converters that fuse per-expert tensors such as `mlp.experts.0.gate_proj.weight` into a
    3-D `mlp.experts.gate_up_proj`), as `from_pretrained` loads it. `handles` are the open safetensors files of
    `index`. Call before sharding wraps the model's class."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    names = dict.fromkeys(n for n, _ in model.named_parameters()) | dict.fromkeys(
        n for n, _ in model.named_buffers(remove_duplicate=False))
    present = {n: True for n in names}  # rename_source_key looks names up and tests the value against None
    sources: dict[str, CheckpointSource] = {}
    pending: dict[str, tuple[Any, list[str]]] = {}
    for key in sorted(index, key=dot_natural_key):  # experts in numeric order, as transformers collects them
        read = functools.partial(handles[index[key]].get_tensor, key)
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, present)
        if name not in names and key in names:
            name, pattern = key, None
        if pattern is None:
            sources[name] = CheckpointSource((key,), read)
        else:
            converter, keys = pending.setdefault(name, (copy.deepcopy(by_pattern[pattern]), []))
            converter.add_tensor(name, key, pattern, read)
            keys.append(key)
    for name, (converter, keys) in pending.items():
        sources[name] = CheckpointSource(tuple(keys), functools.partial(
            lambda c, n: c.convert(n, model=model, config=model.config)[n], converter, name))
    return sources


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The units a sharding engine gathers one at a time: the decoder blocks (HF's _no_split_modules)
    and, when not tied, the input embedding and the output head."""
    block_types = set(getattr(model, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if any(c.__name__ in block_types for c in type(m).__mro__)]  # FSDP2 subclasses
    if not units:
        raise UserError(f"{type(model).__name__} declares no decoder block type (_no_split_modules); "
                        "it cannot be sharded block by block")
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is not embed.weight:
        units += [embed, head]
    return units


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks, in model order (the shard units but the embedding and the head)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    return [u for u in shard_units(model) if u is not embed and u is not head]


NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256  # bitsandbytes' 4-bit block and its double-quantisation block


def quantized_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The layers `--quantize 4bit` stores in NF4, by name: every nn.Linear but the output head."""
    head = model.get_output_embeddings()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


@dataclass(frozen=True)
class LoadOptions:
    """How an engine loads the frozen base: its dtype, `quantize` ("none" or "4bit": bitsandbytes NF4 with
    double quantisation for every linear layer but the head) and the attention kernel transformers uses
    (None: its default, sdpa where the model supports it)."""

    dtype: torch.dtype = torch.float32
    quantize: str = "none"
    attn_implementation: str | None = None

    @classmethod
    def of(cls, cfg: Any, model_path: str) -> "LoadOptions":
        """The options of a resolved TrainConfig for the model at `model_path`; UserError if it asks for a kernel
        or a quantisation this machine or model does not have."""
        if cfg.quantize == "4bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("--quantize 4bit needs bitsandbytes, which is not installed "
                            "(pip install 'bilora_dist[quant]')")
        return cls(cfg.dtype, cfg.quantize, resolve_attn_implementation(cfg.attn_implementation, cfg.dtype,
                                                                        cfg.packing, load_config(model_path)))

    def quantization_config(self) -> Any:
        """transformers' BitsAndBytesConfig for `quantize` (None without quantisation). The packed 4-bit
        weights are stored in the base dtype, so a sharding engine can treat them as ordinary parameters."""
        if self.quantize == "none":
            return None
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=self.dtype, bnb_4bit_quant_storage=self.dtype)


def resolve_attn_implementation(name: str, dtype: torch.dtype, packing: bool = False,
                                config: Any = None) -> str | None:
    """The attention kernel for --attn-implementation `name` (None: transformers' default, sdpa);
    `auto` is flash_attention_2 where flash_attn is installed, CUDA available and the base bf16, else with
    `packing` our `packed` attention (attention.py) where the model's attention is plain causal.
    UserError if a named kernel cannot run here."""
    flash_installed = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        if flash_installed and torch.cuda.is_available() and dtype == torch.bfloat16:
            return "flash_attention_2"
        return PACKED if packing and config is not None and packed_supported(config) else None
    flag = f"--attn-implementation {name}"
    if name == PACKED:
        if not packing:
            raise UserError(f"{flag} reads the documents of packed rows from their position ids: add --packing")
        if config is not None and not packed_supported(config):
            raise UserError(f"{flag}: {config.model_type} has sliding-window, soft-capped or sink attention, which "
                            "it does not compute; use sdpa or flash_attention_2")
    if name == "flash_attention_2":
        if not flash_installed:
            raise UserError(f"{flag}: the flash_attn package is not installed (pip install 'bilora_dist[gpu]')")
        if not torch.cuda.is_available():
            raise UserError(f"{flag}: flash_attn runs on CUDA devices only, and none is available")
        if dtype != torch.bfloat16:
            raise UserError(f"{flag}: flash_attn needs a bfloat16 base; add --bf16")
    if name == "flex_attention":
        from transformers.utils import is_torch_flex_attn_available

        if not is_torch_flex_attn_available():
            raise UserError(f"{flag}: torch {torch.__version__} has no flex attention (needs torch >= 2.5)")
    return name


def build_on_meta(path: str, options: LoadOptions = LoadOptions()) -> nn.Module:
    """The model's architecture with its parameters on the meta device (no storage) and its buffers real,
    computed as the model computes them (rotary frequencies, embedding scales), on the CPU."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(load_config(path), dtype=options.dtype,
                                                 attn_implementation=options.attn_implementation)
    model.tie_weights()  # accelerate re-creates each parameter on meta, which unties a tied head
    model.requires_grad_(False)
    return model


def load_frozen_model(path: str, options: LoadOptions = LoadOptions(),
                      device: torch.device | None = None) -> nn.Module:
    """The base causal LM with every parameter frozen, loaded onto `device` (None: where transformers
    puts it, the CPU or ZeRO-3's partitions). A 4-bit base is quantised as it is loaded."""
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=options.dtype, attn_implementation=options.attn_implementation,
        quantization_config=options.quantization_config(),
        device_map=None if device is None else {"": device})
    if options.quantize != "none":
        _check_4bit(model)
    model.requires_grad_(False)
    return model


def check_4bit_layer(name: str, in_features: int, blocksize: int, device: torch.device) -> None:
    """UserError for a 4-bit layer bitsandbytes (0.50) computes wrongly on `device`: on the CPU its kernel
    dequantises a row whose length is not a multiple of the block wrongly (blocks per row)."""
    if device.type == "cpu" and in_features % blocksize:
        raise UserError(f"--quantize 4bit on the CPU: layer {name} has {in_features} input features, "
                        f"not a multiple of {blocksize}, which bitsandbytes' CPU kernel dequantises wrongly")


def _check_4bit(model: nn.Module) -> None:
    """Keep a 4-bit base on the paths bitsandbytes (0.50) computes correctly on the CPU."""
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        check_4bit_layer(name, module.in_features, state.blocksize, module.weight.device)
        # it repacks a weight for its CPU inference kernel (AVX512-BF16 CPUs) at the first no-grad forward,
        # undoing the double quantisation: every CPU computes with the weights as loaded
        module.support_avx512bf16_for_cpu = False
