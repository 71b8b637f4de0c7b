"""The dry-run memory plan against what really exists: bitsandbytes' own 4-bit storage, and measured CPU training
steps (tests/memory_worker.py, torch.profiler's allocation events) with and without gradient checkpointing, fp32
and bf16, within 15 %."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaConfig

from bilora_dist.config.train import parse_config
from bilora_dist.memory.plan import base_bytes_on_rank, nf4_bytes, quantized_weights
from bilora_dist.model.loading import LoadOptions, build_on_meta
from bilora_dist.recipe.train import dry_run
from tests_support import run_ok

BATCH, SEQ, CHUNK = 4, 256, 256


def plan_of(*flags: str) -> dict:
    """Rank 0's plan as the --dry-run JSON line reports it."""
    return json.loads(dry_run(parse_config(["--dry-run", *flags])).splitlines()[-1])["ranks"][0]


def test_nf4_storage_equals_bitsandbytes(tmp_path):
    """Every byte a bitsandbytes NF4 (double quantisation) model stores, per quantised weight and in total."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    q4 = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    meta = build_on_meta(str(tmp_path))
    storages: dict[int, int] = {}
    for name, weight in dict(q4.named_parameters()).items():
        state = getattr(weight, "quant_state", None)
        tensors = [weight]
        if state is not None:
            tensors += [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
            numel = meta.get_parameter(name).numel()
            assert sum(t.untyped_storage().nbytes() for t in tensors) == sum(nf4_bytes(numel)), name
        storages.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors})
    assert len(quantized_weights(meta)) == 14  # 7 linear layers a block, not the head
    assert base_bytes_on_rank(meta, "single", 1, 0, quantized=quantized_weights(meta)) == sum(storages.values())


def test_4bit_plan_of_llama2_7b_by_hand():
    plan = plan_of("--model", "benchmarks/model_configs/llama-2-7b", "--bf16", "--quantize", "4bit")
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # NF4: half a byte, a byte per 64, 4 bytes per 64 x 256
    dense = (2 * 32000 * 4096 + 65 * 4096) * 2  # embeddings, head and RMSNorm weights stay bf16
    assert plan["base_bytes"] == pytest.approx(linear / 2 + linear / 64 + linear / 4096 + dense, rel=1e-3)
    assert plan["dequant_bytes"] == 4096 * 11008 * 2  # the MLP's weight, dequantised to bf16 for its matmul


@pytest.fixture(scope="module")
def measured(tmp_path_factory, tokenizer) -> tuple[str, dict[tuple[str, bool], dict]]:
    """Real steps of a 4-layer Llama (hidden 256, the embedded tokenizer's vocabulary) on 4 x 256 tokens."""
    path = tmp_path_factory.mktemp("llama_256")
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                tie_word_embeddings=True).save_pretrained(path)
    cases = [{"dtype": dtype, "checkpointing": ckpt, "chunk": CHUNK, "batch": BATCH, "seq": SEQ, "rank": 8,
              "aux_rank": 8} for dtype, ckpt in (("float32", 0), ("float32", 1), ("float32", 2), ("bfloat16", 0))]
    proc = run_ok([sys.executable, "tests/memory_worker.py", str(path), json.dumps(cases)])
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return str(path), {(r["dtype"], r["checkpointing"]): r for r in rows}


