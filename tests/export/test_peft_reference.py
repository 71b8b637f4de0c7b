"""Against PEFT: `--method lora` trains loss-for-loss like PEFT LoRA, and our exported adapter loads in PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, get_scheduler

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.config.train import parse_config
from bilora_dist.data import BatchPlan, collate, prepare_examples, tokenize
from bilora_dist.data.tokenize import TokenizeOptions
from bilora_dist.engines.base import Engine
from bilora_dist.export.peft import copy_into_peft, save_peft_adapter
from bilora_dist.training.methods import METHOD_STEPS, build_optimizer
from bilora_dist.model.loading import load_frozen_model
from bilora_dist.recipe.train import train


def _run(tmp_path, model_dir, data, method, steps=10, **flags):
    args = ["--model", str(model_dir), "--data", str(data[0]), "--eval-data", str(data[1]), "--method", method,
            "--max-steps", str(steps), "--micro-batch-size", "4", "--lr", "1e-2", "--warmup-ratio", "0.1",
            "--output-dir", str(tmp_path / method)]
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    train(parse_config(args))
    rows = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_lora_matches_peft_loss_for_loss(tmp_path, tiny_model_dir, tokenizer, small_data):
    ours = _run(tmp_path, tiny_model_dir, small_data, "lora")
    # PEFT on the same model, init, batches, optimizer, schedule and clipping
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = select_targets(base, "all-linear")
    bank = build_bank(layer_shapes(base, names), 8, 16.0, None, 1.0, seed=0)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    copy_into_peft(peft_model, bank.primary)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == bank.primary.flat.numel()
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    examples = prepare_examples(str(small_data[0]), "--data", tokenizer, TokenizeOptions(256)).examples
    plan = BatchPlan(len(examples), 4, seed=0)
    for step in range(10):
        (idx,) = plan.micro_batches(step, 0, 1, 1)
        b = collate([examples[i] for i in idx], tokenizer.pad_token_id)
        loss = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          position_ids=b["position_ids"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        assert ours[step]["loss"] == pytest.approx(float(loss), abs=1e-5, rel=1e-5), f"step {step + 1}"
    assert ours[-1]["loss"] < ours[0]["loss"]


def test_exported_adapter_reproduces_trained_logits_in_peft(tmp_path, tiny_model_dir, tokenizer, train_records):
    model = load_frozen_model(str(tiny_model_dir))
    names = select_targets(model, "all-linear")
    bank = build_bank(layer_shapes(model, names), 8, 16.0, 4, 1.0, seed=3)
    inject(model, bank)
    step = METHOD_STEPS["bilora"](model, bank, build_optimizer(bank, 1e-2, 0.0), Engine(), 1.0, 0.05)
    examples = [tokenize(r, tokenizer, 256) for r in train_records[:16]]
    for k in range(3):
        step([collate(examples[4 * k:4 * k + 4], tokenizer.pad_token_id)])
    assert float(bank.aux.delta_sq_norms().sum()) > 0  # the auxiliary is live, so dropping it matters
    save_peft_adapter(bank.primary, tmp_path / "adapter", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], str(tiny_model_dir), {})
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(names)
    assert all(t.shape[0] == 8 or t.shape[1] == 8 for t in tensors.values())  # primary rank only
    batch = collate(examples[:4], tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad(), bank.primary_only():
        ours = model(**inputs).logits
    with torch.no_grad():
        with_aux = model(**inputs).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
        theirs = peft_model(**inputs).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_aux, ours, atol=1e-5)
