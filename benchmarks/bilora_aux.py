"""How adversarial is Bi-LoRA's auxiliary perturbation when training ends?

    python benchmarks/bilora_aux.py RUN_DIR [RUN_DIR ...] [--out FILE.json] [--max-examples 64] [--draws 3]

Runs already in --out (measured under the same settings) are read back, not measured again.

Each RUN_DIR is a Bi-LoRA run as launch/train.py writes it (adapter/, checkpoints/, metrics.jsonl,
train_config.yaml). Its newest checkpoint's auxiliary branch gives the perturbation E_j = s2 B2_j A2_j of every
adapted layer. On the run's training data (what the auxiliary ascended on; its first --max-examples), with the
exported primary adapter as the unperturbed model, each run reports the loss increase
- under E itself (the auxiliary switched on, as the last training step saw it), of norm sqrt(Σ_j ||E_j||²) = r;
- under the adversarial dense perturbation of the same radius r (launch/sharpness.py's ascent, --adv-steps);
- under random dense directions of radius r (mean over --draws);
and cos(E, g) with g the gradient of the loss w.r.t. the dense weights at the unperturbed model.

From metrics.jsonl, where the run has a `lora` sibling with the same seed (benchmarks/generalization.py's layout
.../<config>/seed<N>), the logged training loss minus LoRA's, over the first 10 steps and the last third: what
the auxiliary added to the loss the primary descended on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bilora_dist.adapters.bank import Branch  # noqa: E402
from bilora_dist.checkpoint.store import Checkpoint, list_checkpoints, load_checkpoint  # noqa: E402
from bilora_dist.probe.cli import build_parser, load_adapted  # noqa: E402
from bilora_dist.probe.sharpness import Probe, adversarial_increases, random_increases  # noqa: E402
from bilora_dist.export.peft_io import read_peft_adapter  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import generalization  # noqa: E402  (its mean and standard error)


def last_checkpoint(run: Path) -> Checkpoint:
    """The run's newest checkpoint, which must hold an auxiliary branch (a Bi-LoRA run)."""
    found = list_checkpoints(run / "checkpoints")
    if not found:
        raise SystemExit(f"error: {run}: no checkpoint under {run / 'checkpoints'}")
    checkpoint = load_checkpoint(found[0])
    if "aux" not in checkpoint.branches:
        raise SystemExit(f"error: {run}: its checkpoint has no auxiliary branch (not a Bi-LoRA run)")
    return checkpoint


@torch.no_grad()
def dense_aux(aux: Branch, names: list[str]) -> torch.Tensor:
    """The auxiliary's E_j = s2 B2_j A2_j, flattened and concatenated in the order of `names`."""
    index = {s.name: i for i, s in enumerate(aux.shapes)}
    parts = []
    for name in names:
        i = index[name]
        A, B = aux.factors(i)
        parts.append((aux.scales[i] * (B.double() @ A.double())).float().flatten())
    return torch.cat(parts)


def loss_gap(run: Path) -> dict[str, float] | None:
    """Logged training loss of the run minus that of its lora sibling (same seed), first 10 and last third of
    steps; None without a sibling."""
    sibling = run.parent.parent / "lora" / run.name / "metrics.jsonl"
    if not sibling.is_file():
        return None

    def losses(path: Path) -> list[float]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r and "eval_loss" not in r]

    mine, lora = losses(run / "metrics.jsonl"), losses(sibling)
    gap = [a - b for a, b in zip(mine, lora)]
    third = len(gap) - len(gap) // 3
    return {"first_10": statistics.fmean(gap[:10]), "last_third": statistics.fmean(gap[third:])}


