"""Training configuration: one dataclass, filled from defaults < YAML file < command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import re
import math
import operator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from bilora_dist.config.ds_config import ds_updates, read_ds_config
from bilora_dist.errors import OneLineParser, UserError, unknown_key_message

METHODS = ("lora", "bilora", "lora-sam")
ENGINES = ("auto", "single", "deepspeed", "fsdp")
SCHEDULERS = ("cosine", "linear", "constant")
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention", "packed")
DEFAULT_RHO = {"bilora": 0.05, "lora-sam": 0.01, "lora": 0.0}


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Every knob of a run. Flag `--foo-bar` and YAML key `foo_bar` set field `foo_bar`."""

    model: str = _opt("", "HF hub id or local directory (default: embedded SmolLM2-135M-Instruct)")
    data: str = _opt("", ".jsonl/.json/.parquet/.csv file, saved datasets dir, or NAME[:SPLIT] of a dataset in the "
                         "local HF cache (default: embedded task)")
    eval_data: str = _opt("", "held-out data, same forms (default: embedded held-out split)")
    data_format: str = _opt("auto", "record format of --data and --eval-data (auto: read from the columns)",
                            choices=("auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"))
    train_on_prompt: bool = _opt(False, "loss on every token, prompt and user turns too (default: responses only)")
    last_turn_only: bool = _opt(False, "chat records: loss on the last assistant turn only")
    data_workers: int = _opt(0, "processes that tokenize the data (0: one per 20k records, at most min(4, CPUs))", ge=0)
    data_cache: str = _opt("", "directory of tokenized-data caches (default: BILORA_DIST_CACHE/data; none: off)")
    method: str = _opt("bilora", "training method", choices=METHODS)
    rank: int = _opt(8, "primary LoRA rank r1", ge=1)
    alpha: float = _opt(16.0, "primary LoRA alpha (scale alpha/rank)", gt=0)
    aux_rank: int = _opt(8, "Bi-LoRA auxiliary rank r2", ge=1)
    aux_scale: float = _opt(1.0, "Bi-LoRA auxiliary scale s2", gt=0)
    rho: float | None = _opt(None, "perturbation radius (default 0.05 for bilora, 0.01 for lora-sam)", ge=0)
    aux_diagnostics_every: int = _opt(0, "Bi-LoRA: every N steps log aux_alignment, aux_gain and aux_gain_ratio "
                                         "(how far the auxiliary follows the ascent; one extra forward; 0: off)", ge=0)
    aux_lr_scale: float = _opt(1.0, "Bi-LoRA: the auxiliary's learning rate is this many times the primary's", gt=0)
    aux_schedule: str = _opt("same", "Bi-LoRA: the auxiliary's lr follows the primary's schedule (same), or only "
                                     "its warmup (constant)", choices=("same", "constant"))
    aux_optimizer: str = _opt("adamw", "Bi-LoRA: the auxiliary ascends with AdamW, or by normalised gradient "
                                       "ascent, theta2 += lr2 g2/||g2|| (sgd-normalized)",
                              choices=("adamw", "sgd-normalized"))
    aux_refresh: int = _opt(0, "Bi-LoRA: every K steps set the auxiliary to the top singular pairs of the adapted "
                               "weights' gradient, scaled onto --rho (0: never)", ge=0)
    target_modules: str = _opt("all-linear", "comma-separated module names, a regex, or all-linear")
    lr: float = _opt(5e-4, "peak learning rate", gt=0)
    weight_decay: float = _opt(0.0, "AdamW weight decay of the primary adapter", ge=0)
    adam_beta1: float = _opt(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = _opt(0.999, "AdamW beta2", ge=0, lt=1)
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon", gt=0)
    warmup_ratio: float = _opt(0.05, "fraction of steps of warmup", ge=0, lt=1)
    warmup_steps: int = _opt(0, "steps of warmup (0: from --warmup-ratio)", ge=0)
    warmup_type: str = _opt("linear", "warmup curve: linear, or log as DeepSpeed's Warmup* schedulers",
                            choices=("linear", "log"))
    scheduler: str = _opt("cosine", "learning-rate schedule after warmup", choices=SCHEDULERS)
    max_grad_norm: float = _opt(1.0, "clip the primary adapter gradient to this norm (0: off)", ge=0)
    max_steps: int = _opt(0, "optimizer steps (0: derive from --epochs)", ge=0)
    epochs: float = _opt(1.0, "passes over the training data when --max-steps is 0", ge=0)
    micro_batch_size: int = _opt(8, "sequences per micro-batch per rank", ge=1)
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step", ge=1)
    seq_len: int = _opt(256, "truncate sequences to this many tokens", ge=1)
    gradient_checkpointing: str = _opt("auto", "recompute activations in backward (auto: the least recomputation "
                                                "whose planned peak fits --memory-budget; a bare flag means true)",
                                        choices=("auto", "true", "false"), bare="true")
    checkpoint_every: int = _opt(0, "with --gradient-checkpointing true: checkpoint only every K-th decoder block "
                                    "(0 or 1: all)", ge=0)
    memory_budget: str = _opt("", "memory per rank that --gradient-checkpointing auto plans for, e.g. 70GB "
                                  "(default: the device's free memory)")
    bf16: str = _opt("auto", "frozen base in bfloat16, adapters, their optimizer and norms fp32 (auto: on where the "
                             "device supports it, CUDA with bf16; a bare --bf16 means true)",
                     choices=("auto", "true", "false"), bare="true")
    quantize: str = _opt("none", "frozen linear layers in bitsandbytes NF4 with double quantisation (4bit)",
                         choices=("none", "4bit"))
    attn_implementation: str = _opt("auto", "attention kernel (auto: flash_attention_2 where installed on CUDA, "
                                            "else sdpa)", choices=ATTENTION)
    kernels: str = _opt("auto", "fused kernels for the frozen base (auto: Liger-Kernel's RMSNorm, RoPE and SwiGLU on "
                                "CUDA where liger-kernel is installed and supports the model, else none; SwiGLU "
                                "left out where expert tensors are adapted)",
                        choices=("auto", "liger", "none"))
    compile: bool = _opt(False, "torch.compile each decoder block (regional: one graph shared by the blocks)")
    packing: bool = _opt(False, "pack examples into rows of up to --seq-len tokens, no attention across examples")
    loss_chunk: int = _opt(1024, "tokens per chunk of the output head's loss; full-vocabulary logits never exist "
                                 "for more (0: the whole micro-batch at once)", ge=0)
    squeeze: str = _opt("", "rank compression: post:R->K, cont:R->K@STEP or in:R->K/STAGES (R = --rank)")
    squeeze_min_stage: int = _opt(20, "fewest optimizer steps a squeeze stage may last", ge=0)
    squeeze_ranks: str = _opt("geometric", "ranks of the in-training stages", choices=("geometric", "linear"))
    squeeze_optimizer: str = _opt("project", "AdamW moments across a compression: reset, or project into the new basis",
                                  choices=("reset", "project"))
    squeeze_aux: bool = _opt(False, "Bi-LoRA: squeeze the auxiliary too (default: it keeps its rank)")
    engine: str = _opt("auto", "what shards the frozen base", choices=ENGINES)
    ds_config: str = _opt("", "DeepSpeed JSON config (deepspeed engine)")
    replica_check_every: int = _opt(50, "every N steps, verify all ranks hold bit-identical adapters (0: never)", ge=0)
    dry_run: bool = _opt(False, "print the per-rank memory plan and exit without allocating the model")
    plan_ranks: int = _opt(0, "ranks the --dry-run plan is for (0: the launched world size)", ge=0)
    eval_every: int = _opt(0, "evaluate every N steps (0: only before and after training)", ge=0)
    eval_on_start: str = _opt("true", "evaluate before the first step (false: only every --eval-every steps and at "
                                      "the end)", choices=("true", "false"), bare="true")
    eval_batch_size: int = _opt(16, "sequences per evaluation batch per rank", ge=1)
    log_every: int = _opt(1, "write a metrics row every N steps", ge=1)
    output_dir: str = _opt("outputs/run", "where config, metrics, checkpoints and the adapter go")
    overwrite_output_dir: bool = _opt(False, "start over in an --output-dir that holds a run: delete its checkpoints, "
                                             "metrics, tensorboard/ and adapter first (as HF Trainer's "
                                             "overwrite_output_dir; --resume auto continues it instead)")
    save_every: int = _opt(0, "write a resumable checkpoint every N steps (always at the end; 0: only then)", ge=0)
    keep_last: int = _opt(2, "checkpoints kept in OUTPUT_DIR/checkpoints, newest first (0: all)", ge=0)
    on_save_error: str = _opt("stop", "a checkpoint that cannot be written (disk full): stop the run with one line, "
                                      "or warn and try again at the next save", choices=("stop", "continue"))
    max_bad_steps: int = _opt(10, "stop after this many consecutive steps skipped for a non-finite loss or gradient",
                              ge=1)
    resume: str = _opt("", "auto (newest valid checkpoint in --output-dir, if any) or a checkpoint directory")
    seed: int = _opt(0, "seed of adapter init and data order", ge=0, le=2**32 - 1)
    config: str = _opt("", "YAML file with any of these keys (flags override it)")

    def resolved(self) -> "TrainConfig":
        """Return a copy with method- and device-dependent defaults filled in (rho, bf16)."""
        rho = DEFAULT_RHO[self.method] if self.rho is None else self.rho
        bf16 = self.bf16
        if bf16 == "auto":
            bf16 = "true" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "false"
        return dataclasses.replace(self, rho=rho, bf16=bf16)

    @property
    def dtype(self) -> torch.dtype:
        """The frozen base's dtype (bf16 resolved: see `resolved`)."""
        return torch.bfloat16 if self.bf16 == "true" else torch.float32

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
_OPS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}


