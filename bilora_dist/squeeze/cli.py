"""`bilora-dist squeeze`: compress a PEFT LoRA adapter, or extract one from a full fine-tune."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from bilora_dist.errors import OneLineParser, UserError
from bilora_dist.export.peft import PROVENANCE_FILE, save_peft_adapter
from bilora_dist.files import read_json
from bilora_dist.squeeze.branch import kept_energy_summary, squeeze_branch
from bilora_dist.export.peft_io import extract_lora_from_delta, read_peft_adapter

DELTA_TARGETS = r"\.layers\.\d+\..*(proj|fc\d?|dense|query|key|value)$"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="bilora-dist squeeze", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", type=Path, help="PEFT LoRA adapter directory to compress")
    src.add_argument("--delta", nargs=2, type=Path, metavar=("BASE", "FINETUNED"),
                     help="model directories: extract a LoRA of W_ft - W0 by randomized SVD")
    p.add_argument("--rank", type=int, required=True, help="target rank (the cap, with --energy)")
    p.add_argument("--out", type=Path, required=True, help="new adapter directory (must not exist)")
    p.add_argument("--energy", type=float, help="per-layer rank: smallest keeping this fraction of ||dW||^2")
    p.add_argument("--alpha-policy", choices=("keep-scale", "keep-alpha"), default="keep-scale",
                   help="--adapter: keep each layer's scale alpha/r (alpha' = alpha*k/r) or its alpha (s' = alpha/k)")
    p.add_argument("--target-modules", default=DELTA_TARGETS, help="--delta: regex on module names")
    p.add_argument("--oversample", type=int, default=10, help="--delta: RSVD oversampling p")
    p.add_argument("--power-iters", type=int, default=2, help="--delta: RSVD power iterations q")
    return p


def squeeze_main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.rank < 1:
        raise UserError(f"--rank must be >= 1, got {args.rank}")
    if args.energy is not None and not 0 < args.energy <= 1:
        raise UserError(f"--energy must be in (0, 1], got {args.energy}")
    if args.out.exists():
        raise UserError(f"--out {args.out} already exists; choose a new directory")
    start = time.perf_counter()
    if args.adapter is not None:
        branch, config = read_peft_adapter(args.adapter)
        if args.rank > max(branch.ranks):
            raise UserError(f"--rank {args.rank} exceeds the adapter's rank {max(branch.ranks)}; a squeeze cannot "
                            f"raise the rank (choose --rank {max(branch.ranks)} or less)")
        new, reports = squeeze_branch(branch, args.rank, args.energy,
                                      keep_alpha=args.alpha_policy == "keep-alpha")
        targets, base_model = config.get("target_modules") or [], config.get("base_model_name_or_path", "")
        source = {"adapter": str(args.adapter), "ranks": sorted(set(branch.ranks))}
        old = {}
        if (args.adapter / PROVENANCE_FILE).is_file():
            old = read_json(args.adapter / PROVENANCE_FILE)
    else:
        new = extract_lora_from_delta(args.delta[0], args.delta[1], args.rank, re.compile(args.target_modules),
                                      args.oversample, args.power_iters)
        reports, old = [], {}
        targets = sorted({s.name.rsplit(".", 1)[-1] for s in new.shapes})
        base_model, source = str(args.delta[0]), {"delta": [str(p) for p in args.delta]}
    history = old.get("squeeze_history", []) + [{"mode": "posthoc", "rank": args.rank, "energy": args.energy,
                                                 "alpha_policy": args.alpha_policy, "source": source}]
    provenance = {**old, "squeeze_history": history,
                  "layers": [r.__dict__ for r in reports] if reports else None}
    save_peft_adapter(new, args.out, targets, base_model, provenance)
    if reports:
        kept = kept_energy_summary(reports)
        print(f"squeezed {len(reports)} layers to ranks {min(new.ranks)}-{max(new.ranks)}; kept energy "
              f"min {kept['kept_energy_min']:.4f}, mean {kept['kept_energy_mean']:.4f}; "
              f"{time.perf_counter() - start:.2f} s")
    else:
        print(f"extracted a rank-{args.rank} LoRA of {len(new.shapes)} layers; {time.perf_counter() - start:.2f} s")
    print(f"adapter written to {args.out}")
