"""The memory plan of a configured run, from its model's config alone (built on the meta device): what
`--dry-run` prints and what `--gradient-checkpointing auto` chooses from."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from torch import nn

from bilora_dist.memory.activations import ActivationTrace, meta_bank, trace_activations
from bilora_dist.adapters import layer_shapes, select_targets
from bilora_dist.adapters.bank import LayerShape
from bilora_dist.adapters.inject import check_rank
from bilora_dist.config.train import TrainConfig
from bilora_dist.engines import check_quantized_zero, resolve_engine_name
from bilora_dist.errors import UserError
from bilora_dist.memory.plan import (DEFAULT_MAX_LIVE, DEFAULT_PERSISTENCE_THRESHOLD, DEFAULT_PREFETCH_BUCKET,
                                     DEFAULT_REUSE_DISTANCE, RankPlan, micro_batch_transients, plan_memory)
from bilora_dist.model.loading import LoadOptions, build_on_meta, resolve_model


@dataclass
class RunPlan:
    """A run's model (on meta), adapter shapes, engine kind and traced micro-batch; plans for any checkpointing."""

    cfg: TrainConfig
    model: nn.Module
    shapes: list[LayerShape]
    kind: str  # single, replicated (ZeRO-1/2), zero3 or fsdp
    world: int
    persistence_threshold: int
    adapter_numel: int
    trace: ActivationTrace
    reuse_distance: int = DEFAULT_REUSE_DISTANCE  # ZeRO-3's max_reuse_distance, prefetch_bucket_size and
    prefetch_bucket: int = DEFAULT_PREFETCH_BUCKET  # max_live_parameters, as the ds_config resolves them
    max_live: int = DEFAULT_MAX_LIVE

    @property
    def blocks(self) -> int:
        return self.trace.blocks

    def ranks(self, recomputed: Collection[int]) -> list[RankPlan]:
        """Every rank's plan with the decoder blocks `recomputed` checkpointed."""
        cfg = self.cfg
        transients = micro_batch_transients(self.model, self.trace, cfg.micro_batch_size * cfg.seq_len, recomputed,
                                            cfg.loss_chunk, cfg.quantize == "4bit")
        return plan_memory(self.model, self.adapter_numel, self.kind, self.world, self.persistence_threshold,
                           cfg.quantize == "4bit", transients, self.reuse_distance, self.prefetch_bucket,
                           self.max_live)

    def peak_bytes(self, recomputed: Collection[int]) -> int:
        return max(p.peak_bytes for p in self.ranks(recomputed))


def build_run_plan(cfg: TrainConfig, world: int) -> RunPlan:
    """The plan of `cfg` on `world` ranks; its engine as the run would resolve it."""
    from bilora_dist.config.ds_config import DEFAULT_ZERO3, hidden_size_of, read_ds_config, resolve

    name = resolve_engine_name(cfg.engine, cfg.ds_config, world)
    if name == "single" and world > 1:
        raise UserError(f"--engine single runs one process; a plan for {world} ranks needs deepspeed or fsdp")
    model = build_on_meta(resolve_model(cfg.model), LoadOptions(cfg.dtype))
    zero = resolve(read_ds_config(cfg.ds_config) if cfg.ds_config else DEFAULT_ZERO3, cfg.bf16 == "true",
                   hidden_size_of(model.config))["zero_optimization"]
    kind = {"single": "single", "fsdp": "fsdp"}.get(name, "zero3" if zero["stage"] == 3 else "replicated")
    if kind == "zero3":
        check_quantized_zero(cfg.quantize, 3)
    shapes = layer_shapes(model, select_targets(model, cfg.target_modules))
    check_rank(shapes, cfg.rank, "--rank")
    aux_rank = cfg.aux_rank if cfg.method == "bilora" else None
    if aux_rank:
        check_rank(shapes, aux_rank, "--aux-rank")
    bank = meta_bank(shapes, cfg.rank, aux_rank)
    trace = trace_activations(model, bank, cfg.micro_batch_size, cfg.seq_len, cfg.attn_implementation)
    return RunPlan(cfg, model, shapes, kind, world, zero.get("param_persistence_threshold",
                                                              DEFAULT_PERSISTENCE_THRESHOLD),
                   sum(s.numel(cfg.rank + (aux_rank or 0)) for s in shapes), trace,
                   zero.get("max_reuse_distance", DEFAULT_REUSE_DISTANCE),
                   zero.get("prefetch_bucket_size", DEFAULT_PREFETCH_BUCKET),
                   zero.get("max_live_parameters", DEFAULT_MAX_LIVE))
