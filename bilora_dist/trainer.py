"""The training recipe: config -> model -> adapters -> engine -> data -> steps -> evaluation -> adapter.

The loop talks to the engine only through `Engine`'s methods and to the adapters only through the
bank; which engine shards the base is invisible here.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import get_scheduler

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.adapters.bank import AdapterBank
from bilora_dist.adapters.inject import check_rank, peft_target_modules
from bilora_dist.config import TrainConfig
from bilora_dist.data import BatchPlan, collate, load_records, to_device, tokenize_all
from bilora_dist.embedded import DEFAULT_EVAL, DEFAULT_TRAIN
from bilora_dist.engines import Engine, make_engine, resolve_engine_name
from bilora_dist.errors import UserError
from bilora_dist.evaluation import choice_task, evaluate
from bilora_dist.export import save_peft_adapter
from bilora_dist.methods import METHOD_STEPS, build_optimizer
from bilora_dist.memory_plan import DEFAULT_PERSISTENCE_THRESHOLD, format_plan, plan_memory
from bilora_dist.metrics import MetricsLog
from bilora_dist.modeling import build_on_meta, load_config, load_tokenizer, resolve_model
from bilora_dist.squeeze.schedule import apply_rank_change, parse_squeeze

_SCHEDULER_NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def _say(engine: Any, message: str) -> None:
    if engine.is_main:
        tqdm.write(message)


def _holdings(engine: Engine, model: torch.nn.Module, bank: AdapterBank, optimizer: torch.optim.Optimizer,
              dtype: torch.dtype, global_batch: int) -> dict[str, Any]:
    """What every rank holds, measured from the engine: its part of the frozen base, the full adapters,
    their gradient bucket (the bytes of the one all-reduce per step) and the optimizer state."""
    held, total = engine.held_base_numel(model)
    held_all = engine.gather_object(held)
    adapters = sum(b.flat.numel() for b in bank.branches())
    return {"engine": engine.name, "world_size": engine.world_size, "global_batch": global_batch,
            "base_numel": total, "base_held_numel": held_all,
            "base_held_bytes": [h * torch.finfo(dtype).bits // 8 for h in held_all],
            "adapter_numel": adapters, "adapter_sync_bytes": bank.grad_bucket.numel() * bank.grad_bucket.element_size(),
            "optimizer_state_bytes": sum(t.numel() * t.element_size() for state in optimizer.state.values()
                                         for t in state.values() if torch.is_tensor(t))}


def _check_replicas(engine: Engine, bank: AdapterBank, step: int) -> list[str]:
    """Every rank's adapter digest (short form); raises if any two ranks differ."""
    digests = engine.gather_object(bank.digest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"adapter replicas diverged at step {step}: " + ", ".join(d[:16] for d in digests))
    return [d[:16] for d in digests]


