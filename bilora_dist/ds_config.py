"""DeepSpeed JSON configs: which keys the trainer honours, and how they map onto TrainConfig.

DeepSpeed here only partitions (ZeRO-3) and gathers the frozen base; the adapters are stepped by
our optimizer. A key that would need DeepSpeed's optimizer or scheduler cannot be honoured and is
rejected by name rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from bilora_dist.errors import UserError

_TOP = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "bf16", "fp16",
        "zero_optimization", "train_batch_size"}
_ZERO = {"stage", "offload_param", "stage3_param_persistence_threshold", "stage3_prefetch_bucket_size",
         "stage3_max_live_parameters", "stage3_max_reuse_distance"}
_OFFLOAD = {"device", "pin_memory"}
_FLAGS = {"train_micro_batch_size_per_gpu": "micro_batch_size", "gradient_accumulation_steps": "grad_accum",
          "gradient_clipping": "max_grad_norm"}

DEFAULT_ZERO3: dict[str, Any] = {"zero_optimization": {"stage": 3}}


def _check_keys(where: str, values: Any, allowed: set[str], path: str) -> None:
    if not isinstance(values, dict):
        raise UserError(f"--ds_config {path}: '{where}' must be an object")
    for key in values:
        if key not in allowed:
            raise UserError(f"--ds_config {path}: key '{where + '.' if where else ''}{key}' is not honoured by "
                            f"bilora_dist (honoured: {', '.join(sorted(allowed))})")


def read_ds_config(path: str) -> dict[str, Any]:
    """The parsed config, with every key checked against what the trainer honours."""
    if not Path(path).is_file():
        raise UserError(f"--ds_config: file not found: {path}")
    try:
        ds = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"--ds_config {path}: malformed JSON at line {exc.lineno} ({exc.msg})") from None
    _check_keys("", ds, _TOP, path)
    zero = ds.get("zero_optimization", {})
    _check_keys("zero_optimization", zero, _ZERO, path)
    _check_keys("zero_optimization.offload_param", zero.get("offload_param", {}), _OFFLOAD, path)
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise UserError(f"--ds_config {path}: zero_optimization.stage must be 0-3, got {zero.get('stage')}")
    if zero.get("offload_param", {}).get("device", "none") not in ("cpu", "none"):
        raise UserError(f"--ds_config {path}: zero_optimization.offload_param.device must be cpu or none")
    for section in ("bf16", "fp16"):
        _check_keys(section, ds.get(section, {}), {"enabled"}, path)
    if ds.get("fp16", {}).get("enabled") is True:
        raise UserError(f"--ds_config {path}: fp16.enabled: fp16 is not supported, use bf16")
    return ds


def merge_into(cfg: Any, ds: dict[str, Any], path: str) -> Any:
    """TrainConfig with the ds_config's batch, clipping and precision values (`auto` keeps the flag's)."""
    updates = {flag: ds[key] for key, flag in _FLAGS.items() if key in ds and ds[key] != "auto"}
    if ds.get("bf16", {}).get("enabled") is True:
        updates["bf16"] = True
    merged = dataclasses.replace(cfg, **updates)
    total = ds.get("train_batch_size", "auto")
    if total != "auto":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if total != merged.micro_batch_size * merged.grad_accum * world:
            raise UserError(f"--ds_config {path}: train_batch_size {total} != micro {merged.micro_batch_size} x "
                            f"accum {merged.grad_accum} x world {world}")
    return merged
