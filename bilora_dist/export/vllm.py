"""Writing the primary adapter in the layout vLLM's fused-MoE LoRA loader reads (vLLM 0.34, `vllm/lora/`).

vLLM reads expert LoRAs per expert for most MoE families: `...mlp.experts.{e}.{gate_proj,up_proj,down_proj}`
(Mixtral: `...block_sparse_moe.experts.{e}.{w1,w3,w2}`), A `[r, in]` and B `[out, r]`, every expert of every
projection present; a fused gate_up_proj becomes a gate and an up LoRA sharing its A, B split into the
output's two halves. Models vLLM itself stores with 3-D experts (gpt-oss, Qwen3.5-MoE, Qwen3-VL-MoE,
Qwen3-Omni) read PEFT's `target_parameters` layout as we export it, gate_up_proj and down_proj both needed.
Linear layers keep PEFT's keys. `target_modules` must be present (vLLM reads the tensors by key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from bilora_dist.adapters.bank import Branch
from bilora_dist.errors import UserError
from bilora_dist.export.peft import peft_config, peft_state_dict, write_adapter_directory

THREE_D_FAMILIES = ("gpt_oss", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_vl_moe", "qwen3_omni_moe")
_MIXTRAL_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}


def vllm_layers(branch: Branch, meta: nn.Module) -> list[tuple[str, Tensor, Tensor, int, float]]:
    """(module path vLLM reads, lora_A, lora_B, rank, lora_alpha) for every adapted module, the fused expert
    projections of `branch` split per expert; `meta` is the base model (on the meta device) for its layout."""
    mixtral = meta.config.model_type == "mixtral"
    rows = []
    for i, shape in enumerate(branch.shapes):
        A, B = (t.detach() for t in branch.factors(i))
        r, alpha = branch.ranks[i], branch.scales[i] * branch.ranks[i]
        if not shape.experts:
            rows.append((shape.name, A, B, r, alpha))
            continue
        module_path, attr = shape.name.rsplit(".", 1)
        experts = meta.get_submodule(module_path)
        prefix = module_path.replace(".mlp.experts", ".block_sparse_moe.experts") if mixtral else module_path
        if attr == "gate_up_proj" and not experts.is_concatenated:
            raise UserError(f"--format vllm: {shape.name} stores gate and up interleaved, which vLLM splits only "
                            "for the families it reads in 3-D")
        half = shape.out_features // 2
        parts = {"gate_up_proj": [("gate", slice(0, half)), ("up", slice(half, None))],
                 "up_proj": [("up", slice(None))], "down_proj": [("down", slice(None))]}[attr]
        for e in range(shape.experts):
            for part, rows_of in parts:
                name = _MIXTRAL_NAMES[part] if mixtral else f"{part}_proj"
                rows.append((f"{prefix}.{e}.{name}", A[e], B[e][rows_of], r, alpha))
    return rows


def _check_pairs(branch: Branch) -> None:
    """vLLM needs both projections of every adapted experts module."""
    adapted: dict[str, set[str]] = {}
    for shape in branch.shapes:
        if shape.experts:
            module_path, attr = shape.name.rsplit(".", 1)
            adapted.setdefault(module_path, set()).add("down" if attr == "down_proj" else "up")
    for module_path, kinds in adapted.items():
        if kinds != {"up", "down"}:
            missing = "down_proj" if "down" not in kinds else "gate_up_proj"
            raise UserError(f"--format vllm: {module_path} has no adapter on {missing}; vLLM loads expert LoRAs "
                            "only with both projections adapted (--target-modules all-linear)")


def save_vllm_adapter(branch: Branch, out_dir: Path, target_modules: list[str], base_model: str, meta: nn.Module,
                      provenance: dict[str, Any]) -> int:
    """Write the adapter for vLLM (atomically, see write_adapter_directory); returns the number of tensors."""
    _check_pairs(branch)
    tensors, config = peft_state_dict(branch), peft_config(branch, target_modules, base_model)
    if meta.config.model_type not in THREE_D_FAMILIES:
        rows = vllm_layers(branch, meta)
        tensors = {}
        for name, A, B, _, _ in rows:
            tensors[f"base_model.model.{name}.lora_A.weight"] = A.clone().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = B.clone().contiguous()
        r, alpha = config["r"], config["lora_alpha"]
        config |= {"target_modules": sorted({n.rsplit(".", 1)[-1] for n, *_ in rows}), "target_parameters": None,
                   "rank_pattern": {f"^{n}$": k for n, _, _, k, _ in rows if k != r},
                   "alpha_pattern": {f"^{n}$": a for n, _, _, _, a in rows if abs(a - alpha) > 1e-9 * alpha}}
    write_adapter_directory(tensors, config, {**provenance, "format": "vllm"}, out_dir)
    return len(tensors)
