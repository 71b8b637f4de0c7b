"""Writing the primary adapter as a Hugging Face PEFT LoRA adapter directory.

A fused expert projection goes to PEFT's `target_parameters` layout (peft 0.21, `lora.ParamWrapper`):
lora_A [r·E, in] stacks the experts' A_e, lora_B [out, r·E] holds B_e in columns k·E + e, and the projections
of one experts module are nested wrappers, the first in the module's parameter order innermost
(`experts.base_layer.lora_A` for gate_up_proj, `experts.lora_A` for down_proj).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from bilora_dist.adapters.bank import Branch
from bilora_dist.adapters.experts import PROJECTIONS
from bilora_dist.files import atomic_directory

PROVENANCE_FILE = "bilora_dist.json"


def peft_module_paths(branch: Branch) -> list[str]:
    """Per layer, the path of the PEFT module holding its lora_A / lora_B (a nested ParamWrapper's for a fused
    expert projection: one `base_layer.` per projection of the same module that wraps it from outside)."""
    projections: dict[str, list[str]] = {}
    for shape in branch.shapes:
        if shape.experts:
            module, attr = shape.name.rsplit(".", 1)
            projections.setdefault(module, []).append(attr)
    paths = []
    for shape in branch.shapes:
        if not shape.experts:
            paths.append(shape.name)
            continue
        module, attr = shape.name.rsplit(".", 1)
        order = sorted(projections[module], key=PROJECTIONS.index)
        paths.append(module + ".base_layer" * (len(order) - 1 - order.index(attr)))
    return paths


def peft_factors(branch: Branch, i: int) -> tuple[Tensor, Tensor]:
    """Layer i's (lora_A, lora_B) as PEFT stores them (fused experts: [r·E, in] and [out, r·E])."""
    A, B = (t.detach() for t in branch.factors(i))
    if branch.shapes[i].experts:
        return A.reshape(-1, A.shape[-1]), B.permute(1, 2, 0).reshape(B.shape[1], -1)
    return A, B


def peft_state_dict(branch: Branch) -> dict[str, Any]:
    """PEFT tensor names (adapter name stripped, as PEFT saves them) -> contiguous copies of the factors."""
    out = {}
    for i, path in enumerate(peft_module_paths(branch)):
        A, B = peft_factors(branch, i)
        out[f"base_model.model.{path}.lora_A.weight"] = A.clone().contiguous()
        out[f"base_model.model.{path}.lora_B.weight"] = B.clone().contiguous()
    return out


def copy_into_peft(peft_model: Any, branch: Branch, adapter: str = "default") -> None:
    """Sets a PEFT LoRA model's A and B of every layer of `branch` to the branch's factors (in place)."""
    import torch

    with torch.no_grad():
        for i, path in enumerate(peft_module_paths(branch)):
            A, B = peft_factors(branch, i)
            layer = peft_model.base_model.model.get_submodule(path)
            layer.lora_A[adapter].weight.copy_(A)
            layer.lora_B[adapter].weight.copy_(B)


def peft_config(branch: Branch, target_modules: list[str], base_model: str) -> dict[str, Any]:
    """adapter_config.json; per-layer ranks other than the most common one go to rank_pattern/alpha_pattern."""
    ranks = branch.ranks
    r = max(set(ranks), key=ranks.count)
    alpha = next(s * k for s, k in zip(branch.scales, ranks) if k == r)
    rank_pattern = {f"^{s.name}$": k for s, k in zip(branch.shapes, ranks) if k != r}
    alpha_pattern = {f"^{s.name}$": sc * k for s, k, sc in zip(branch.shapes, ranks, branch.scales)
                     if abs(sc * k - alpha) > 1e-9 * alpha}
    parameters = sorted(s.name for s in branch.shapes if s.experts)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": r, "lora_alpha": alpha, "target_modules": target_modules or None,
            "target_parameters": parameters or None, "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}


def save_peft_adapter(branch: Branch, out_dir: Path, target_modules: list[str], base_model: str,
                      provenance: dict[str, Any]) -> None:
    """Write the adapter in PEFT's layout (see write_adapter_directory)."""
    write_adapter_directory(peft_state_dict(branch), peft_config(branch, target_modules, base_model), provenance,
                            out_dir)


def write_adapter_directory(tensors: dict[str, Tensor], config: dict[str, Any], provenance: dict[str, Any],
                            out_dir: Path) -> None:
    """Write adapter_config.json, adapter_model.safetensors and our own bilora_dist.json atomically:
    the directory appears complete or not at all, and an existing one is replaced only once the new one is."""
    with atomic_directory(Path(out_dir), exists="replace") as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