def dry_run(cfg: TrainConfig) -> str:
    """The per-rank memory plan of `cfg` on cfg.plan_ranks ranks, from the model's config alone."""
    from bilora_dist.ds_config import DEFAULT_ZERO3, read_ds_config

    world = cfg.plan_ranks or int(os.environ.get("WORLD_SIZE", "1"))
    name = resolve_engine_name(cfg.engine, cfg.ds_config, world)
    if name == "single" and world > 1:
        raise UserError(f"--engine single runs one process; a plan for {world} ranks needs deepspeed or fsdp")
    zero = (read_ds_config(cfg.ds_config) if cfg.ds_config else DEFAULT_ZERO3)["zero_optimization"]
    kind = {"single": "single", "fsdp": "fsdp"}.get(name, "zero3" if zero.get("stage", 0) == 3 else "replicated")
    model = build_on_meta(resolve_model(cfg.model), torch.bfloat16 if cfg.bf16 else torch.float32)
    shapes = layer_shapes(model, select_targets(model, cfg.target_modules))
    check_rank(shapes, cfg.rank, "--rank")
    ranks = cfg.rank + (cfg.aux_rank if cfg.method == "bilora" else 0)
    if cfg.method == "bilora":
        check_rank(shapes, cfg.aux_rank, "--aux-rank")
    adapter_numel = sum(ranks * (s.in_features + s.out_features) for s in shapes)
    plans = plan_memory(model, adapter_numel, kind, world,
                        zero.get("stage3_param_persistence_threshold", DEFAULT_PERSISTENCE_THRESHOLD))
    header = (f"memory plan: {cfg.model or 'embedded default'}, {kind} on {world} rank(s), "
              f"{sum(p.numel() for p in model.parameters()):,} base params, {len(shapes)} adapted layers, "
              f"{adapter_numel:,} adapter params ({cfg.method})")
    return format_plan(plans, header) + "\n" + json.dumps({"engine": kind, "world_size": world,
                                                           "ranks": [p.as_dict() for p in plans]})


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one fine-tuning job; returns the evaluation before and after training."""
    engine = make_engine(cfg)
    if engine.is_main:
        resolve_model(cfg.model)  # converts the embedded model once, on one rank
    engine.barrier()
    model_path = resolve_model(cfg.model)
    load_config(model_path)
    tokenizer = load_tokenizer(model_path)
    train_records = load_records(cfg.data or str(DEFAULT_TRAIN), "--data")
    eval_records = load_records(cfg.eval_data or str(DEFAULT_EVAL), "--eval-data")
    train_set = tokenize_all(train_records, tokenizer, cfg.seq_len, "--data")
    eval_set = tokenize_all(eval_records, tokenizer, cfg.seq_len, "--eval-data")
    task = choice_task(eval_records, tokenizer, cfg.seq_len)

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = engine.build(model_path, dtype)
    names = select_targets(model, cfg.target_modules)
    bank = build_bank(layer_shapes(model, names), cfg.rank, cfg.alpha,
                      cfg.aux_rank if cfg.method == "bilora" else None, cfg.aux_scale, cfg.seed).to(engine.device)
    global_batch = cfg.micro_batch_size * cfg.grad_accum * engine.world_size
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(train_set) / global_batch)
    schedule = parse_squeeze(cfg.squeeze, total_steps, cfg.rank, cfg.squeeze_min_stage, cfg.squeeze_ranks) \
        if cfg.squeeze else None
    squeeze_at = dict(schedule.events) if schedule else {}
    squeeze_history: list[dict[str, Any]] = []
    out = Path(cfg.output_dir)
    if (out / "metrics.jsonl").exists():
        raise UserError(f"--output-dir {out} already holds a run (metrics.jsonl); choose another directory")
    engine.barrier()  # every rank has checked before the main rank starts writing (shared filesystems)
    # every input is valid from here on: only now touch the output directory
    if engine.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.yaml").write_text(cfg.to_yaml())
    inject(model, bank)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = engine.wrap(model)
    model.train()

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
        batches = [to_device(collate([train_set[i] for i in mb], pad_id), engine.device)
                   for mb in plan.micro_batches(step, engine.rank, engine.world_size, cfg.grad_accum)]
        t0 = time.perf_counter()
        stats = step_fn(batches)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        seen = sum(int(b["attention_mask"].sum()) for b in batches) * engine.world_size
        last = step + 1 == total_steps
        row: dict[str, Any] = {}
        if step + 1 in squeeze_at:
            reports = apply_rank_change(bank, squeeze_at[step + 1], optimizer, engine, cfg.squeeze_optimizer,
                                        cfg.squeeze_aux)
            step_fn.rebind()
            kept = [r.kept_energy for r in reports]
            event = {"step": step + 1, "mode": schedule.mode, "rank": squeeze_at[step + 1],
                     "kept_energy_mean": sum(kept) / len(kept), "kept_energy_min": min(kept)}
            squeeze_history.append(event)
            row.update(squeeze_rank=event["rank"], kept_energy=event["kept_energy_mean"],
                       kept_energy_min=event["kept_energy_min"])
        if (step + 1) % cfg.log_every == 0 or last:
            row.update(loss=stats.loss, lr=lr, grad_norm=stats.grad_norm, rank=max(bank.primary.ranks),
                       tokens_per_s=seen / (time.perf_counter() - t0), elapsed_s=time.perf_counter() - start)
            if stats.aux_norm is not None:
                row["aux_norm"] = stats.aux_norm
        if cfg.replica_check_every and ((step + 1) % cfg.replica_check_every == 0 or last):
            row["adapter_sha256"] = _check_replicas(engine, bank, step + 1)
        if row:
            log.write({"step": step + 1, **row})
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:
            run_eval(step + 1)
    train_s = time.perf_counter() - start
    after = run_eval(total_steps)
    _say(engine, f"after training:  {after}")
    peaks = engine.gather_object(engine.peak_memory_bytes())
    log.write({"step": total_steps, "train_s": train_s, "peak_mem_mb": [round(b / 2**20, 1) for b in peaks],
               **_holdings(engine, model, bank, optimizer, dtype, global_batch)})
    if engine.is_main:
        provenance = {"method": cfg.method, "rho": cfg.rho, "rank": cfg.rank, "alpha": cfg.alpha,
                      "aux_rank": cfg.aux_rank if cfg.method == "bilora" else None, "steps": total_steps,
                      "engine": engine.name, "world_size": engine.world_size, "squeeze": cfg.squeeze or None,
                      "squeeze_history": squeeze_history}
        save_peft_adapter(bank.primary, out / "adapter", peft_target_modules(cfg.target_modules, names),
                          model_path, provenance)
        _say(engine, f"adapter written to {out / 'adapter'}")
    log.close()
    engine.close()
    return {"before": before, "after": after, "steps": total_steps}
