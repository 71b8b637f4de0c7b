"""DeepSpeed JSON configs as users have them (LLaMA-Factory, axolotl, the transformers docs).

DeepSpeed here only partitions (ZeRO-3) and gathers the frozen base; the adapters, replicated, are
stepped by our AdamW. So a config maps onto the trainer in three ways:

- honoured: batch shape, clipping, precision, ZeRO stage and parameter partitioning/offload, and an
  Adam/AdamW `optimizer` and Warmup* `scheduler` block, which set (or must agree with) our AdamW and
  schedule. `"auto"` keeps the trainer's value (hidden-size ones follow transformers' rules).
- not used: keys about gradient or optimizer partitioning (and DeepSpeed's own logging), which have
  no meaning for a frozen base with replicated adapters; named once in one info line.
- refused: anything that would change training and cannot be honoured, and misspelt keys.

`read_ds_config` checks the file, `ds_updates` gives the trainer's fields it sets, `resolve` gives the
dict that reaches DeepSpeed: only honoured keys, no `"auto"` left.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from bilora_dist.errors import UserError, unknown_key_message

AUTO = "auto"
DEFAULT_ZERO3: dict[str, Any] = {"zero_optimization": {"stage": 3}}

# top level: DeepSpeed key -> TrainConfig field
_TOP_FIELDS = {"train_micro_batch_size_per_gpu": "micro_batch_size", "gradient_accumulation_steps": "grad_accum",
               "gradient_clipping": "max_grad_norm"}
_TOP = {*_TOP_FIELDS, "train_batch_size", "bf16", "fp16", "zero_optimization", "optimizer", "scheduler"}
_TOP_UNUSED = {"zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "wall_clock_breakdown",
               "steps_per_print", "memory_breakdown", "dump_state", "prescale_gradients",
               "gradient_predivide_factor", "communication_data_type", "data_types", "sparse_gradients", "amp",
               "tensorboard", "wandb", "csv_monitor", "comet", "flops_profiler", "comms_logger", "checkpoint"}
_TOP_REFUSED = {"activation_checkpointing": "use --gradient-checkpointing", "curriculum_learning": "",
                "data_efficiency": "", "compression_training": "", "elasticity": "", "pipeline": "",
                "sequence_parallel_size": "", "torch_autocast": "", "compile": "", "autotuning": "",
                "hybrid_engine": "", "progressive_layer_drop": "", "eigenvalue": "", "tensor_parallel": "",
                "quantize_training": "", "weight_quantization": "", "sparse_attention": ""}

# zero_optimization: DeepSpeed's unprefixed field name -> its stage3_ alias (None: no alias)
_ZERO_PARTITIONING = {"param_persistence_threshold": "stage3_param_persistence_threshold",
                      "model_persistence_threshold": "stage3_model_persistence_threshold",
                      "prefetch_bucket_size": "stage3_prefetch_bucket_size",
                      "max_live_parameters": "stage3_max_live_parameters",
                      "max_reuse_distance": "stage3_max_reuse_distance"}
_ZERO = {"stage", "offload_param", *_ZERO_PARTITIONING, *_ZERO_PARTITIONING.values()}
_ZERO_UNUSED = {"overlap_comm", "contiguous_gradients", "reduce_bucket_size", "reduce_scatter", "sub_group_size",
                "allgather_partitions", "allgather_bucket_size", "round_robin_gradients", "offload_optimizer",
                "use_multi_rank_bucket_allreduce", "load_from_fp32_weights", "elastic_checkpoint", "cpu_offload",
                "gather_16bit_weights_on_model_save", "stage3_gather_16bit_weights_on_model_save",
                "stage3_gather_fp16_weights_on_model_save", "ignore_unused_parameters", "legacy_stage1",
                "zero_quantized_gradients", "compute_grad_norm", "log_trace_cache_warnings", "zenflow",
                "save_muon_momentum_buffer_in_memory"}
_OFFLOAD = {"device", "pin_memory"}
_OFFLOAD_UNUSED = {"nvme_path", "buffer_count", "buffer_size", "max_in_cpu"}  # nvme only, which is refused
_OFFLOAD_OPTIMIZER = {"device", "nvme_path", "buffer_count", "pin_memory", "pipeline_read", "pipeline_write",
                      "fast_init", "ratio", "super_offload", "cpuadam_cores_perc"}
_BF16_UNUSED = {"immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads",
                "bf16_optimizer_states"}
_FP16_OFF_UNUSED = {"auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
                    "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads"}

_ADAM_TYPES = {"adam", "adamw", "fusedadam", "cpuadam", "deepspeedcpuadam"}
_ADAM_PARAMS = {"lr": "lr", "eps": "adam_epsilon", "weight_decay": "weight_decay"}  # + betas
_ADAM_UNUSED = {"torch_adam", "fused"}  # kernel choices
_SCHEDULERS = {"warmuplr": "constant", "warmupdecaylr": "linear", "warmupcosinelr": "cosine"}
_SCHEDULER_PARAMS = {"warmuplr": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                                  "last_batch_iteration"},
                     "warmupdecaylr": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                                       "total_num_steps", "last_batch_iteration"},
                     "warmupcosinelr": {"warmup_min_ratio", "cos_min_ratio", "warmup_num_steps", "warmup_type",
                                        "total_num_steps", "last_batch_iteration"}}
# scheduler params with one honoured value: key -> (DeepSpeed's default, the value we honour)
_SCHEDULER_FIXED = {"warmup_min_lr": (0, 0), "warmup_min_ratio": (0, 0), "cos_min_ratio": (0.0001, 0),
                    "last_batch_iteration": (-1, -1)}
# a ds value for the first field cannot stand beside an explicit value of the second
_SHADOWS = {"max_steps": "epochs", "warmup_steps": "warmup_ratio"}


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def read_ds_config(path: str) -> dict[str, Any]:
    """The parsed config, every key checked: honoured, not used, or a one-line error naming it."""
    if not Path(path).is_file():
        raise UserError(f"--ds_config: file not found: {path}")
    try:
        ds = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"--ds_config {path}: malformed JSON at line {exc.lineno} ({exc.msg})") from None
    if not isinstance(ds, dict):
        raise UserError(f"--ds_config {path}: expected a JSON object of DeepSpeed keys, got a JSON "
                        f"{_JSON_KINDS.get(type(ds), type(ds).__name__)}")
    _check(path, "", ds, _TOP | _TOP_UNUSED, refused=_TOP_REFUSED)
    zero = _section(path, ds, "zero_optimization")
    _check(path, "zero_optimization", zero, _ZERO | _ZERO_UNUSED, deepspeed_names=_zero_field_names)
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise UserError(f"--ds_config {path}: zero_optimization.stage must be 0-3, got {zero.get('stage')!r}")
    offload = _section(path, zero, "offload_param", "zero_optimization.")
    _check(path, "zero_optimization.offload_param", offload, _OFFLOAD | _OFFLOAD_UNUSED)
    if offload.get("device", "none") not in ("cpu", "none"):
        raise UserError(f"--ds_config {path}: zero_optimization.offload_param.device {offload['device']!r} "
                        "cannot be honoured (cpu or none; nvme offload is not supported)")
    _check(path, "zero_optimization.offload_optimizer", _section(path, zero, "offload_optimizer", "zero_optimization."),
           _OFFLOAD_OPTIMIZER)
    _check(path, "bf16", _section(path, ds, "bf16"), {"enabled"} | _BF16_UNUSED)
    fp16 = _section(path, ds, "fp16")
    _check(path, "fp16", fp16, {"enabled"} | _FP16_OFF_UNUSED)
    for section in ("fp16", "amp"):
        if _section(path, ds, section).get("enabled") is True:
            raise UserError(f"--ds_config {path}: {section}.enabled true cannot be honoured: fp16 is not "
                            "supported, use bf16")
    _check_optimizer(path, _section(path, ds, "optimizer"))
    _check_scheduler(path, _section(path, ds, "scheduler"))
    _zero_options(path, zero)  # prefixed and unprefixed forms must agree
    return ds


def unused_keys(ds: dict[str, Any]) -> list[str]:
    """The keys of `ds` that have no meaning for a frozen base with replicated adapters, as dotted paths."""
    zero = ds.get("zero_optimization", {})
    keys = [k for k in ds if k in _TOP_UNUSED] + [f"zero_optimization.{k}" for k in zero if k in _ZERO_UNUSED]
    keys += [f"zero_optimization.offload_param.{k}" for k in zero.get("offload_param", {}) if k in _OFFLOAD_UNUSED]
    keys += [f"bf16.{k}" for k in ds.get("bf16", {}) if k in _BF16_UNUSED]
    keys += [f"fp16.{k}" for k in ds.get("fp16", {}) if k in _FP16_OFF_UNUSED]
    keys += [f"optimizer.params.{k}" for k in ds.get("optimizer", {}).get("params", {}) if k in _ADAM_UNUSED]
    return keys


def unused_line(ds: dict[str, Any]) -> str | None:
    """The one info line naming the keys that are accepted but not used (None when there are none)."""
    keys = unused_keys(ds)
    return ("ds_config: not used with a frozen base and replicated adapters (gradient/optimizer partitioning, "
            f"DeepSpeed's own logging): {', '.join(keys)}") if keys else None


def ds_updates(current: Mapping[str, Any], ds: dict[str, Any], path: str,
               explicit: dict[str, str]) -> dict[str, Any]:
    """The trainer fields the ds_config sets, as {field: value}, given the `current` field values.
    `explicit` maps each field given explicitly (flag or --config YAML) to how it was given, e.g.
    {"micro_batch_size": "--micro-batch-size"}: a ds value that differs from an explicit one is an error
    naming both, over a default it wins, and "auto" keeps the trainer's value."""
    current_values = dict(current)
    updates: dict[str, tuple[str, Any]] = {}  # field -> (ds key, value)

    def take(field: str, key: str, value: Any) -> None:
        if value == AUTO:
            return
        current, shadowed = current_values[field], _SHADOWS.get(field)
        if shadowed in explicit:
            raise UserError(f"{explicit[shadowed]} {_show(current_values[shadowed])} conflicts with --ds_config "
                            f"{path} {key} {_show(value)}; give one of them")
        if field in explicit and value != current:
            raise UserError(f"{explicit[field]} {_show(current)} disagrees with --ds_config {path} {key} "
                            f"{_show(value)}")
        if field in updates and updates[field][1] != value:
            raise UserError(f"--ds_config {path}: {updates[field][0]} {_show(updates[field][1])} disagrees with "
                            f"{key} {_show(value)}")
        updates[field] = (key, value)

    for key, field in _TOP_FIELDS.items():
        if key in ds:
            take(field, key, _number(path, key, ds[key], integer=field != "max_grad_norm"))
    if "bf16" in ds and "enabled" in ds["bf16"]:
        enabled = _flag(path, "bf16.enabled", ds["bf16"]["enabled"])
        take("bf16", "bf16.enabled", enabled if enabled == AUTO else str(enabled).lower())
    _merge_optimizer(path, ds.get("optimizer", {}).get("params", {}), take)
    _merge_scheduler(path, ds.get("scheduler", {}), take)
    merged = {**current_values, **{field: value for field, (_, value) in updates.items()}}
    total = ds.get("train_batch_size", AUTO)
    if total != AUTO:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        micro, accum = merged["micro_batch_size"], merged["grad_accum"]
        if total != micro * accum * world:
            raise UserError(f"--ds_config {path}: train_batch_size {total} != micro {micro} x "
                            f"accum {accum} x world {world}")
    return {field: value for field, (_, value) in updates.items()}


