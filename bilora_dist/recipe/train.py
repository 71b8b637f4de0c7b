"""The training recipe, stage by stage: resolve the model → check the resume point → prepare the data →
build the model and its adapters → restore the adapters → open the output directory → attach and wrap →
loop (loop.py) → finish (evaluate, measure, write the adapter).

`_train` reads as that list; each stage is one function with the few inputs it needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from bilora_dist.adapters.bank import AdapterBank
from bilora_dist.adapters.inject import peft_target_modules
from bilora_dist.checkpoint.store import (Checkpoint, check_compatible, check_step_budget, checkpoints_dir, describe_changes,
                                    find_checkpoint, honoured_changes, list_checkpoints, load_checkpoint, read_state,
                                    restore_bank)
from bilora_dist.config.train import TrainConfig
from bilora_dist.model.embedded import DEFAULT_TRAIN
from bilora_dist.engines import Engine, make_engine
from bilora_dist.errors import TrainingFault, UserError
from bilora_dist.files import hash_bytes
from bilora_dist.export.peft import save_peft_adapter
from bilora_dist.training.loop import Budget, TrainingLoop, say
from bilora_dist.memory.plan import format_plan
from bilora_dist.training.metrics import trained_steps, truncate_metrics
from bilora_dist.memory.run_plan import build_run_plan
from bilora_dist.checkpoint.preemption import OutputLock, StopRequest
from bilora_dist.memory.recompute import Recompute
from bilora_dist.squeeze.schedule import parse_squeeze
from bilora_dist.recipe.stages import (attach_and_wrap, build_model_and_adapters, check_vocabulary, choose_recompute, describe_layers,
                                      prepare_data, resolve_model_once, resolve_recompute, unquantized_experts)


def dry_run(cfg: TrainConfig) -> str:
    """The per-rank memory plan of `cfg` on cfg.plan_ranks ranks, from the model's config alone. Under
    --gradient-checkpointing auto the choice needs --memory-budget (a plan is made where its devices are not)."""
    world = cfg.plan_ranks or int(os.environ.get("WORLD_SIZE", "1"))
    plan = build_run_plan(cfg, world)
    if cfg.gradient_checkpointing == "auto" and not cfg.memory_budget:
        recompute = Recompute(0, plan.blocks, "auto chooses for a --memory-budget, none given")
    else:
        recompute = choose_recompute(cfg, plan, lambda: 0)
    plans = plan.ranks(recompute.blocks)
    header = (f"memory plan: {cfg.model or 'embedded default'}, {plan.kind} on {world} rank(s), "
              f"{sum(p.numel() for p in plan.model.parameters()):,} base params ({cfg.dtype}, quantize "
              f"{cfg.quantize}), {describe_layers(plan.shapes)}, {plan.adapter_numel:,} adapter params ({cfg.method}); "
              f"micro-batch {cfg.micro_batch_size} x {cfg.seq_len} tokens, gradient checkpointing "
              f"{recompute.describe()} ({recompute.why}), loss chunk {cfg.loss_chunk or 'all'}")
    note = unquantized_experts(plan.shapes, cfg)
    return format_plan(plans, header + (f"\n{note}" if note else "")) + "\n" + json.dumps(
        {"engine": plan.kind, "world_size": world, "gradient_checkpointing": recompute.describe(),
         "ranks": [p.as_dict() for p in plans]})


def run_identity(cfg: TrainConfig, data_digest: str) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it: the refused settings of checkpoint.RESUME_POLICY,
    normalised (a model directory by its absolute path, the data by `data_digest`)."""
    model = str(Path(cfg.model).resolve()) if cfg.model and Path(cfg.model).exists() else cfg.model or "embedded"
    bilora = cfg.method == "bilora"
    return {"model": model, "method": cfg.method, "rank": cfg.rank, "alpha": cfg.alpha,
            "aux_rank": cfg.aux_rank if bilora else None, "aux_scale": cfg.aux_scale if bilora else None,
            "aux_optimizer": cfg.aux_optimizer if bilora else None, "target_modules": cfg.target_modules,
            "squeeze": cfg.squeeze or None, "squeeze_min_stage": cfg.squeeze_min_stage if cfg.squeeze else None,
            "squeeze_ranks": cfg.squeeze_ranks if cfg.squeeze else None, "data": data_digest,
            "data_format": cfg.data_format, "train_on_prompt": cfg.train_on_prompt,
            "last_turn_only": cfg.last_turn_only, "seq_len": cfg.seq_len, "packing": cfg.packing, "seed": cfg.seed}


