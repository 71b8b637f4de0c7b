"""The training loop of one run: each optimizer step, then its non-finite guard, squeeze event, metrics row,
replica check, stop request, checkpoint and evaluation, in that order.

A step skipped for a non-finite loss or gradient (methods.py) still consumes its batch and its place in the
learning-rate schedule; `--max-bad-steps` of them in a row stop the run. A checkpoint that cannot be written
stops it too, or with `--on-save-error continue` is tried again at the next save.

The loop talks to the engine only through `Engine`'s methods and to the adapters only through the
bank; which engine shards the base is invisible here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers import get_scheduler
from transformers.utils.generic import is_flash_attention_requested

from bilora_dist.adapters.bank import AdapterBank
from bilora_dist.checkpoint.store import Checkpoint, checkpoints_dir, list_checkpoints, save_checkpoint, set_rng_state
from bilora_dist.config.train import TrainConfig
from bilora_dist.data import BatchPlan, collate, collate_packed, ids_and_labels, to_device
from bilora_dist.engines import Engine
from bilora_dist.errors import TrainingFault
from bilora_dist.training.evaluation import ChoiceTask, evaluate
from bilora_dist.training.methods import METHOD_STEPS, StepStats, build_optimizer
from bilora_dist.training.metrics import MetricsLog
from bilora_dist.checkpoint.preemption import StopRequest
from bilora_dist.squeeze.branch import kept_energy_summary
from bilora_dist.squeeze.schedule import SqueezeSchedule, apply_rank_change

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
    if cfg.aux_schedule == "constant" and len(scheduler.lr_lambdas) > 1:  # Bi-LoRA's auxiliary: warmup only

        def warmup_only(during: Callable[[int], float]) -> Callable[[int], float]:
            return lambda step: during(step) if step < warmup else 1.0

        scheduler.lr_lambdas[1] = warmup_only(scheduler.lr_lambdas[1])
    return scheduler


def say(engine: Engine, message: str) -> None:
    """Print `message` once (main rank), above the progress bar."""
    if engine.is_main:
        tqdm.write(message)


@dataclass(frozen=True)
class RunData:
    """What the loop reads: tokenized training and held-out examples, the held-out task, the pad id."""

    train_set: Any
    eval_set: Any
    task: ChoiceTask | None
    pad_id: int


@dataclass(frozen=True)
class Budget:
    """The run's length: examples per optimizer step over all ranks and the number of steps."""

    global_batch: int
    total_steps: int

    @classmethod
    def of(cls, cfg: TrainConfig, world_size: int, n_examples: int) -> Budget:
        """--max-steps, or --epochs passes over `n_examples` at the global batch of `world_size` ranks."""
        global_batch = cfg.micro_batch_size * cfg.grad_accum * world_size
        return cls(global_batch, cfg.max_steps or math.ceil(cfg.epochs * n_examples / global_batch))


@dataclass(frozen=True)
class StepTokens:
    """The tokens of one optimizer step's micro-batches over all ranks: the examples' own, and all with padding."""

    real: int
    total: int

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real / self.total


def check_replicas(engine: Engine, bank: AdapterBank, step: int) -> list[str]:
    """Every rank's adapter digest (short form); raises if any two ranks differ."""
    digests = engine.gather_object(bank.digest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"adapter replicas diverged at step {step}: " + ", ".join(d[:16] for d in digests))
    return [d[:16] for d in digests]


