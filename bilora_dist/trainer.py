"""The training recipe: config -> model -> adapters -> engine -> data -> steps -> evaluation -> adapter.

The loop talks to the engine only through `Engine`'s methods and to the adapters only through the
bank; which engine shards the base is invisible here.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import get_scheduler

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.adapters.inject import peft_target_modules
from bilora_dist.config import TrainConfig
from bilora_dist.data import BatchPlan, collate, load_records, tokenize_all
from bilora_dist.embedded import DEFAULT_EVAL, DEFAULT_TRAIN
from bilora_dist.engines import make_engine
from bilora_dist.evaluation import choice_task, evaluate
from bilora_dist.export import save_peft_adapter
from bilora_dist.methods import METHOD_STEPS, build_optimizer
from bilora_dist.metrics import MetricsLog
from bilora_dist.modeling import load_config, load_frozen_model, load_tokenizer, resolve_model

_SCHEDULER_NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def _say(engine: Any, message: str) -> None:
    if engine.is_main:
        tqdm.write(message)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one fine-tuning job; returns the evaluation before and after training."""
    engine = make_engine(cfg)
    out = Path(cfg.output_dir)
    if engine.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.yaml").write_text(cfg.to_yaml())
        model_path = resolve_model(cfg.model)  # converts the embedded model once, on one rank
    engine.barrier()
    model_path = resolve_model(cfg.model)
    load_config(model_path)
    tokenizer = load_tokenizer(model_path)
    train_records = load_records(cfg.data or str(DEFAULT_TRAIN), "--data")
    eval_records = load_records(cfg.eval_data or str(DEFAULT_EVAL), "--eval-data")
    train_set = tokenize_all(train_records, tokenizer, cfg.seq_len, "--data")
    eval_set = tokenize_all(eval_records, tokenizer, cfg.seq_len, "--eval-data")
    task = choice_task(eval_records, tokenizer, cfg.seq_len)

    model = engine.build(lambda: load_frozen_model(model_path))
    names = select_targets(model, cfg.target_modules)
    bank = build_bank(layer_shapes(model, names), cfg.rank, cfg.alpha,
                      cfg.aux_rank if cfg.method == "bilora" else None, cfg.aux_scale, cfg.seed)
    inject(model, bank)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = engine.wrap(model)
    model.train()

    global_batch = cfg.micro_batch_size * cfg.grad_accum * engine.world_size
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(train_set) / global_batch)
    optimizer = build_optimizer(bank, cfg.lr, cfg.weight_decay)
    scheduler = get_scheduler(_SCHEDULER_NAMES[cfg.scheduler], optimizer,
                              num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    step_fn = METHOD_STEPS[cfg.method](model, bank, optimizer, engine, cfg.max_grad_norm, cfg.rho)
    plan = BatchPlan(len(train_set), global_batch, cfg.seed)
    log = MetricsLog(out, engine.is_main)
    pad_id = tokenizer.pad_token_id
    _say(engine, f"{cfg.method} on {model_path}: {len(names)} adapted layers, "
                 f"{bank.primary.flat.numel():,} primary + {bank.aux.flat.numel() if bank.aux else 0:,} aux params; "
                 f"engine {engine.name} x{engine.world_size}, global batch {cfg.micro_batch_size} x {cfg.grad_accum} "
                 f"x {engine.world_size} = {global_batch}, {total_steps} steps")

    def run_eval(step: int) -> dict[str, float]:
        result = evaluate(model, bank, eval_set, task, engine, cfg.eval_batch_size, pad_id)
        log.write({"step": step, **result})
        return result

    before = run_eval(0)
    _say(engine, f"before training: {before}")
    start = time.perf_counter()
    for step in tqdm(range(total_steps), desc=cfg.method, disable=not engine.is_main, dynamic_ncols=True):
        batches = [collate([train_set[i] for i in mb], pad_id)
                   for mb in plan.micro_batches(step, engine.rank, engine.world_size, cfg.grad_accum)]
        t0 = time.perf_counter()
        stats = step_fn(batches)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        seen = sum(int(b["attention_mask"].sum()) for b in batches) * engine.world_size
        if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
            row = {"step": step + 1, "loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm,
                   "rank": max(bank.primary.ranks), "tokens_per_s": seen / (time.perf_counter() - t0),
                   "elapsed_s": time.perf_counter() - start}
            if stats.aux_norm is not None:
                row["aux_norm"] = stats.aux_norm
            log.write(row)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total_steps:
            run_eval(step + 1)
    after = run_eval(total_steps)
    _say(engine, f"after training:  {after}")
    if engine.is_main:
        provenance = {"method": cfg.method, "rho": cfg.rho, "rank": cfg.rank, "alpha": cfg.alpha,
                      "aux_rank": cfg.aux_rank if cfg.method == "bilora" else None, "steps": total_steps,
                      "engine": engine.name, "world_size": engine.world_size, "squeeze_history": []}
        save_peft_adapter(bank.primary, out / "adapter", peft_target_modules(cfg.target_modules, names),
                          model_path, provenance)
        _say(engine, f"adapter written to {out / 'adapter'}")
    log.close()
    engine.close()
    return {"before": before, "after": after, "steps": total_steps}
