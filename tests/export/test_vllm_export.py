"""launch/export.py --format vllm: expert LoRAs per expert under the names and shapes vLLM's fused-MoE LoRA
loader reads (vllm/lora/: `experts.{e}.gate_proj` ..., Mixtral's `block_sparse_moe.experts.{e}.w1` ...), and
PEFT's 3-D layout for gpt-oss, each expert's update equal to the trained one."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bilora_dist.adapters import build_bank, layer_shapes, select_targets
from bilora_dist.export.peft import save_peft_adapter
from tests_support import run_cmd, run_ok, tiny_moe_config

EXPERT_NAMES = {"qwen3_moe": ("mlp.experts", "gate_proj", "up_proj", "down_proj"),
                "mixtral": ("block_sparse_moe.experts", "w1", "w3", "w2")}


def _adapter(family: str, tmp_path, targets: str = "all-linear"):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_moe_config(family, 96)).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    bank = build_bank(layer_shapes(model, select_targets(model, targets)), 4, 8.0, None, 1.0, 0)
    with torch.no_grad():
        bank.primary.flat.normal_(0, 0.1)
    save_peft_adapter(bank.primary, tmp_path / "peft", ["q_proj", "k_proj", "v_proj", "o_proj"],
                      str(tmp_path / "base"), {})
    return bank.primary


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_per_expert_keys_and_shapes_as_vllm_reads_them(family, tmp_path):
    branch = _adapter(family, tmp_path)
    run_ok([sys.executable, "launch/export.py", "--checkpoint", str(tmp_path / "peft"), "--out",
            str(tmp_path / "vllm"), "--format", "vllm"])
    tensors = load_file(tmp_path / "vllm" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    container, gate, up, down = EXPERT_NAMES[family]
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["target_parameters"] is None
    assert {gate, up, down, "q_proj"} <= set(config["target_modules"])
    assert not any(".base_layer." in k or k.endswith("experts.lora_A.weight") for k in tensors)
    by_name = {s.name: i for i, s in enumerate(branch.shapes)}
    for layer in (0, 1):
        A, B = branch.factors(by_name[f"model.layers.{layer}.mlp.experts.gate_up_proj"])
        A_down, B_down = branch.factors(by_name[f"model.layers.{layer}.mlp.experts.down_proj"])
        inter = B.shape[1] // 2
        for e in range(4):
            key = f"base_model.model.model.layers.{layer}.{container}.{e}"
            got = {n: (tensors[f"{key}.{n}.lora_A.weight"], tensors[f"{key}.{n}.lora_B.weight"]) for n in (gate, up, down)}
            assert got[gate][0].shape == (4, 32) and got[gate][1].shape == (inter, 4)
            assert got[down][0].shape == (4, inter) and got[down][1].shape == (32, 4)
            delta = B[e] @ A[e]  # the fused update: gate rows first, then up rows
            torch.testing.assert_close(got[gate][1] @ got[gate][0], delta[:inter], rtol=0, atol=1e-6)
            torch.testing.assert_close(got[up][1] @ got[up][0], delta[inter:], rtol=0, atol=1e-6)
            torch.testing.assert_close(got[down][1] @ got[down][0], B_down[e] @ A_down[e], rtol=0, atol=1e-6)
    assert sum(".experts." in k for k in tensors) == 2 * 4 * 3 * 2  # layers x experts x projections x A/B


def test_gpt_oss_keeps_the_3d_layout_vllm_reads(tmp_path):
    _adapter("gpt_oss", tmp_path)
    run_ok([sys.executable, "launch/export.py", "--checkpoint", str(tmp_path / "peft"), "--out",
            str(tmp_path / "vllm"), "--format", "vllm"])
    tensors = load_file(tmp_path / "vllm" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.mlp.experts"
    assert tensors[f"{prefix}.base_layer.lora_A.weight"].shape == (4 * 4, 32)  # gate_up: [r·E, hidden]
    assert tensors[f"{prefix}.base_layer.lora_B.weight"].shape == (2 * 16, 4 * 4)
    assert tensors[f"{prefix}.lora_A.weight"].shape == (4 * 4, 16)  # down: [r·E, intermediate]
    peft = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert peft.keys() == tensors.keys() and all(torch.equal(tensors[k], peft[k]) for k in tensors)


def test_one_projection_only_is_refused_in_one_line(tmp_path):
    _adapter("qwen3_moe", tmp_path, targets="q_proj,gate_up_proj")
    proc = run_cmd([sys.executable, "launch/export.py", "--checkpoint", str(tmp_path / "peft"), "--out",
                    str(tmp_path / "vllm"), "--format", "vllm"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "model.layers.0.mlp.experts has no adapter on down_proj" in proc.stderr
    assert not (tmp_path / "vllm").exists()