def data_digest(cfg: TrainConfig, engine: Engine) -> str:
    """SHA-256 of the training data's files (bytes, and names within a folder source; the embedded default is its
    file too), read once by the main rank: the same data under another path is the same data. One sequential read,
    as the tokenized-data cache key already makes."""
    from bilora_dist.data.source import locate

    digest = None
    if engine.is_main:
        source = locate(cfg.data or str(DEFAULT_TRAIN), "--data")
        h, location = hashlib.sha256(f"{source.kind}:{source.split}".encode()), Path(source.location)
        for path in source.files:
            if location.is_dir():  # a folder's files by their place in it; a lone file's name is not its data
                h.update(str(path.relative_to(location)).encode() + b"\0")
            hash_bytes(h, path)
        digest = h.hexdigest()
    return engine.gather_object(digest)[0]


def _holds_run(out: Path) -> str | None:
    """What of an earlier run `out` holds (training steps logged, checkpoints, an adapter); None: nothing that a
    fresh start would lose (a run that stopped before its first step leaves only its configuration and empty logs)."""
    steps, saved = trained_steps(out), list_checkpoints(checkpoints_dir(out))
    held = ([f"{steps} logged step(s)"] if steps else []) + ([f"checkpoint {saved[0].name}"] if saved else []) + (
        ["adapter/"] if (out / "adapter").exists() else [])
    return ", ".join(held) or None