class TrainingLoop:
    """Optimizer, schedule, method step, batch plan and metrics of one run, restored from `checkpoint`."""

    def __init__(self, cfg: TrainConfig, engine: Engine, model: torch.nn.Module, bank: AdapterBank, data: RunData,
                 budget: Budget, squeeze: SqueezeSchedule | None, out: Path, checkpoint: Checkpoint | None,
                 identity: dict[str, Any]):
        self.cfg, self.engine, self.model, self.bank, self.data, self.budget = cfg, engine, model, bank, data, budget
        self.squeeze, self.out, self.identity = squeeze, out, identity
        self.squeeze_at = dict(squeeze.events) if squeeze else {}
        self.optimizer = build_optimizer(bank, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
                                         cfg.adam_epsilon, cfg.aux_lr_scale)
        self.scheduler = build_scheduler(cfg, self.optimizer, budget.total_steps)
        self.start_step, start_example, self.squeeze_history = 0, 0, []
        self.started = 0.0  # when `run` began its first step (perf_counter)
        self.bad_steps = 0  # consecutive steps skipped by the non-finite guard
        if checkpoint:
            start_example = self._restore(checkpoint)
        self.step_fn = METHOD_STEPS[cfg.method].from_config(model, bank, self.optimizer, engine, cfg)
        self.plan = BatchPlan(len(data.train_set), budget.global_batch, cfg.seed, self.start_step, start_example)
        self.log = MetricsLog(out, engine.is_main)

    def _restore(self, checkpoint: Checkpoint) -> int:
        """Optimizer, schedule, RNG and position of the checkpoint; returns the examples consumed."""
        settings = [{k: v for k, v in group.items() if k not in ("params", "lr")}
                    for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(checkpoint.optimizer)  # replaces the param_groups list
        self.scheduler.load_state_dict(checkpoint.scheduler)
        groups = self.optimizer.param_groups
        # this run's settings (RESUME_POLICY honours a changed lr, aux lr scale, schedule, decay, betas, epsilon) and
        # the method's direction, not the saved ones; the schedule continues at the saved step from this run's peak.
        # Unchanged settings give back exactly the saved learning rates (LambdaLR computes them the same way).
        for group, own in zip(groups, settings):
            group.update(own)
        self.scheduler.base_lrs = [own["initial_lr"] for own in settings]
        for group, base, factor in zip(groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in groups]
        engine = self.engine
        set_rng_state(checkpoint.rng[engine.rank if len(checkpoint.rng) == engine.world_size else 0])
        self.start_step, self.squeeze_history = checkpoint.step, checkpoint.state["squeeze_history"]
        state = checkpoint.state
        say(engine, f"resuming from {checkpoint.path} (step {self.start_step}, example {state['consumed']}, "
                    f"saved by {state['world_size']} rank(s), global batch {state['global_batch']})")
        return state["consumed"]

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out evaluation, written to the metrics as the row of `step`."""
        d = self.data
        result = evaluate(self.model, self.bank, d.eval_set, d.task, self.engine, self.cfg.eval_batch_size, d.pad_id)
        self.log.write({"step": step, **result})
        return result

    def save(self, step: int) -> Path | None:
        """A resumable checkpoint after `step` optimizer steps; None if it could not be written and the run goes
        on (`--on-save-error continue`)."""
        state = {"step": step, "consumed": self.plan.consumed(step), "total_steps": self.budget.total_steps,
                 "global_batch": self.budget.global_batch, "world_size": self.engine.world_size,
                 "squeeze_history": self.squeeze_history, "identity": self.identity}
        try:
            return save_checkpoint(self.out, state, self.bank, self.optimizer, self.scheduler, self.cfg.to_yaml(),
                                   self.engine, self.cfg.keep_last)
        except TrainingFault as fault:
            if self.cfg.on_save_error == "stop":
                raise
            say(self.engine, f"warning: {fault}; training goes on (--on-save-error continue)")
            self.log.write({"step": step, "save_error": str(fault)})
            return None

    def guard(self, done: int, stats: StepStats) -> dict[str, Any]:
        """The metrics fields of a step the non-finite guard skipped (one warning line each); at --max-bad-steps
        skips in a row, TrainingFault on every rank (all see the same reduced values)."""
        if not stats.skipped:
            self.bad_steps = 0
            return {}
        self.bad_steps += 1
        first, limit = done - self.bad_steps + 1, self.cfg.max_bad_steps
        if self.bad_steps >= limit:
            self.log.write({"step": done, "skipped": stats.skipped, "bad_steps": self.bad_steps})
            newest = list_checkpoints(checkpoints_dir(self.out))
            raise TrainingFault(
                f"steps {first}-{done}: {self.bad_steps} in a row skipped for a non-finite loss or gradient "
                f"(--max-bad-steps {limit}), last: {stats.skipped}; the adapters are unchanged since step {first - 1} "
                f"and the newest checkpoint is {newest[0] if newest else 'none'}; lower --lr or check the data")
        say(self.engine, f"warning: step {done} skipped ({stats.skipped}): no update; {self.bad_steps} in a row "
                         f"(the run stops at --max-bad-steps {limit})")
        return {"skipped": stats.skipped, "bad_steps": self.bad_steps}

    def step(self, step: int) -> tuple[StepStats, float, StepTokens, float]:
        """Optimizer step `step` (0-based) on this rank's micro-batches: (stats, lr, the step's tokens over all
        ranks, start time)."""
        engine, pad_id = self.engine, self.data.pad_id
        micro = [[self.data.train_set[i] for i in mb]
                 for mb in self.plan.micro_batches(step, engine.rank, engine.world_size, self.cfg.grad_accum)]
        if self.cfg.packing:  # flash attention reads packed sequences only from a batch of one row
            seq_len = None if is_flash_attention_requested(self.model.config) else self.cfg.seq_len
            batches = [collate_packed(examples, seq_len, pad_id) for examples in micro]
        else:
            batches = [collate(examples, pad_id) for examples in micro]
        counts = torch.tensor([sum(len(ids_and_labels(e)[0]) for examples in micro for e in examples),
                               sum(b["input_ids"].numel() for b in batches)], device=engine.device)
        engine.all_reduce_sum_(counts)
        batches = [to_device(b, engine.device) for b in batches]
        t0 = time.perf_counter()
        stats = self.step_fn(batches, step)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return stats, lr, StepTokens(int(counts[0]), int(counts[1])), t0

    def squeeze_event(self, done: int) -> dict[str, Any]:
        """The rank change due after `done` steps, if any (the bank re-binds its gradient bucket); its row."""
        if done not in self.squeeze_at:
            return {}
        assert self.squeeze is not None
        reports = apply_rank_change(self.bank, self.squeeze_at[done], self.optimizer, self.engine,
                                    self.cfg.squeeze_optimizer, self.cfg.squeeze_aux)
        event = {"step": done, "mode": self.squeeze.mode, "rank": self.squeeze_at[done], **kept_energy_summary(reports)}
        self.squeeze_history.append(event)
        return {"squeeze_rank": event["rank"], "kept_energy": event["kept_energy_mean"],
                "kept_energy_min": event["kept_energy_min"]}

    def progress(self, done: int, stats: StepStats, lr: float, seen: StepTokens, t0: float) -> dict[str, Any]:
        """The loss/lr/throughput fields of the metrics row after `done` steps, when due: tokens_per_s counts the
        examples' own tokens, padding_fraction is the share of pad tokens in the step's micro-batches."""
        if done % self.cfg.log_every and done != self.budget.total_steps:
            return {}
        now = time.perf_counter()
        row = {"loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm, "rank": max(self.bank.primary.ranks),
               "tokens_per_s": seen.real / (now - t0), "padding_fraction": seen.padding_fraction,
               "elapsed_s": now - self.started}
        if stats.aux_norm is not None:
            row["aux_norm"] = stats.aux_norm
        return row

    def run(self, stop: StopRequest) -> int | None:
        """Steps from the start step to the budget; returns the step a stop request ended the run at, if any."""
        cfg, total = self.cfg, self.budget.total_steps
        self.started = time.perf_counter()
        for step in tqdm(range(self.start_step, total), desc=cfg.method, disable=not self.engine.is_main,
                         dynamic_ncols=True, initial=self.start_step, total=total):
            done, (stats, lr, seen, t0) = step + 1, self.step(step)
            last = done == total
            row = {**self.guard(done, stats), **self.squeeze_event(done), **self.progress(done, stats, lr, seen, t0),
                   **(stats.diagnostics or {})}
            if cfg.replica_check_every and (done % cfg.replica_check_every == 0 or last):
                row["adapter_sha256"] = check_replicas(self.engine, self.bank, done)
            stopping = stop.agreed(self.engine)
            if stopping:
                row["stopped_by"] = stop.received or "signal on another rank"
            if row:
                self.log.write({"step": done, **row})
            if last or stopping or (cfg.save_every and done % cfg.save_every == 0):
                saved = self.save(done)
                if stopping:
                    say(self.engine, f"stopped by {row['stopped_by']} after step {done}; checkpoint "
                                     f"{saved or 'not written'}; continue with --resume auto")
                    return done
            if cfg.eval_every and done % cfg.eval_every == 0 and not last:
                self.evaluate(done)
        return None
