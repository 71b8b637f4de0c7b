"""Quality of LoRA-Squeeze on the embedded task: direct training at rank K vs post / cont / in-training
annealing from 4K to K, the same step budget, several seeds; and AdamW moments reset vs projected
across the three compressions of in-training annealing.

    python benchmarks/squeeze_quality.py [--seeds 0 1 2] [--source 16] [--target 4]

Every run is `launch/train.py` on the embedded default (Bi-LoRA, one epoch); the held-out accuracy and
loss after training (after the last compression) are read from its metrics.jsonl; the table gives the mean and
the standard error over seeds. Finished runs are kept in the results file and skipped when the study is run
again. Writes the table to stdout and docs/squeeze_quality.{md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def configs(source: int, target: int, steps: int) -> dict[str, list[str]]:
    """Label -> train.py flags. The LoRA scale alpha/r is 2 everywhere (a squeeze keeps the scale)."""
    squeeze = ["--rank", str(source), "--alpha", str(2 * source)]
    return {
        f"direct r{target}": ["--rank", str(target), "--alpha", str(2 * target)],
        f"post {source}->{target}": squeeze + ["--squeeze", f"post:{source}->{target}"],
        f"cont {source}->{target} reset": squeeze + ["--squeeze", f"cont:{source}->{target}@{steps // 2}",
                                                     "--squeeze-optimizer", "reset"],
        f"in {source}->{target}/3 reset": squeeze + ["--squeeze", f"in:{source}->{target}/3",
                                                     "--squeeze-optimizer", "reset"],
        f"in {source}->{target}/3 project": squeeze + ["--squeeze", f"in:{source}->{target}/3",
                                                       "--squeeze-optimizer", "project"],
    }


def run_one(flags: list[str], seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *flags, "--seed", str(seed),
                        "--output-dir", str(out), "--replica-check-every", "0"], check=True, cwd=ROOT)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "accuracy" in r][-1]
    trained = [r for r in rows if "loss" in r]
    return {"accuracy": final["accuracy"], "eval_loss": final["eval_loss"], "final_train_loss": trained[-1]["loss"],
            "rank": trained[-1]["rank"], "kept_energy": [r["kept_energy"] for r in rows if "kept_energy" in r]}


def standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def summarize(results: dict[str, dict[str, dict]]) -> list[tuple[str, int, float, float, float, float, list[float]]]:
    """(label, seeds, accuracy mean, s.e., loss mean, s.e., mean kept energy per compression) per configuration."""
    table = []
    for label, by_seed in results.items():
        acc = [r["accuracy"] for r in by_seed.values()]
        loss = [r["eval_loss"] for r in by_seed.values()]
        energy = [statistics.mean(e) for e in zip(*(r["kept_energy"] for r in by_seed.values()))]
        table.append((label, len(acc), statistics.mean(acc), standard_error(acc), statistics.mean(loss),
                      standard_error(loss), energy))
    return table


def plot(table: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [t[0] for t in table]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (mean, err, title) in zip(axes, ((2, 3, "held-out accuracy"), (4, 5, "held-out loss"))):
        ax.bar(range(len(table)), [t[mean] for t in table], yerr=[t[err] for t in table], capsize=4,
               color=["#888888"] + ["#4477aa"] * (len(table) - 1))
        ax.set_xticks(range(len(table)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{title} (mean ± s.e. over {table[0][1]} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--source", type=int, default=16)
    parser.add_argument("--target", type=int, default=4)
    parser.add_argument("--steps", type=int, default=98, help="steps of the default run (one epoch)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "squeeze_quality.json"))
    args = parser.parse_args()
    path = Path(args.results)
    results: dict[str, dict[str, dict]] = json.loads(path.read_text()) if path.exists() else {}
    for label, flags in configs(args.source, args.target, args.steps).items():
        for seed in args.seeds:
            if str(seed) in results.get(label, {}):
                continue
            print(f"== {label}, seed {seed}", file=sys.stderr, flush=True)
            results.setdefault(label, {})[str(seed)] = run_one(flags, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2))
    table = summarize(results)
    lines = ["| configuration | seeds | accuracy | held-out loss | mean kept energy per compression |",
             "|---|---|---|---|---|"]
    lines += [f"| {t[0]} | {t[1]} | {t[2]:.3f} ± {t[3]:.3f} | {t[4]:.3f} ± {t[5]:.3f} | "
              f"{', '.join(f'{e:.3f}' for e in t[6]) or '—'} |" for t in table]
    print("\n".join(lines))
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "squeeze_quality.md").write_text("\n".join(lines) + "\n")
    plot(table, docs / "squeeze_quality.png")


if __name__ == "__main__":
    main()