def _resume_point(cfg: TrainConfig, out: Path, engine: Engine, identity: dict[str, Any]) -> Path | None:
    """The checkpoint this run continues from (None: a fresh run); refuses incompatible ones and
    output directories that hold another run."""
    if cfg.resume and cfg.overwrite_output_dir:
        raise UserError("--overwrite-output-dir starts the run over and --resume continues it; pass one of them")
    held = _holds_run(out)
    if not cfg.resume:
        if held and not cfg.overwrite_output_dir:
            raise UserError(f"--output-dir {out} already holds a run ({held}); pass --resume auto to continue it, "
                            "--overwrite-output-dir to start over in it (deletes that run), or another --output-dir")
        return None
    path = find_checkpoint(out, cfg.resume, lambda message: say(engine, message))
    if path is None:
        if held:
            raise UserError(f"--resume auto: {out} holds a run ({held}) but no valid checkpoint in "
                            f"{checkpoints_dir(out)}; pass --overwrite-output-dir instead to start over in it "
                            "(deletes that run), or choose another --output-dir")
        return None
    check_compatible(read_state(path), identity, path, dataclasses.asdict(cfg))
    if held and path.resolve().parent != checkpoints_dir(out).resolve():
        raise UserError(f"--output-dir {out} already holds another run; resume into a new directory")
    return path


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one fine-tuning job; returns the evaluations before and after training (before is
    None for a resumed run) and, when SIGTERM/SIGINT stopped it early, the step it stopped at.
    From the start, those signals only ask the loop to save a checkpoint and leave after the current step.
    The output directory is locked (preemption.OutputLock) from the start until the run ends, however it ends."""
    with StopRequest() as stop:
        engine = make_engine(cfg)
        with OutputLock(Path(cfg.output_dir), engine, lambda message: say(engine, message)):
            return _train(cfg, stop, engine)


def _train(cfg: TrainConfig, stop: StopRequest, engine: Engine) -> dict[str, Any]:
    model_path = resolve_model_once(cfg, engine)
    out, identity = Path(cfg.output_dir), run_identity(cfg, data_digest(cfg, engine))
    resume_from = _resume_point(cfg, out, engine, identity)
    data = prepare_data(cfg, engine, model_path)
    recompute = resolve_recompute(cfg, engine)
    model, bank = build_model_and_adapters(cfg, engine, model_path)
    check_vocabulary(model, data, model_path)
    budget = Budget.of(cfg, engine.world_size, len(data.train_set))
    squeeze = parse_squeeze(cfg.squeeze, budget.total_steps, cfg.rank, cfg.squeeze_min_stage,
                            cfg.squeeze_ranks) if cfg.squeeze else None
    checkpoint = restore_adapters(cfg, engine, resume_from, bank, budget.total_steps)
    engine.barrier()  # every rank has checked before the main rank starts writing (shared filesystems)
    open_output_dir(cfg, engine, out, checkpoint)  # every input is valid from here on
    model = attach_and_wrap(cfg, engine, model, bank, recompute)
    if note := unquantized_experts(bank.shapes, cfg):
        say(engine, note)
    loop = TrainingLoop(cfg, engine, model, bank, data, budget, squeeze, out, checkpoint, identity)
    announce(cfg, loop, model_path)
    before = None if checkpoint or cfg.eval_on_start == "false" else loop.evaluate(0)
    if before:
        say(engine, f"before training: {before}")
    stopped_at = loop.run(stop)
    if stopped_at is not None:
        result = {"before": before, "after": None, "steps": budget.total_steps, "stopped_at": stopped_at}
    else:
        after = finish(cfg, loop, model_path, resume_from)
        result = {"before": before, "after": after, "steps": budget.total_steps}
    loop.log.close()
    engine.close()
    return result


def announce(cfg: TrainConfig, loop: TrainingLoop, model_path: str) -> None:
    """One line: method, model, what is adapted, adapter sizes, engine, global batch and step count."""
    engine, bank, budget = loop.engine, loop.bank, loop.budget
    say(engine, f"{cfg.method} on {model_path}: {describe_layers(bank.shapes)}, "
                f"{bank.primary.flat.numel():,} primary + {bank.aux.flat.numel() if bank.aux else 0:,} aux params; "
                f"engine {engine.name} x{engine.world_size}, global batch {cfg.micro_batch_size} x {cfg.grad_accum} "
                f"x {engine.world_size} = {budget.global_batch}, {budget.total_steps} steps")


def restore_adapters(cfg: TrainConfig, engine: Engine, resume_from: Path | None, bank: AdapterBank,
                     total_steps: int) -> Checkpoint | None:
    """The checkpoint resumed from (None: a fresh run), its branches put into `bank`; one line lists the changed
    settings the resume honours (checkpoint.RESUME_POLICY)."""
    if resume_from is None:
        return None
    checkpoint = load_checkpoint(resume_from)
    check_step_budget(checkpoint.state, total_steps, checkpoint.path)
    restore_bank(bank, checkpoint)
    if changes := honoured_changes(resume_from, dataclasses.asdict(cfg)):
        say(engine, describe_changes(changes))
    return checkpoint


_RUN_FILES = ("checkpoints", "metrics.jsonl", ".metrics.jsonl.tmp", "tensorboard", "adapter")


def open_output_dir(cfg: TrainConfig, engine: Engine, out: Path, checkpoint: Checkpoint | None) -> None:
    """The main rank clears what an earlier run left (with --overwrite-output-dir, or the logs of one that stopped
    before its first step), writes the run's configuration (a resume that honours changed settings says so in it)
    and drops metrics rows a resumed run redoes."""
    if not engine.is_main:
        return
    out.mkdir(parents=True, exist_ok=True)
    earlier = (out / "train_config.yaml").read_text() if (out / "train_config.yaml").is_file() else ""
    notes = [line for line in earlier.splitlines() if line.startswith("# resumed")] if checkpoint else []
    if checkpoint and (changes := honoured_changes(checkpoint.path, dataclasses.asdict(cfg))):
        notes.append(f"# resumed at step {checkpoint.step} from {checkpoint.path} with "
                     + ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)
                     + f" (steps 1-{checkpoint.step} ran with the earlier values)")
    if not checkpoint:
        found = [name for name in _RUN_FILES if (out / name).exists()]
        if found:
            say(engine, f"starting afresh in {out}: removing the earlier run's {', '.join(found)}")
        for name in found:
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    (out / "train_config.yaml").write_text(cfg.to_yaml() + "".join(line + "\n" for line in notes))
    if checkpoint:
        truncate_metrics(out, checkpoint.step)


def finish(cfg: TrainConfig, loop: TrainingLoop, model_path: str, resume_from: Path | None) -> dict[str, float]:
    """Evaluate after training, log time, memory and holdings, write the PEFT adapter; the evaluation."""
    engine = loop.engine
    train_s = time.perf_counter() - loop.started
    after = loop.evaluate(loop.budget.total_steps)
    say(engine, f"after training:  {after}")
    peaks = engine.gather_object(engine.peak_memory_bytes())
    dtype = cfg.dtype
    loop.log.write({"step": loop.budget.total_steps, "train_s": train_s,
                    "peak_mem_mb": [round(b / 2**20, 1) for b in peaks], **_holdings(loop, dtype)})
    write_adapter(cfg, loop, model_path, resume_from)
    return after


def write_adapter(cfg: TrainConfig, loop: TrainingLoop, model_path: str, resume_from: Path | None) -> None:
    """The run's PEFT adapter in OUTPUT_DIR/adapter (main rank); TrainingFault on every rank if it cannot be
    written (a full disk), naming the checkpoint to export it from."""
    engine, bank, out = loop.engine, loop.bank, Path(cfg.output_dir) / "adapter"
    problem = None
    if engine.is_main:
        provenance = {"method": cfg.method, "rho": cfg.rho, "rank": cfg.rank, "alpha": cfg.alpha,
                      "aux_rank": cfg.aux_rank if cfg.method == "bilora" else None, "steps": loop.budget.total_steps,
                      "engine": engine.name, "world_size": engine.world_size, "squeeze": cfg.squeeze or None,
                      "quantize": cfg.quantize, "dtype": str(cfg.dtype).removeprefix("torch."),
                      "squeeze_history": loop.squeeze_history,
                      "resumed_from": str(resume_from) if resume_from else None}
        try:
            save_peft_adapter(bank.primary, out,
                              peft_target_modules(cfg.target_modules, [s.name for s in bank.shapes if not s.experts]),
                              cfg.model or model_path, provenance)  # a hub id stays a hub id
            say(engine, f"adapter written to {out}")
        except (OSError, SafetensorError) as exc:
            newest = list_checkpoints(checkpoints_dir(cfg.output_dir))
            problem = (f"cannot write the adapter to {out} ({getattr(exc, 'strerror', None) or exc}); free space, then "
                       + (f"bilora-dist export --checkpoint {newest[0]} --out {out}" if newest else
                          "run again"))
    if (problem := engine.gather_object(problem)[0]) is not None:
        raise TrainingFault(problem)


def _holdings(loop: TrainingLoop, dtype: torch.dtype) -> dict[str, Any]:
    """What every rank holds, measured from the engine: its part of the frozen base, the full adapters,
    their gradient bucket (the bytes of the one all-reduce per step) and the optimizer state."""
    engine, bank = loop.engine, loop.bank
    held, total = engine.held_base_numel(loop.model)
    held_all = engine.gather_object(held)
    bucket = bank.grad_bucket.flat if bank.grad_bucket is not None else torch.empty(0)
    return {"engine": engine.name, "world_size": engine.world_size, "global_batch": loop.budget.global_batch,
            "base_numel": total, "base_held_numel": held_all,
            "base_held_bytes": [h * torch.finfo(dtype).bits // 8 for h in held_all],
            "adapter_numel": sum(b.flat.numel() for b in bank.branches()),
            "adapter_sync_bytes": bucket.numel() * bucket.element_size(),
            "optimizer_state_bytes": sum(t.numel() * t.element_size() for state in loop.optimizer.state.values()
                                         for t in state.values() if torch.is_tensor(t))}


