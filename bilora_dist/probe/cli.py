"""`bilora-dist probe`: the sharpness probe's command: read the adapter and data, run the measures
(probe/sharpness.py) on any engine, write the JSON report and its plot."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from bilora_dist.adapters.bank import AdapterBank, Branch
from bilora_dist.errors import OneLineParser, UserError

from bilora_dist.probe.sharpness import DEFAULT_RHOS, MEASURES, Probe, probe_sharpness


def plot_sharpness(report: dict[str, Any], path: Path) -> bool:
    """Loss increase vs ρ, a curve per measure (random mean ± std, adversarial, LoRA-subspace adversarial) as a PNG;
    False where matplotlib is not installed (it is not a dependency of the package)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = report["results"]
    rho = [r["rho"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    if rows[0]["random_mean"] is not None:
        ax.errorbar(rho, [r["random_mean"] for r in rows], yerr=[r["random_std"] for r in rows], marker="o",
                    capsize=3, label=f"random (mean ± std, {report['draws']} draws)")
    for key, marker, label in (("adversarial", "s", "adversarial, full weight space"),
                               ("lora_adversarial", "^", "adversarial, LoRA factors")):
        if rows[0][key] is not None:
            ax.plot(rho, [r[key] for r in rows], marker=marker, label=label)
    ax.set_xlabel("ρ (Frobenius radius of the weight change)")
    ax.set_ylabel("loss increase")
    ax.set_title(f"sharpness (base loss {report['base_loss']:.4f})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="bilora-dist probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", type=Path, required=True, help="PEFT LoRA adapter directory (as training writes it)")
    p.add_argument("--data", required=True, help="data to measure the loss on (any --data form of launch/train.py)")
    p.add_argument("--model", default=None, help="base model directory or cached hub id (default: the adapter's)")
    p.add_argument("--rho", default=DEFAULT_RHOS, help="comma-separated radii, each > 0")
    p.add_argument("--draws", type=int, default=5, help="random directions per radius")
    p.add_argument("--adv-steps", type=int, default=5, help="gradient-ascent steps of the adversarial searches")
    p.add_argument("--out", type=Path, default=Path("sharpness.json"), help="JSON report (the plot: same name, .png)")
    p.add_argument("--max-examples", type=int, default=0, help="use the first N examples only (0: all)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass per rank")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    p.add_argument("--measure", default=",".join(MEASURES),
                   help="comma-separated, of: random (dense directions), adversarial (dense ascent), lora (ascent "
                        "on the factors); fewer measures, less time")
    for flag, default, extra in (("--seq-len", 256, {"type": int}), ("--data-format", "auto", {}),
                                 ("--data-cache", "", {}), ("--engine", "auto", {}), ("--ds_config", "", {}),
                                 ("--bf16", "auto", {}), ("--attn-implementation", "auto", {}),
                                 ("--loss-chunk", 1024, {"type": int})):
        p.add_argument(flag, default=default, help=f"as in launch/train.py (default {default or 'none'})", **extra)
    p.add_argument("--train-on-prompt", action="store_true", help="as in launch/train.py")
    p.add_argument("--last-turn-only", action="store_true", help="as in launch/train.py")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by launchers
    return p


def parse_rhos(text: str) -> list[float]:
    try:
        rhos = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--rho '{text}': expected comma-separated numbers such as {DEFAULT_RHOS}") from None
    if not rhos or not all(0 < r < math.inf for r in rhos):
        raise UserError(f"--rho '{text}': every radius must be a finite number > 0")
    return rhos


def parse_measures(text: str) -> tuple[str, ...]:
    """The measures named in --measure, in MEASURES order."""
    measures = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures:
        raise UserError(f"--measure '{text}': expected some of {','.join(MEASURES)}")
    return tuple(m for m in MEASURES if m in measures)


def _check_args(args: argparse.Namespace) -> tuple[list[float], tuple[str, ...]]:
    rhos, measures = parse_rhos(args.rho), parse_measures(args.measure)
    for flag, value, least in (("--draws", args.draws, 1), ("--adv-steps", args.adv_steps, 1),
                               ("--batch-size", args.batch_size, 1), ("--max-examples", args.max_examples, 0)):
        if value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    if not args.adapter.is_dir():
        raise UserError(f"--adapter {args.adapter}: no such directory")
    return rhos, measures


def load_adapted(args: argparse.Namespace, base_model: str, loaded: Branch):
    """(engine, model directory, base model with the adapter hooked in and wrapped, its bank, data), through the
    trainer's stages: the bank built over the adapter's layers gets the adapter's factors before wrapping."""
    from bilora_dist.config.train import TrainConfig, validate
    from bilora_dist.engines import make_engine
    from bilora_dist.memory.recompute import Recompute
    from bilora_dist.recipe.stages import attach_and_wrap, build_model_and_adapters, prepare_data, resolve_model_once

    cfg = TrainConfig(model=base_model, data=args.data, eval_data=args.data, data_format=args.data_format,
                      train_on_prompt=args.train_on_prompt, last_turn_only=args.last_turn_only,
                      data_cache=args.data_cache, method="lora", rank=1, seq_len=args.seq_len,
                      target_modules="|".join(re.escape(s.name) for s in loaded.shapes), engine=args.engine,
                      ds_config=args.ds_config, bf16=args.bf16, attn_implementation=args.attn_implementation,
                      loss_chunk=args.loss_chunk, eval_batch_size=args.batch_size, output_dir="")
    validate(cfg)
    cfg = cfg.resolved()
    engine = make_engine(cfg)
    model_path = resolve_model_once(cfg, engine)
    data = prepare_data(cfg, engine, model_path)
    model, bank = build_model_and_adapters(cfg, engine, model_path)
    bank.replace_branch("primary", _adapter_branch(loaded, bank, args.adapter, base_model).to(engine.device))
    recompute = Recompute(0, 0, "the probe keeps its activations")
    return engine, model_path, attach_and_wrap(cfg, engine, model, bank, recompute), bank, data


def _adapter_branch(loaded: Branch, bank: AdapterBank, adapter: Path, model: str) -> Branch:
    """The adapter's factors in the bank's layer order, each layer checked against the model's."""
    by_name = {s.name: i for i, s in enumerate(loaded.shapes)}
    found = {s.name for s in bank.shapes}
    missing = next((n for n in by_name if n not in found), None)
    if missing:
        raise UserError(f"--adapter {adapter}: layer {missing} is not an adaptable linear layer of {model}")
    for shape in bank.shapes:
        other = loaded.shapes[by_name[shape.name]]
        if other != shape:
            raise UserError(f"--adapter {adapter}: layer {shape.name} is {other.out_features}x{other.in_features}, "
                            f"the model's is {shape.out_features}x{shape.in_features}")
    order = [by_name[s.name] for s in bank.shapes]
    return Branch.from_factors(bank.shapes, [tuple(t.detach() for t in loaded.factors(i)) for i in order],
                               [loaded.scales[i] for i in order])


def sharpness_main(argv: list[str]) -> None:
    from transformers.utils import logging as hf_logging

    from bilora_dist.training.loop import say
    from bilora_dist.export.peft_io import read_peft_adapter

    args = build_parser().parse_args(argv)
    rhos, measures = _check_args(args)
    loaded, config = read_peft_adapter(args.adapter)
    base_model = args.model or config.get("base_model_name_or_path") or ""
    if not base_model:
        raise UserError(f"--adapter {args.adapter} names no base model: pass --model")
    hf_logging.disable_progress_bar()
    engine, model_path, model, bank, data = load_adapted(args, base_model, loaded)
    examples = data.eval_set
    if args.max_examples and args.max_examples < len(examples):
        examples = examples.select(range(args.max_examples))
    probe = Probe(model, bank, examples, engine, args.batch_size, data.pad_id)
    say(engine, f"sharpness of {args.adapter} on {model_path}: {len(bank.shapes)} layers, "
                f"{probe.delta.flat.numel():,} adapted weights, {len(examples)} examples, rho {rhos}")
    report = {"adapter": str(args.adapter), "model": base_model, "data": args.data, "examples": len(examples),
              "engine": engine.name, "world_size": engine.world_size,
              **probe_sharpness(probe, rhos, args.draws, args.adv_steps, args.seed, measures)}
    if engine.is_main:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        for row in report["results"]:
            parts = [f"random {row['random_mean']:+.5f} ± {row['random_std']:.5f}" if row["random_mean"] is not None
                     else "", f"adversarial {row['adversarial']:+.5f}" if row["adversarial"] is not None else "",
                     f"LoRA-subspace adversarial {row['lora_adversarial']:+.5f}"
                     if row["lora_adversarial"] is not None else ""]
            print(f"rho {row['rho']:g}: " + ", ".join(p for p in parts if p))
        plot = args.out.with_suffix(".png")
        plotted = plot_sharpness(report, plot)
        print(f"report written to {args.out}" + (f", plot to {plot}" if plotted else
                                                  "; plot skipped (matplotlib is not installed)"))
    engine.close()
