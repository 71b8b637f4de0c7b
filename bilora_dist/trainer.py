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
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers import get_scheduler

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.adapters.bank import AdapterBank
from bilora_dist.adapters.inject import check_rank, peft_target_modules
from bilora_dist.checkpoint import (check_compatible, check_step_budget, checkpoints_dir, find_checkpoint,
                                    load_checkpoint, read_state, restore_bank, save_checkpoint, set_rng_state)
from bilora_dist.config import TrainConfig
from bilora_dist.data import BatchPlan, Prepared, collate, prepare_examples, to_device
from bilora_dist.data.tokenize import TokenizeOptions
from bilora_dist.embedded import DEFAULT_EVAL, DEFAULT_TRAIN
from bilora_dist.engines import Engine, make_engine, resolve_engine_name
from bilora_dist.errors import UserError
from bilora_dist.evaluation import choice_task, evaluate
from bilora_dist.export import save_peft_adapter
from bilora_dist.methods import METHOD_STEPS, build_optimizer
from bilora_dist.memory_plan import DEFAULT_PERSISTENCE_THRESHOLD, format_plan, plan_memory
from bilora_dist.metrics import MetricsLog, truncate_metrics
from bilora_dist.modeling import build_on_meta, load_config, load_tokenizer, resolve_model
from bilora_dist.preemption import StopRequest
from bilora_dist.squeeze.branch import kept_energy_summary
from bilora_dist.squeeze.schedule import apply_rank_change, parse_squeeze

_SCHEDULER_NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """cfg's schedule; `--warmup-type log` warms up along DeepSpeed's Warmup* curve, log(step + 1) / log(warmup)."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(_SCHEDULER_NAMES[cfg.scheduler], optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    if cfg.warmup_type == "log":
        scale = math.log(max(2, warmup))  # DeepSpeed warms up over at least 2 steps

        def log_warmup(after: Callable[[int], float]) -> Callable[[int], float]:
            return lambda step: math.log(step + 1) / scale if step < warmup else after(step)

        scheduler.lr_lambdas = [log_warmup(after) for after in scheduler.lr_lambdas]  # one per param group
    return scheduler


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
    from bilora_dist.ds_config import DEFAULT_ZERO3, hidden_size_of, read_ds_config, resolve

    world = cfg.plan_ranks or int(os.environ.get("WORLD_SIZE", "1"))
    name = resolve_engine_name(cfg.engine, cfg.ds_config, world)
    if name == "single" and world > 1:
        raise UserError(f"--engine single runs one process; a plan for {world} ranks needs deepspeed or fsdp")
    model = build_on_meta(resolve_model(cfg.model), torch.bfloat16 if cfg.bf16 else torch.float32)
    zero = resolve(read_ds_config(cfg.ds_config) if cfg.ds_config else DEFAULT_ZERO3, cfg.bf16,
                   hidden_size_of(model.config))["zero_optimization"]
    kind = {"single": "single", "fsdp": "fsdp"}.get(name, "zero3" if zero["stage"] == 3 else "replicated")
    shapes = layer_shapes(model, select_targets(model, cfg.target_modules))
    check_rank(shapes, cfg.rank, "--rank")
    ranks = cfg.rank + (cfg.aux_rank if cfg.method == "bilora" else 0)
    if cfg.method == "bilora":
        check_rank(shapes, cfg.aux_rank, "--aux-rank")
    adapter_numel = sum(ranks * (s.in_features + s.out_features) for s in shapes)
    plans = plan_memory(model, adapter_numel, kind, world,
                        zero.get("param_persistence_threshold", DEFAULT_PERSISTENCE_THRESHOLD))
    header = (f"memory plan: {cfg.model or 'embedded default'}, {kind} on {world} rank(s), "
              f"{sum(p.numel() for p in model.parameters()):,} base params, {len(shapes)} adapted layers, "
              f"{adapter_numel:,} adapter params ({cfg.method})")
    return format_plan(plans, header) + "\n" + json.dumps({"engine": kind, "world_size": world,
                                                           "ranks": [p.as_dict() for p in plans]})


def run_identity(cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it (checkpoint.IDENTITY_KEYS)."""
    model = str(Path(cfg.model).resolve()) if cfg.model and Path(cfg.model).exists() else cfg.model or "embedded"
    bilora = cfg.method == "bilora"
    return {"model": model, "method": cfg.method, "rank": cfg.rank, "alpha": cfg.alpha,
            "aux_rank": cfg.aux_rank if bilora else None, "aux_scale": cfg.aux_scale if bilora else None,
            "target_modules": cfg.target_modules, "squeeze": cfg.squeeze or None}