def resolve(ds: dict[str, Any], bf16: bool, hidden_size: int) -> dict[str, Any]:
    """The config DeepSpeed receives: the ZeRO stage and parameter partitioning/offload keys (under
    DeepSpeed's unprefixed names, `"auto"` resolved from the hidden size as transformers does) and the
    precision. Batch, accumulation, clipping, optimizer and schedule are the trainer's (`ds_updates`);
    DeepSpeed only needs a placeholder batch size to accept the config."""
    zero = ds.get("zero_optimization", {})
    resolved: dict[str, Any] = {"stage": zero.get("stage", 0)}
    auto = {"prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "param_persistence_threshold": 10 * hidden_size}
    for name, value in _zero_options("", zero).items():
        resolved[name] = auto[name] if value == AUTO and name in auto else value
        if resolved[name] == AUTO:
            raise UserError(f"ds_config: zero_optimization.{name} \"auto\" has no value to take; give a number")
    if zero.get("offload_param", {}).get("device", "none") == "cpu":
        resolved["offload_param"] = {"device": "cpu", "pin_memory": bool(zero["offload_param"].get("pin_memory",
                                                                                                     False))}
    return {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": bf16}, "fp16": {"enabled": False},
            "zero_optimization": resolved}


def hidden_size_of(model_config: Any) -> int:
    """The hidden size transformers' DeepSpeed integration uses for the hidden-size `"auto"` keys."""
    for config in (model_config, getattr(model_config, "text_config", None)):
        if getattr(config, "hidden_size", None):
            return config.hidden_size
        if getattr(config, "hidden_sizes", None):
            return max(config.hidden_sizes)
    raise UserError("ds_config: the model config has no hidden_size for the hidden-size \"auto\" keys "
                    "(stage3_prefetch_bucket_size, stage3_param_persistence_threshold); give numbers")


def _zero_options(path: str, zero: dict[str, Any]) -> dict[str, Any]:
    """The parameter-partitioning options under DeepSpeed's unprefixed names, whichever form was written."""
    options = {}
    for name, alias in _ZERO_PARTITIONING.items():
        given = [(k, zero[k]) for k in (name, alias) if k in zero]
        if len(given) == 2 and given[0][1] != given[1][1]:
            raise UserError(f"--ds_config {path}: zero_optimization.{name} {given[0][1]} disagrees with "
                            f"zero_optimization.{alias} {given[1][1]}")
        if given:
            value = given[0][1]
            options[name] = value if value == AUTO else _number(path, f"zero_optimization.{given[0][0]}", value,
                                                               integer=True, minimum=0)
    return options


def _merge_optimizer(path: str, params: dict[str, Any], take: Any) -> None:
    for key, field in _ADAM_PARAMS.items():
        if key in params:
            take(field, f"optimizer.params.{key}", _number(path, f"optimizer.params.{key}", params[key]))
    betas = params.get("betas", AUTO)
    if betas != AUTO:
        if not (isinstance(betas, list) and len(betas) == 2):
            raise UserError(f"--ds_config {path}: optimizer.params.betas must be [beta1, beta2] or \"auto\"")
        take("adam_beta1", "optimizer.params.betas[0]", _number(path, "optimizer.params.betas", betas[0]))
        take("adam_beta2", "optimizer.params.betas[1]", _number(path, "optimizer.params.betas", betas[1]))


def _merge_scheduler(path: str, scheduler: dict[str, Any], take: Any) -> None:
    if not scheduler:
        return
    kind, params = scheduler["type"].lower(), scheduler.get("params", {})
    take("scheduler", "scheduler.type", _SCHEDULERS[kind])
    take("warmup_type", "scheduler.params.warmup_type" + ("" if "warmup_type" in params else " (DeepSpeed default)"),
         params.get("warmup_type", "log"))
    if "warmup_num_steps" in params:
        take("warmup_steps", "scheduler.params.warmup_num_steps",
             _number(path, "scheduler.params.warmup_num_steps", params["warmup_num_steps"], integer=True))
    if "warmup_max_lr" in params:
        take("lr", "scheduler.params.warmup_max_lr", _number(path, "scheduler.params.warmup_max_lr",
                                                             params["warmup_max_lr"]))
    if "total_num_steps" in params:
        take("max_steps", "scheduler.params.total_num_steps",
             _number(path, "scheduler.params.total_num_steps", params["total_num_steps"], integer=True))


def _check_optimizer(path: str, optimizer: dict[str, Any]) -> None:
    if not optimizer:
        return
    _, params = _typed_block(path, "optimizer", optimizer, _ADAM_TYPES,
                             ": the adapters are stepped by AdamW (Adam, AdamW, FusedAdam, CPUAdam map onto it)")
    _check(path, "optimizer.params", params, {*_ADAM_PARAMS, "betas", "adam_w_mode", "bias_correction", "amsgrad",
                                              *_ADAM_UNUSED})
    for key, honoured in (("adam_w_mode", True), ("bias_correction", True), ("amsgrad", False)):
        if params.get(key, honoured) != honoured:
            raise UserError(f"--ds_config {path}: optimizer.params.{key} {_show(params[key])} cannot be honoured "
                            f"(AdamW with {key} {_show(honoured)})")


def _check_scheduler(path: str, scheduler: dict[str, Any]) -> None:
    if not scheduler:
        return
    kind, params = _typed_block(path, "scheduler", scheduler, set(_SCHEDULERS),
                                " (WarmupLR, WarmupDecayLR and WarmupCosineLR map onto --scheduler constant, linear, "
                                "cosine)")
    known = _SCHEDULER_PARAMS[kind]
    _check(path, "scheduler.params", params, known)
    for key, (default, honoured) in _SCHEDULER_FIXED.items():
        value = params.get(key, default)
        if key in known and value != honoured and not (key == "warmup_min_lr" and value == AUTO):
            raise UserError(f"--ds_config {path}: scheduler.params.{key} {_show(value)}"
                            f"{' (DeepSpeed default)' if key not in params else ''} cannot be honoured: "
                            f"only {honoured} (our schedules warm up from 0 and decay to 0)")
    if params.get("warmup_type", "log") not in ("log", "linear"):
        raise UserError(f"--ds_config {path}: scheduler.params.warmup_type {params['warmup_type']!r} cannot be "
                        "honoured (log or linear)")


def _typed_block(path: str, name: str, block: dict[str, Any], kinds: set[str],
                 why: str) -> tuple[str, dict[str, Any]]:
    """The lower-cased `type` and the `params` of an optimizer/scheduler block; one line if the type is not one of
    `kinds` (lower case)."""
    _check(path, name, block, {"type", "params"})
    kind = str(block.get("type", ""))
    if kind.lower() not in kinds:
        raise UserError(f"--ds_config {path}: {name}.type {kind!r} cannot be honoured{why}")
    return kind.lower(), _section(path, block, "params", f"{name}.")


def _check(path: str, where: str, values: dict[str, Any], known: set[str], refused: dict[str, str] | None = None,
           deepspeed_names: Any = None) -> None:
    """Every key of `values` is known; a key DeepSpeed has but we cannot honour, or a misspelt one, is an error."""
    for key in values:
        if key in known:
            continue
        real = set(refused or {}) | (deepspeed_names() if deepspeed_names else set())
        if key in real:
            why = (refused or {}).get(key)
            raise UserError(f"--ds_config {path}: '{where + '.' if where else ''}{key}' cannot be honoured by bilora_dist"
                            f"{f' ({why})' if why else ''}")
        raise UserError(f"--ds_config {path}: {where + ': ' if where else ''}"
                        f"{unknown_key_message(key, sorted(known | real))}")


def _zero_field_names() -> set[str]:
    """Every zero_optimization key the installed DeepSpeed knows (field names and stage3_ aliases)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {n for name, f in DeepSpeedZeroConfig.model_fields.items() for n in (name, f.alias) if n}


def _section(path: str, parent: dict[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
    value = parent.get(key, {})
    if not isinstance(value, dict):
        raise UserError(f"--ds_config {path}: '{prefix}{key}' must be an object")
    return value


def _number(path: str, key: str, value: Any, integer: bool = False, minimum: float | None = None) -> Any:
    """A finite JSON number (or "auto"; Python's json reads NaN and Infinity); 1e9 written as a float counts as an
    integer."""
    if value == AUTO:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)) or (
            integer and not float(value).is_integer()) or (minimum is not None and value < minimum):
        kind = "an integer" if integer else "a finite number"
        raise UserError(f"--ds_config {path}: {key} must be {kind}{f' >= {minimum}' if minimum is not None else ''}"
                        f" or \"auto\", got {_show(value)}")
    return int(value) if integer else value


def _flag(path: str, key: str, value: Any) -> Any:
    if value != AUTO and not isinstance(value, bool):
        raise UserError(f"--ds_config {path}: {key} must be true, false or \"auto\", got {_show(value)}")
    return value


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (bool, list)) else str(value)