@pytest.mark.parametrize("dtype,checkpointing", [("float32", 0), ("float32", 1), ("float32", 2), ("bfloat16", 0)])
def test_dry_run_is_within_15_percent_of_a_measured_cpu_step(measured, dtype, checkpointing):
    path, rows = measured
    real = rows[(dtype, checkpointing)]
    flags = ["--model", path, "--micro-batch-size", str(BATCH), "--seq-len", str(SEQ), "--loss-chunk", str(CHUNK),
             "--method", "bilora", "--rank", "8", "--aux-rank", "8", "--bf16", "true" if dtype == "bfloat16" else "false"]
    plan = plan_of(*flags, "--gradient-checkpointing", "true" if checkpointing else "false",
                   "--checkpoint-every", str(checkpointing))
    element = 2 if dtype == "bfloat16" else 4
    saved_by_loss = BATCH * SEQ * 256 * element  # the gradient of the head's input, kept for backward
    print(f"{dtype} checkpointing={checkpointing}: peak plan {plan['peak_bytes'] / 2**20:.1f} MiB, measured "
          f"{real['peak'] / 2**20:.1f}; activations plan {plan['activation_bytes'] / 2**20:.1f}, measured "
          f"{(real['after_loss_forward'] - saved_by_loss) / 2**20:.1f}")
    assert plan["total_bytes"] == pytest.approx(real["resident"], rel=1e-3)
    assert plan["activation_bytes"] == pytest.approx(real["after_loss_forward"] - saved_by_loss, rel=0.15)
    assert plan["peak_bytes"] == pytest.approx(real["peak"], rel=0.15)


def test_moe_plan_counts_every_expert_adapter():
    """Qwen3-30B-A3B's shape: Bi-LoRA (rank 8 + 8) on q/k/v/o and on every expert of gate_up_proj and down_proj,
    counted by hand; the frozen base (30.5B parameters, bf16) split over 8 FSDP2 ranks."""
    flags = ("--model", "benchmarks/model_configs/qwen3-30b-a3b", "--bf16", "--plan-ranks", "8", "--engine", "fsdp")
    plan = plan_of(*flags)
    attention = (2048 + 4096) + 2 * (2048 + 512) + (4096 + 2048)
    experts = 128 * (2048 + 2 * 768) + 128 * (768 + 2048)
    assert plan["adapter_bytes"] == 48 * 16 * (attention + experts) * 4
    assert plan["base_bytes"] == pytest.approx(30_532_122_624 * 2 / 8, rel=0.01)
    header = dry_run(parse_config(["--dry-run", *flags])).splitlines()[0]
    assert "192 adapted layers (192 attention, 0 dense), 96 expert tensors (x 128 experts)" in header


def test_4bit_moe_plan_keeps_experts_in_bf16_and_says_so():
    flags = ("--model", "benchmarks/model_configs/qwen3-30b-a3b", "--bf16", "--plan-ranks", "1", "--engine", "fsdp")
    meta = build_on_meta("benchmarks/model_configs/qwen3-30b-a3b", LoadOptions(torch.bfloat16))
    saved = sum(2 * w.numel() - sum(nf4_bytes(w.numel())) for w in quantized_weights(meta).values())
    assert all(w.dim() == 2 for w in quantized_weights(meta).values())  # linear layers only, no expert tensor
    assert plan_of(*flags)["base_bytes"] - plan_of(*flags, "--quantize", "4bit")["base_bytes"] == saved
    text = dry_run(parse_config(["--dry-run", *flags, "--quantize", "4bit"]))
    assert "--quantize 4bit: the 96 adapted expert tensors (28,991,029,248 params) stay in torch.bfloat16" in text


def _plan_both_engines(model: str, world: int) -> tuple[str, dict, dict]:
    """The dry-run header and rank 0's plan under FSDP2 and ZeRO-3 for `model` on `world` ranks, traced once."""
    from dataclasses import replace

    from bilora_dist.memory.run_plan import build_run_plan
    from bilora_dist.recipe.stages import describe_layers

    run = build_run_plan(parse_config(["--dry-run", "--model", model, "--bf16", "--plan-ranks", str(world),
                                       "--engine", "fsdp"]), world)
    header = f"{sum(p.numel() for p in run.model.parameters()):,} base params, {describe_layers(run.shapes)}"
    return header, run.ranks(())[0].as_dict(), replace(run, kind="zero3").ranks(())[0].as_dict()