def measure(run: Path, args: argparse.Namespace) -> dict:
    """The report of one run (see the module's docstring)."""
    checkpoint = last_checkpoint(run)
    cfg = yaml.safe_load((run / "train_config.yaml").read_text())
    loaded, adapter_cfg = read_peft_adapter(run / "adapter")
    probe_args = build_parser().parse_args(["--adapter", str(run / "adapter"), "--data", cfg["data"], "--data-cache",
                                            "none", "--batch-size", str(args.batch_size), "--seq-len",
                                            str(cfg["seq_len"]), "--bf16", str(cfg["bf16"])])
    engine, _, model, bank, data = load_adapted(probe_args, adapter_cfg["base_model_name_or_path"], loaded)
    examples = data.eval_set.select(range(min(args.max_examples, len(data.eval_set))))
    probe = Probe(model, bank, examples, engine, args.batch_size, data.pad_id)
    E = dense_aux(checkpoint.branches["aux"], [s.name for s in bank.shapes]).to(engine.device)
    radius = float(E.norm())
    base = probe.loss()
    with probe.delta.attached(model):
        probe.delta.flat.copy_(E)
        aux = probe.loss() - base
        probe.delta.flat.zero_()
        g = probe.loss_and_grad(probe.delta)[1]
    adversarial, grad_norm = adversarial_increases(probe, [radius], args.adv_steps, base)
    random = [row[0] for row in random_increases(probe, [radius], args.draws, 0, base)]
    engine.close()
    return {"run": str(run), "rho": cfg["rho"], "checkpoint_step": checkpoint.step,
            "examples": len(examples), "radius": radius, "base_loss": base, "aux": aux,
            "adversarial": adversarial[0], "random_mean": statistics.fmean(random),
            "cosine": float(E @ g) / (radius * grad_norm), "grad_norm": grad_norm, "train_loss_gap": loss_gap(run)}


def mean_se(values: list[float]) -> str:
    """generalization.mean_se as signed text."""
    mean, se = generalization.mean_se(values)
    return f"{mean:+.5f} ± {se:.5f}"


def summarise(rows: list[dict]) -> list[dict]:
    """Per training ρ: mean ± standard error over the runs of each measure, and of aux / adversarial."""
    out = []
    for rho in sorted({r["rho"] for r in rows}):
        mine = [r for r in rows if r["rho"] == rho]
        gaps = [r["train_loss_gap"] for r in mine if r["train_loss_gap"]]
        gap_cells = {f"gap_{k}": mean_se([g[k] for g in gaps]) for k in ("first_10", "last_third")} if gaps else {}
        out.append({"rho": rho, "runs": len(mine), **{key: mean_se([r[key] for r in mine]) for key in
                    ("base_loss", "aux", "adversarial", "random_mean", "cosine")},
                    "aux_over_adversarial": mean_se([r["aux"] / r["adversarial"] for r in mine]),
                    **gap_cells})
    return out


def table(summary: list[dict]) -> str:
    head = ("| training ρ | runs | loss rise: auxiliary | adversarial, same radius | random, same radius | "
            "auxiliary / adversarial | cos(E, g) | train loss − lora, first 10 steps | last third |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        lines.append(f"| {s['rho']:g} | {s['runs']} | {s['aux']} | {s['adversarial']} | {s['random_mean']} | "
                     f"{s['aux_over_adversarial']} | {s['cosine']} | {s.get('gap_first_10', '—')} | "
                     f"{s.get('gap_last_third', '—')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="Bi-LoRA run directories")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bilora_aux.json")
    parser.add_argument("--max-examples", type=int, default=64, help="the first N training examples")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--adv-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    settings = {"max_examples": args.max_examples, "draws": args.draws, "adv_steps": args.adv_steps}
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows = [r for r in old.get("runs", []) if old.get("settings") == settings]  # others are measured again
    for run in args.runs:
        if any(r["run"] == str(run) for r in rows):
            continue
        r = measure(run, args)
        rows.append(r)
        gap = r["train_loss_gap"]
        print(f"{run}: rho {r['rho']}, radius {r['radius']:.4f}; loss {r['base_loss']:.4f} rises by {r['aux']:+.5f} "
              f"under the auxiliary, {r['adversarial']:+.5f} adversarial, {r['random_mean']:+.5f} random; "
              f"cos(E, g) {r['cosine']:+.4f}" + (f"; train loss vs lora {gap['first_10']:+.4f} (first 10 steps), "
                                                 f"{gap['last_third']:+.4f} (last third)" if gap else ""), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_suffix(".partial")
        partial.write_text(json.dumps({"settings": settings, "runs": rows, "summary": summarise(rows)}, indent=1))
        os.replace(partial, args.out)  # each run kept at once, never a half-written file
    print(table(summarise([r for r in rows if Path(r["run"]) in args.runs])))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