def _resume_point(cfg: TrainConfig, out: Path, engine: Engine) -> Path | None:
    """The checkpoint this run continues from (None: a fresh run); refuses incompatible ones and
    output directories that hold another run."""
    holds_run = (out / "metrics.jsonl").exists()
    if not cfg.resume:
        if holds_run:
            raise UserError(f"--output-dir {out} already holds a run (metrics.jsonl); pass --resume auto to "
                            "continue it, or choose another directory")
        return None
    path = find_checkpoint(out, cfg.resume, lambda message: _say(engine, message))
    if path is None:
        if holds_run:
            raise UserError(f"--resume auto: {out} holds a run but no valid checkpoint in {checkpoints_dir(out)}")
        return None
    check_compatible(read_state(path), run_identity(cfg), path)
    if holds_run and path.resolve().parent != checkpoints_dir(out).resolve():
        raise UserError(f"--output-dir {out} already holds another run; resume into a new directory")
    return path


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one fine-tuning job; returns the evaluations before and after training (before is
    None for a resumed run) and, when SIGTERM/SIGINT stopped it early, the step it stopped at.
    From the start, those signals only ask the loop to save a checkpoint and leave after the current step."""
    with StopRequest() as stop:
        return _train(cfg, stop)


def _train(cfg: TrainConfig, stop: StopRequest) -> dict[str, Any]:
    engine = make_engine(cfg)
    if engine.is_main:
        resolve_model(cfg.model)  # converts the embedded model once, on one rank
    engine.barrier()
    model_path = resolve_model(cfg.model)
    load_config(model_path)
    out = Path(cfg.output_dir)
    resume_from = _resume_point(cfg, out, engine)
    tokenizer = load_tokenizer(model_path)
    options = TokenizeOptions(cfg.seq_len, cfg.train_on_prompt, cfg.last_turn_only)

    def prepare(spec: str, flag: str) -> Prepared:  # tokenized once by the main rank, memory-mapped by all
        return prepare_examples(spec, flag, tokenizer, options, cfg.data_format, cfg.data_workers, cfg.data_cache,
                                engine, lambda message: _say(engine, message))

    train_set = prepare(cfg.data or str(DEFAULT_TRAIN), "--data").examples
    eval_data = prepare(cfg.eval_data or str(DEFAULT_EVAL), "--eval-data")
    eval_set = eval_data.examples
    task = choice_task(eval_data, tokenizer, cfg.seq_len)

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
    checkpoint = load_checkpoint(resume_from) if resume_from else None
    if checkpoint:
        check_step_budget(checkpoint.state, total_steps, checkpoint.path)
        restore_bank(bank, checkpoint)
    engine.barrier()  # every rank has checked before the main rank starts writing (shared filesystems)
    # every input is valid from here on: only now touch the output directory
    if engine.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.yaml").write_text(cfg.to_yaml())
        if checkpoint:
            truncate_metrics(out, checkpoint.step)
    inject(model, bank)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = engine.wrap(model)
    model.train()

    optimizer = build_optimizer(bank, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    start_step, start_example, squeeze_history = 0, 0, []
    if checkpoint:
        optimizer.load_state_dict(checkpoint.optimizer)
        scheduler.load_state_dict(checkpoint.scheduler)
        set_rng_state(checkpoint.rng[engine.rank if len(checkpoint.rng) == engine.world_size else 0])
        start_step, start_example = checkpoint.step, checkpoint.state["consumed"]
        squeeze_history = checkpoint.state["squeeze_history"]
        _say(engine, f"resuming from {checkpoint.path} (step {start_step}, example {start_example}, "
                     f"saved by {checkpoint.state['world_size']} rank(s), global batch "
                     f"{checkpoint.state['global_batch']})")
    step_fn = METHOD_STEPS[cfg.method](model, bank, optimizer, engine, cfg.max_grad_norm, cfg.rho)
    plan = BatchPlan(len(train_set), global_batch, cfg.seed, start_step, start_example)
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

    def save(step: int) -> Path:
        state = {"step": step, "consumed": plan.consumed(step), "total_steps": total_steps,
                 "global_batch": global_batch, "world_size": engine.world_size, "squeeze_history": squeeze_history,
                 "identity": run_identity(cfg)}
        return save_checkpoint(out, state, bank, optimizer, scheduler, cfg.to_yaml(), engine, cfg.keep_last)

    before = None if checkpoint else run_eval(0)
    if before:
        _say(engine, f"before training: {before}")
    start = time.perf_counter()
    stopped_at = None
    for step in tqdm(range(start_step, total_steps), desc=cfg.method, disable=not engine.is_main,
                     dynamic_ncols=True, initial=start_step, total=total_steps):
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
            event = {"step": step + 1, "mode": schedule.mode, "rank": squeeze_at[step + 1],
                     **kept_energy_summary(reports)}
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
        stopping = stop.agreed(engine)
        if stopping:
            row["stopped_by"] = stop.received or "signal on another rank"
        if row:
            log.write({"step": step + 1, **row})
        if last or stopping or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            saved = save(step + 1)
            if stopping:
                _say(engine, f"stopped by {row['stopped_by']} after step {step + 1}; checkpoint {saved}; "
                             "continue with --resume auto")
                stopped_at = step + 1
                break
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:
            run_eval(step + 1)
    if stopped_at is not None:
        log.close()
        engine.close()
        return {"before": before, "after": None, "steps": total_steps, "stopped_at": stopped_at}
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
                      "squeeze_history": squeeze_history, "resumed_from": str(resume_from) if resume_from else None}
        save_peft_adapter(bank.primary, out / "adapter", peft_target_modules(cfg.target_modules, names),
                          cfg.model or model_path, provenance)  # a hub id stays a hub id
        _say(engine, f"adapter written to {out / 'adapter'}")
    log.close()
    engine.close()
    return {"before": before, "after": after, "steps": total_steps}
