"""Reading any PEFT LoRA adapter directory into a Branch, and extracting a LoRA from a full fine-tune."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from bilora_dist.adapters.bank import Branch, LayerShape
from bilora_dist.adapters.experts import PROJECTIONS
from bilora_dist.errors import UserError
from bilora_dist.files import read_json, read_safetensors
from bilora_dist.model.loading import safetensors_index
from bilora_dist.squeeze.operator import balanced_factors, randomized_svd

_KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: a pattern key applies when `(.*\\.)?(key)$` matches the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_peft_adapter(path: Path, flag: str = "--adapter") -> tuple[Branch, dict[str, Any]]:
    """(branch of the adapter's factors, its adapter_config.json). Scales follow r, lora_alpha,
    rank_pattern, alpha_pattern and use_rslora, as PEFT applies them."""
    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise UserError(f"{flag} {path}: not a PEFT adapter directory (needs adapter_config.json and "
                        "adapter_model.safetensors)")
    config = read_json(cfg_file)
    return peft_branch(read_safetensors(weights), config, f"{flag} {path}"), config


def peft_branch(tensors: dict[str, torch.Tensor], config: dict[str, Any], where: str) -> Branch:
    """The branch of a PEFT LoRA state dict (as saved, or as peft.get_peft_model_state_dict gives it) and its
    config; `where` names the source in the one-line errors."""
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise UserError(f"{where}: only plain LoRA adapters can be squeezed (peft_type "
                        f"{config.get('peft_type')}, use_dora {config.get('use_dora', False)})")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match:
            factors.setdefault(match["name"], {})[match["which"]] = value
    if not factors or any(len(f) != 2 for f in factors.values()):
        raise UserError(f"{where}: no complete lora_A/lora_B weight pairs in adapter_model.safetensors")
    parameters = _parameter_modules(factors, config.get("target_parameters") or [])
    shapes, pairs, scales = [], [], []
    for module in sorted(factors):
        A, B = factors[module]["A"].float(), factors[module]["B"].float()
        name = parameters.get(module, module)
        if module in parameters:  # a fused expert projection: lora_A [r·E, in], lora_B [out, r·E]
            r = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r", A.shape[0]))
            experts = A.shape[0] // r
            A, B = A.view(experts, r, A.shape[1]), B.view(B.shape[0], r, experts).permute(2, 0, 1)
            shapes.append(LayerShape(name, A.shape[2], B.shape[1], experts))
        else:
            r = A.shape[0]
            shapes.append(LayerShape(name, A.shape[1], B.shape[0]))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", r))
        pairs.append((A, B))
        scales.append(alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
    return Branch.from_factors(shapes, pairs, scales)


def _parameter_modules(factors: dict[str, Any], target_parameters: list[str]) -> dict[str, str]:
    """PEFT module path of a `target_parameters` wrapper (`...experts`, `...experts.base_layer`, ...) -> the
    path of the parameter it adapts: the projections one module wraps nest in its parameter order, the first
    innermost (export.peft_module_paths writes them so)."""
    out = {}
    for path in factors:
        module = re.sub(r"(\.base_layer)+$", "", path)
        depth = (len(path) - len(module)) // len(".base_layer")
        targeted = [p for p in PROJECTIONS if any(f"{module}.{p}" == t or f"{module}.{p}".endswith(f".{t}")
                                                  for t in target_parameters)]
        if targeted:
            out[path] = f"{module}.{targeted[len(targeted) - 1 - depth]}"
    return out


def extract_lora_from_delta(base: Path, finetuned: Path, rank: int, target: re.Pattern[str],
                            oversample: int = 10, power_iters: int = 2, seed: int = 0) -> Branch:
    """A rank-`rank` LoRA (scale 1) of W_ft − W0 for every 2-D weight whose module name matches `target`,
    by randomized SVD one layer at a time: only one tensor of each model is in memory at once."""
    base_index, ft_index = (safetensors_index(d, f"--delta: {d} holds no .safetensors weights") for d in (base, finetuned))
    generator = torch.Generator().manual_seed(seed)
    shapes, pairs = [], []
    for key in sorted(ft_index):
        name = key.removesuffix(".weight")
        if not key.endswith(".weight") or not target.search(name) or key not in base_index:
            continue
        with safe_open(str(ft_index[key]), framework="pt") as f_ft, safe_open(str(base_index[key]), framework="pt") as f0:
            delta = f_ft.get_tensor(key).float() - f0.get_tensor(key).float()
        if delta.dim() != 2:
            continue
        k = min(rank, *delta.shape)
        found = randomized_svd(delta[None], k, oversample, power_iters, generator)
        shapes.append(LayerShape(name, delta.shape[1], delta.shape[0]))
        pairs.append(balanced_factors(found.U[0], found.S[0], found.V[0], 1.0))
    if not shapes:
        raise UserError(f"--delta: no 2-D weights matching '{target.pattern}' appear in both models")
    return Branch.from_factors(shapes, pairs, [1.0] * len(shapes))
