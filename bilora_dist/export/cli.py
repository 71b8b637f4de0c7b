"""`bilora-dist export`: a PEFT adapter, a squeezed adapter or a merged model from a checkpoint,
an output directory or an adapter directory, whichever engine trained it (adapters are replicated,
so every checkpoint holds the whole adapter)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bilora_dist.adapters.bank import Branch
from bilora_dist.adapters.inject import peft_target_modules
from bilora_dist.checkpoint.store import MANIFEST, checkpoints_dir, find_checkpoint, load_checkpoint, verify
from bilora_dist.config.train import parse_size
from bilora_dist.errors import OneLineParser, UserError
from bilora_dist.export.peft import PROVENANCE_FILE, save_peft_adapter
from bilora_dist.files import read_json
from bilora_dist.export.merge import merge_into_base
from bilora_dist.model.loading import build_on_meta, resolve_model, safetensors_index
from bilora_dist.squeeze.branch import kept_energy_summary, squeeze_branch
from bilora_dist.export.peft_io import read_peft_adapter
from bilora_dist.export.vllm import save_vllm_adapter


@dataclass
class ExportSource:
    branch: Branch                  # the primary adapter (the auxiliary is never exported)
    base_model: str                 # the frozen base it was trained on: a directory or a hub id
    target_modules: list[str]
    provenance: dict[str, Any]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="bilora-dist export", description=__doc__)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="checkpoints/step_N, a training output dir (its adapter, else newest checkpoint), or an adapter")
    p.add_argument("--out", type=Path, required=True, help="directory to write (must not exist)")
    p.add_argument("--rank", type=int, help="squeeze the adapter to this rank first")
    p.add_argument("--merged", action="store_true", help="write the base with the adapter folded in")
    p.add_argument("--merge-base", choices=("nf4", "original"),
                   help="with --merged: fold into the dequantised NF4 weights the adapter was trained against "
                        "(default for an adapter trained with --quantize 4bit, as QLoRA and PEFT merge) or into the "
                        "base's original weights (default otherwise)")
    p.add_argument("--model", help="base model directory or cached hub id (default: the adapter's own base)")
    p.add_argument("--shard-size", default="2GB", help="largest merged weight file, e.g. 500MB, 2GB")
    p.add_argument("--format", choices=("peft", "vllm"), default="peft",
                   help="adapter layout: PEFT's, or vLLM's (expert LoRAs per expert where vLLM reads them so)")
    return p


def _from_checkpoint(path: Path) -> ExportSource:
    checkpoint = load_checkpoint(path)
    config = yaml.safe_load((path / "config.yaml").read_text())
    branch = checkpoint.branches["primary"]
    targets = peft_target_modules(config["target_modules"], [s.name for s in branch.shapes if not s.experts])
    provenance = {"method": config["method"], "rho": config["rho"], "rank": config["rank"],
                  "alpha": config["alpha"], "steps": checkpoint.step, "checkpoint": str(path),
                  "quantize": config.get("quantize", "none"),
                  "dtype": "bfloat16" if config.get("bf16") == "true" else "float32",
                  "squeeze_history": checkpoint.state["squeeze_history"]}
    return ExportSource(branch, config["model"] or resolve_model(""), targets, provenance)


def _from_adapter(path: Path) -> ExportSource:
    branch, config = read_peft_adapter(path, "--checkpoint")
    provenance = read_json(path / PROVENANCE_FILE) if (path / PROVENANCE_FILE).is_file() else {}
    return ExportSource(branch, config.get("base_model_name_or_path", ""), config["target_modules"], provenance)


def read_source(path: Path) -> ExportSource:
    """What --checkpoint names: a checkpoint, an output directory or a PEFT adapter directory."""
    if not path.is_dir():
        raise UserError(f"--checkpoint {path}: no such directory")
    if (path / MANIFEST).exists():
        problem = verify(path)
        if problem:
            raise UserError(f"--checkpoint {path}: {problem}")
        return _from_checkpoint(path)
    if (path / "adapter_config.json").is_file():
        return _from_adapter(path)
    if (path / "adapter" / "adapter_config.json").is_file():
        return _from_adapter(path / "adapter")
    if checkpoints_dir(path).is_dir():
        newest = find_checkpoint(path, "auto", print)
        if newest is not None:
            return _from_checkpoint(newest)
    raise UserError(f"--checkpoint {path}: holds no checkpoint, no training output and no PEFT adapter")


def merge_base(choice: str | None, provenance: dict[str, Any], model_dir: Path) -> Any:
    """The dtype to quantise the base to NF4 in before folding the adapter in (None: fold into the weights as
    stored); prints one line saying what the merge folds into. The default follows what the adapter was trained
    against: the dequantised NF4 weights after --quantize 4bit (QLoRA's and PEFT's convention: the merged model
    then computes what the trained model computed), the original weights otherwise."""
    import torch

    trained_4bit = provenance.get("quantize") == "4bit"
    choice = choice or ("nf4" if trained_4bit else "original")
    if any(".quant_state.bitsandbytes__" in key for key in safetensors_index(
            model_dir, f"--merged: {model_dir} holds no .safetensors weights to merge into")):
        print(f"merging into {model_dir}'s 4-bit weights, dequantised (the base is stored quantised)")
        return None
    if choice == "original":
        print(f"merging into {model_dir}'s original weights" + (
            ", not the NF4 weights the adapter was trained against (--quantize 4bit; --merge-base nf4 folds into "
            "those)" if trained_4bit else ""))
        return None
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(provenance.get("dtype"), torch.float32)
    why = "those the adapter was trained against (--quantize 4bit)" if trained_4bit else "as --merge-base nf4 asks"
    print(f"merging into {model_dir}'s linear weights quantised to NF4 ({dtype}) and dequantised: {why}; "
          "--merge-base original folds into the unquantised weights")
    return dtype


def export_main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.rank is not None and args.rank < 1:
        raise UserError(f"--rank must be >= 1, got {args.rank}")
    if args.out.exists():
        raise UserError(f"--out {args.out} already exists; choose a new directory")
    if args.merged and args.format != "peft":
        raise UserError("--format applies to adapters; --merged writes a plain model")
    shard_bytes = parse_size(args.shard_size, "--shard-size")
    start = time.perf_counter()
    source = read_source(args.checkpoint)
    branch = source.branch
    history = list(source.provenance.get("squeeze_history") or [])
    if args.rank is not None and args.rank > max(branch.ranks):
        raise UserError(f"--rank {args.rank} exceeds the adapter's rank {max(branch.ranks)}; a squeeze cannot raise "
                        f"the rank (choose --rank {max(branch.ranks)} or less, or leave --rank out)")
    if args.merge_base is not None and not args.merged:
        raise UserError("--merge-base applies to --merged")
    if args.rank is not None and args.rank < max(branch.ranks):
        branch, reports = squeeze_branch(branch, args.rank)
        kept = kept_energy_summary(reports)
        history.append({"mode": "export", "rank": args.rank, **kept})
        print(f"squeezed {len(reports)} layers to rank {args.rank}; kept energy min {kept['kept_energy_min']:.4f}")
    base = args.model or source.base_model
    if args.merged:
        if not base:
            raise UserError("--merged needs the base model: pass --model (a directory or a cached hub id)")
        model_dir = resolve_model(base, "--model" if args.model else "--merged: the adapter's base model")
        nf4_dtype = merge_base(args.merge_base, source.provenance, Path(model_dir))
        counts = merge_into_base(Path(model_dir), branch, args.out, shard_bytes, nf4_dtype)
        print(f"merged {counts['merged_layers']} layers with the base {base}: {counts['tensors']} tensors, "
              f"{counts['shards']} shard(s), {counts['bytes'] / 2**20:.1f} MiB; {time.perf_counter() - start:.1f} s")
    elif args.format == "vllm":
        if not base:
            raise UserError("--format vllm needs the base model: pass --model (a directory or a cached hub id)")
        meta = build_on_meta(resolve_model(base, "--model" if args.model else "--format vllm: the adapter's base model"))
        count = save_vllm_adapter(branch, args.out, source.target_modules, base,
                                  meta, {**source.provenance, "squeeze_history": history})
        print(f"vLLM adapter: {count} tensors; {time.perf_counter() - start:.1f} s")
    else:
        save_peft_adapter(branch, args.out, source.target_modules, base,
                          {**source.provenance, "squeeze_history": history})
        print(f"adapter of {len(branch.shapes)} layers (ranks {min(branch.ranks)}-{max(branch.ranks)}); "
              f"{time.perf_counter() - start:.1f} s")
    print(f"written to {args.out}")