def test_deepseek_v3_plan_on_64_ranks_by_hand():
    """DeepSeek-V3's shape (MLA attention, 3 dense layers then 58 MoE layers of 256 routed experts and a shared
    one; bf16, no FP8), Bi-LoRA 8 + 8 on all-linear, 64 ranks: parameters, adapters and shards counted from
    the config, and the trace runs through MLA (v's head dimension 128, q's and k's 192) and the router's buffer."""
    vocab, hidden, dense_ffn, expert_ffn, layers, experts = 129280, 7168, 18432, 2048, 61, 256
    heads, q_rank, kv_rank, nope, rope, v_dim = 128, 1536, 512, 128, 64, 128
    mla = {"q_a_proj": (hidden, q_rank), "q_b_proj": (q_rank, heads * (nope + rope)),
           "kv_a_proj_with_mqa": (hidden, kv_rank + rope), "kv_b_proj": (kv_rank, heads * (nope + v_dim)),
           "o_proj": (heads * v_dim, hidden)}
    attention = sum(i * o for i, o in mla.values()) + q_rank + kv_rank  # + the q_a and kv_a RMSNorms
    moe = experts * 3 * hidden * expert_ffn + 3 * hidden * expert_ffn + experts * hidden  # routed, shared, router
    total = 2 * vocab * hidden + hidden + layers * (attention + 2 * hidden) + 3 * 3 * hidden * dense_ffn \
        + (layers - 3) * moe
    assert total == 671_026_404_352  # DeepSeek-V3's 671B, its MTP module aside

    header, fsdp, zero3 = _plan_both_engines("benchmarks/model_configs/deepseek-v3", 64)
    assert header.startswith(f"{total:,} base params, 488 adapted layers (305 attention, 183 dense), "
                             "116 expert tensors (x 256 experts)")
    attention_adapters = sum(i + o for i, o in mla.values())  # r (in + out) a linear layer, r (in + out) an expert
    dense = 3 * 3 * (hidden + dense_ffn)  # gate, up and down of the 3 dense layers' MLPs
    routed = experts * ((hidden + 2 * expert_ffn) + (expert_ffn + hidden))  # gate_up_proj, down_proj
    shared = 3 * (hidden + expert_ffn)
    assert fsdp["adapter_bytes"] == 16 * (layers * attention_adapters + dense + (layers - 3) * (routed + shared)) * 4
    for plan in (fsdp, zero3):
        assert plan["base_bytes"] == pytest.approx(total * 2 / 64, rel=0.01)
        assert plan["adapter_bytes"] == fsdp["adapter_bytes"] and plan["activation_bytes"] == fsdp["activation_bytes"]
    # FSDP2 gathers one MoE block whole: bf16, but the router's weight, which transformers keeps in fp32
    assert fsdp["gathered_block_bytes"] == (attention + 2 * hidden + moe) * 2 + experts * hidden * 2


def test_qwen3_235b_plan_on_16_ranks_by_hand():
    """Qwen3-235B-A22B's shape (94 layers of 128 experts, top-8), Bi-LoRA 8 + 8, 16 ranks, ZeRO-3 and FSDP2."""
    vocab, hidden, expert_ffn, layers, experts, q_dim, kv_dim = 151936, 4096, 1536, 94, 128, 64 * 128, 4 * 128
    per_layer = (2 * hidden * q_dim + 2 * hidden * kv_dim + 2 * 128 + 2 * hidden + experts * hidden
                 + experts * 3 * hidden * expert_ffn)  # q, o, k, v, q/k norms, layer norms, router, experts
    total = 2 * vocab * hidden + hidden + layers * per_layer
    header, fsdp, zero3 = _plan_both_engines("benchmarks/model_configs/qwen3-235b-a22b", 16)
    assert header.startswith(f"{total:,} base params, 376 adapted layers (376 attention, 0 dense), "
                             "188 expert tensors (x 128 experts)")
    attention = (hidden + q_dim) + 2 * (hidden + kv_dim) + (q_dim + hidden)
    routed = experts * (hidden + 2 * expert_ffn) + experts * (expert_ffn + hidden)
    assert fsdp["adapter_bytes"] == zero3["adapter_bytes"] == 16 * layers * (attention + routed) * 4
    for plan in (fsdp, zero3):
        assert plan["base_bytes"] == pytest.approx(total * 2 / 16, rel=0.01)
    assert fsdp["activation_bytes"] == zero3["activation_bytes"]
    assert fsdp["gathered_block_bytes"] == per_layer * 2  # one block, bf16 (Qwen3-MoE's router is a bf16 linear)
