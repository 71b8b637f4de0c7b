"""Engines: what holds (and possibly shards) the frozen base, and the collectives the loop needs."""

from __future__ import annotations

import os
from typing import Any

import torch

from bilora_dist.engines.base import Engine
from bilora_dist.errors import UserError

__all__ = ["Engine", "check_quantized_zero", "make_engine", "resolve_engine_name"]


def under_deepspeed_launcher() -> bool:
    """The deepspeed launcher exports CROSS_RANK to every process; torchrun does not."""
    return "CROSS_RANK" in os.environ


def resolve_engine_name(engine: str, ds_config: str, world_size: int) -> str:
    """`auto`: deepspeed under the deepspeed launcher or with --ds_config, fsdp under torchrun, else single."""
    if engine != "auto":
        return engine
    if under_deepspeed_launcher() or ds_config:
        return "deepspeed"
    return "fsdp" if world_size > 1 else "single"


def check_quantized_zero(quantize: str, stage: int) -> None:
    """UserError for a quantised base under ZeRO-3, whose partitioning cannot hold bitsandbytes' 4-bit weights."""
    if quantize != "none" and stage == 3:
        raise UserError(f"--quantize {quantize} with ZeRO-3: DeepSpeed cannot partition bitsandbytes 4-bit weights; "
                        "use --engine fsdp, a ZeRO-1/2 --ds_config (replicated base) or --engine single")


def make_engine(cfg: Any) -> Engine:
    """The engine for a TrainConfig, joining the process group the launcher set up."""
    from bilora_dist.config.ds_config import DEFAULT_ZERO3, read_ds_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    name = resolve_engine_name(cfg.engine, cfg.ds_config, world)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls (the adapters')
    dtype = cfg.dtype
    if name == "single":
        if world > 1:
            raise UserError(f"--engine single runs one process, but the launcher started {world}; "
                            "use --engine deepspeed or --engine fsdp")
        return Engine()
    if name == "deepspeed":
        from bilora_dist.engines.deepspeed import DeepSpeedEngine

        ds = read_ds_config(cfg.ds_config) if cfg.ds_config else DEFAULT_ZERO3
        check_quantized_zero(cfg.quantize, ds.get("zero_optimization", {}).get("stage", 0))
        return DeepSpeedEngine(ds, dtype)
    from bilora_dist.engines.fsdp import FSDPEngine

    return FSDPEngine(dtype)