def _bounds_text(meta: Any) -> str:
    """The range of a field's metadata as the error line says it: `>= 1`, `> 0`, `in [0, 1)`."""
    low = next(((key, meta[key]) for key in ("ge", "gt") if key in meta), None)
    high = next(((key, meta[key]) for key in ("le", "lt") if key in meta), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    return " ".join(f"{sign} {meta[key]}" for key, sign in _BOUNDS if key in meta)


def range_error(name: str, value: Any) -> str | None:
    """What is wrong with `value` for field `name` by the table on TrainConfig's fields (type, finiteness, `ge`/
    `gt`/`le`/`lt`), as `--flag must be ..., got ...`; None when it is fine."""
    f = _FIELDS[name]
    if f.type not in ("int", "float", "float | None") or (value is None and f.type == "float | None"):
        return None
    bounds = _bounds_text(f.metadata)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if f.type == "int" else "a number"
        return f"--{_flag(name)} must be {kind}{' ' + bounds if bounds else ''}, got {value!r}"
    if f.type == "int" and isinstance(value, float) and not value.is_integer():
        return f"--{_flag(name)} must be an integer{' ' + bounds if bounds else ''}, got {value}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"--{_flag(name)} must be a finite number{' ' + bounds if bounds else ''}, got {value}"
    if not all(_OPS[key](value, f.metadata[key]) for key in _OPS if key in f.metadata):
        return f"--{_flag(name)} must be {bounds}, got {value}"
    return None


def validate(cfg: TrainConfig, origin: dict[str, str] | None = None) -> None:
    """Raise UserError naming the first bad value: first every number by the table on TrainConfig's fields, then
    what involves several fields. `origin` maps a field given other than by its flag (a --config YAML key, a
    --ds_config key) to where it was given, which the line names."""
    for name in _FIELDS:
        if problem := range_error(name, getattr(cfg, name)):
            where = (origin or {}).get(name, f"--{_flag(name)}")
            raise UserError(problem + ("" if where == f"--{_flag(name)}" else f" (from {where})"))
    aux_flags = {"aux_diagnostics_every": 0, "aux_lr_scale": 1.0, "aux_schedule": "same", "aux_optimizer": "adamw",
                 "aux_refresh": 0}
    changed = [name for name, default in aux_flags.items() if getattr(cfg, name) != default]
    if cfg.method != "bilora" and changed:
        raise UserError(f"--{_flag(changed[0])} sets Bi-LoRA's auxiliary; --method {cfg.method} has none")
    if cfg.max_steps == 0 and cfg.epochs == 0:
        raise UserError("one of --max-steps or --epochs must be > 0")
    if not cfg.target_modules.strip():
        raise UserError("--target-modules is empty")
    if cfg.memory_budget:
        parse_size(cfg.memory_budget, "--memory-budget")
    if cfg.ds_config and cfg.engine in ("single", "fsdp"):
        raise UserError(f"--engine {cfg.engine} does not use --ds_config {cfg.ds_config} (its ZeRO stage would be "
                        "ignored); pass --engine deepspeed, or leave --engine auto (--ds_config and the deepspeed "
                        "launcher pick deepspeed), or drop --ds_config")
    if cfg.squeeze:  # as the run will (trainer.py); with --epochs its length, hence the stages', waits for the data
        from bilora_dist.squeeze.schedule import parse_squeeze

        parse_squeeze(cfg.squeeze, cfg.max_steps or _UNKNOWN_STEPS, cfg.rank, cfg.squeeze_min_stage,
                      cfg.squeeze_ranks)


_UNKNOWN_STEPS = 2**62  # a run length no squeeze stage is too short for


def parse_size(text: str, flag: str) -> int:
    """Bytes of a size such as 500MB or 2GB (binary units); UserError naming `flag` otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)\s*", text.upper())
    if not match:
        raise UserError(f"{flag} '{text}': expected a size such as 500MB or 2GB")
    return int(float(match[1]) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}[match[2]])


def _flag(name: str) -> str:
    return name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="bilora-dist train", description="Bi-LoRA / LoRA / LoRA-SAM fine-tuning",
                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    for f in fields(TrainConfig):
        kwargs: dict[str, Any] = {"help": f.metadata["help"], "dest": f.name}
        if f.type == "bool":
            kwargs["action"] = "store_true"
        else:
            if "bare" in f.metadata:  # `--flag` alone means this value
                kwargs.update(nargs="?", const=f.metadata["bare"])
            kwargs["type"] = {"int": int, "float": float, "float | None": float}.get(f.type, str)
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        aliases = [f"--{_flag(f.name)}"] + ([f"--{f.name}"] if "_" in f.name else [])
        parser.add_argument(*aliases, **kwargs)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by launchers
    return parser


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _yaml_value(kind: str, value: Any, choices: tuple[str, ...] | None = None) -> Any:
    """A YAML value checked (and, for numbers written as strings such as `1e-4`, converted) to the field's type."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).lower() in _TRUE + _FALSE:
            return str(value).lower() in _TRUE
        raise ValueError(f"expected true or false, got {value!r}")
    if kind == "float | None" and value is None:
        return None
    if kind in ("int", "float", "float | None"):
        number: Any = value
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                number = float(value) if kind != "int" else int(value)
            except ValueError:
                raise ValueError(f"expected {'an integer' if kind == 'int' else 'a number'}, got {value!r}") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or (
                kind == "int" and isinstance(number, float) and not number.is_integer()):
            raise ValueError(f"expected {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
        return int(number) if kind == "int" else float(number)
    if choices is not None and {"true", "false"} <= set(choices) and str(value).lower() in _TRUE + _FALSE:
        return "true" if str(value).lower() in _TRUE else "false"  # `bf16: yes`
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _load_yaml(path: str) -> dict[str, Any]:
    """The YAML file's values, each checked like its flag (type and choices); one error line per problem."""
    if not Path(path).is_file():
        raise UserError(f"--config: file not found: {path}")
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of keys to values")
    known = {f.name: f for f in fields(TrainConfig)}
    checked = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"--config {path}: {unknown_key_message(str(key), list(known))}")
        try:
            choices = known[key].metadata.get("choices")
            checked[key] = _yaml_value(known[key].type, value, choices)
        except ValueError as exc:
            raise UserError(f"--config {path}: {key}: {exc}") from None
        if choices and checked[key] not in choices:
            raise UserError(f"--config {path}: {key}: '{checked[key]}' is not one of {', '.join(choices)}")
    return checked


def apply_ds_config(cfg: TrainConfig, ds: dict[str, Any], path: str, explicit: dict[str, str]) -> TrainConfig:
    """`cfg` with the values the DeepSpeed config `ds` (read from `path`) sets (ds_config.ds_updates)."""
    return dataclasses.replace(cfg, **ds_updates(dataclasses.asdict(cfg), ds, path, explicit))


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Build the run's configuration from YAML (if --config) and flags, validated and resolved."""
    given = vars(build_parser().parse_args(argv))
    given.pop("local_rank", None)
    values = _load_yaml(given["config"]) if given.get("config") else {}
    explicit = {key: f"--config {given['config']} {key}" for key in values}
    explicit.update({key: f"--{_flag(key)}" for key in given})
    values.update(given)
    cfg = TrainConfig(**values)
    origin = dict(explicit)
    if cfg.ds_config:  # its values fill the defaults; one that differs from an explicit value is an error
        updates = ds_updates(dataclasses.asdict(cfg), read_ds_config(cfg.ds_config), cfg.ds_config, explicit)
        origin.update({key: f"--ds_config {cfg.ds_config}" for key in updates})
        cfg = dataclasses.replace(cfg, **updates)
    validate(cfg, origin)
    return cfg.resolved()
