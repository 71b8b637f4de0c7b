"""The stages of a run that more than one recipe uses: resolve the model, prepare the data, choose the
recompute, build the frozen model and its adapter bank, check the vocabulary, attach the adapters and wrap the
model for its engine. The training recipe (train.py) and the sharpness probe (probe/cli.py) both call them."""

from __future__ import annotations

from typing import Callable

import torch

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.adapters.bank import AdapterBank, LayerShape
from bilora_dist.config.train import TrainConfig, parse_size
from bilora_dist.data import Prepared, prepare_examples
from bilora_dist.data.tokenize import TokenizeOptions
from bilora_dist.model.embedded import DEFAULT_EVAL, DEFAULT_TRAIN
from bilora_dist.engines import Engine
from bilora_dist.errors import UserError
from bilora_dist.training.evaluation import choice_task
from bilora_dist.model.kernels import apply_kernels, choose_kernels, compile_blocks, liger_model_types
from bilora_dist.training.loop import RunData, say
from bilora_dist.training.loss import attach_head_loss
from bilora_dist.model.loading import LoadOptions, build_on_meta, decoder_blocks, load_config, load_tokenizer, resolve_model
from bilora_dist.memory.run_plan import RunPlan, build_run_plan
from bilora_dist.memory.recompute import Recompute, apply_recompute, choose, forced, free_memory_bytes


def choose_recompute(cfg: TrainConfig, plan: RunPlan, free: Callable[[], int]) -> Recompute:
    """The decoder blocks to checkpoint: as the flags force, or under auto from `plan` and the budget
    (--memory-budget, else `free()`)."""
    if cfg.gradient_checkpointing != "auto":
        return forced(cfg.gradient_checkpointing, cfg.checkpoint_every, plan.blocks)
    budget = parse_size(cfg.memory_budget, "--memory-budget") if cfg.memory_budget else free()
    return choose(plan.blocks, plan.peak_bytes, budget)


def resolve_recompute(cfg: TrainConfig, engine: Engine) -> Recompute:
    """The checkpointing of this run, chosen before its model is loaded (auto: for the smallest free memory of all
    ranks); one line says what and why."""
    if cfg.gradient_checkpointing == "auto":
        free = min(engine.gather_object(free_memory_bytes(engine.device)))
        recompute = choose_recompute(cfg, build_run_plan(cfg, engine.world_size), lambda: free)
    else:  # the blocks are counted only where every K-th is asked for
        total = len(decoder_blocks(build_on_meta(resolve_model(cfg.model)))) if cfg.checkpoint_every > 1 else 0
        recompute = forced(cfg.gradient_checkpointing, cfg.checkpoint_every, total)
    say(engine, f"gradient checkpointing {recompute.describe()}: {recompute.why}")
    return recompute


def describe_layers(shapes: list[LayerShape]) -> str:
    """What is adapted, e.g. `8 adapted layers (8 attention, 0 dense), 4 expert tensors (x 4 experts)`."""
    linear = [s for s in shapes if not s.experts]
    attention = sum(".self_attn." in s.name or ".attn." in s.name or ".attention." in s.name for s in linear)
    text = f"{len(linear)} adapted layers ({attention} attention, {len(linear) - attention} dense)"
    experts = [s for s in shapes if s.experts]
    if experts:
        counts = "/".join(str(e) for e in sorted({s.experts for s in experts}))
        text += f", {len(experts)} expert tensors (x {counts} experts)"
    return text


def unquantized_experts(shapes: list[LayerShape], cfg: TrainConfig) -> str | None:
    """The line saying that `--quantize 4bit` leaves fused expert weights in the base dtype (bitsandbytes
    quantises linear layers only), or None where nothing is left out."""
    experts = [s for s in shapes if s.experts]
    if cfg.quantize != "4bit" or not experts:
        return None
    numel = sum(s.experts * s.in_features * s.out_features for s in experts)
    return (f"--quantize 4bit: the {len(experts)} adapted expert tensors ({numel:,} params) stay in {cfg.dtype} "
            "(bitsandbytes quantises linear layers only); the memory plan counts them so")


def resolve_model_once(cfg: TrainConfig, engine: Engine) -> str:
    """The model's local directory; the main rank converts the embedded model first, once."""
    if engine.is_main:
        resolve_model(cfg.model)
    engine.barrier()
    model_path = resolve_model(cfg.model)
    load_config(model_path)  # an unusable model is refused before anything else is read
    return model_path


def prepare_data(cfg: TrainConfig, engine: Engine, model_path: str) -> RunData:
    """Training and held-out examples, tokenized once by the main rank and memory-mapped by all."""
    tokenizer = load_tokenizer(model_path)
    options = TokenizeOptions(cfg.seq_len, cfg.train_on_prompt, cfg.last_turn_only)

    def prepare(spec: str, flag: str) -> Prepared:
        return prepare_examples(spec, flag, tokenizer, options, cfg.data_format, cfg.data_workers, cfg.data_cache,
                                engine, lambda message: say(engine, message))

    train_set = prepare(cfg.data or str(DEFAULT_TRAIN), "--data").examples
    eval_data = prepare(cfg.eval_data or str(DEFAULT_EVAL), "--eval-data")
    return RunData(train_set, eval_data.examples, choice_task(eval_data, tokenizer, cfg.seq_len),
                   tokenizer.pad_token_id)


def build_model_and_adapters(cfg: TrainConfig, engine: Engine,
                             model_path: str) -> tuple[torch.nn.Module, AdapterBank]:
    """The frozen base as the engine loads it and its adapter bank (on the engine's device)."""
    model = engine.build(model_path, LoadOptions.of(cfg, model_path))
    names = select_targets(model, cfg.target_modules)
    bank = build_bank(layer_shapes(model, names), cfg.rank, cfg.alpha,
                      cfg.aux_rank if cfg.method == "bilora" else None, cfg.aux_scale, cfg.seed).to(engine.device)
    return model, bank


def check_vocabulary(model: torch.nn.Module, data: RunData, model_path: str) -> None:
    """Refuse token ids the model's embedding has no row for (a tokenizer of another model), before anything is
    written: the forward pass would fail on them."""
    import pyarrow.compute as pc

    rows = model.get_input_embeddings().num_embeddings
    for flag, examples in (("--data", data.train_set), ("--eval-data", data.eval_set)):
        top = pc.max(pc.list_flatten(examples.data.column("input_ids"))).as_py()
        if top is not None and top >= rows:
            raise UserError(f"{flag}: the tokenizer of {model_path} gives token id {top}, but the model's embedding "
                            f"has {rows} rows; use the tokenizer the model was trained with")


def attach_and_wrap(cfg: TrainConfig, engine: Engine, model: torch.nn.Module, bank: AdapterBank,
                    recompute: Recompute) -> torch.nn.Module:
    """Put the chosen kernels in, hook the bank's updates into the target layers, checkpoint the chosen blocks,
    compile the blocks if asked, then let the engine wrap the model for training."""
    kernels = choose_kernels(cfg.kernels, engine.device, model.config.model_type, liger_model_types(), bank.shapes)
    say(engine, kernels.describe())
    apply_kernels(model, kernels)
    inject(model, bank)
    attach_head_loss(model, cfg.loss_chunk)
    apply_recompute(model, recompute)
    if cfg.compile:
        say(engine, f"compiling {compile_blocks(model)} decoder blocks (the first step includes the compile time)")
    model = engine.wrap(model)
    model.train()
    return model
