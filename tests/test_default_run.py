"""The main job: `python launch/train.py` with no flags fine-tunes the embedded model and beats the untuned one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from peft import LoraConfig

ROOT = Path(__file__).resolve().parents[1]


def assert_default_run_learned(out: Path) -> None:
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "accuracy" in r]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] > 0
    assert after["accuracy"] > before["accuracy"] + 0.15
    assert after["eval_loss"] < before["eval_loss"]
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert all(r["aux_norm"] <= 0.05 * (1 + 1e-6) for r in steps)
    assert {"step", "loss", "lr", "grad_norm", "aux_norm", "rank", "tokens_per_s", "elapsed_s"} <= set(steps[-1])
    assert LoraConfig.from_pretrained(str(out / "adapter")).r == 8
    assert json.loads((out / "adapter" / "bilora_dist.json").read_text())["method"] == "bilora"
    assert (out / "train_config.yaml").is_file() and any((out / "tensorboard").iterdir())


@pytest.mark.slow
def test_default_run_improves_held_out_accuracy(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "launch/train.py", "--output-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_default_run_learned(out)


@pytest.mark.slow
def test_deepspeed_launcher_runs_the_default_to_the_end(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(["deepspeed", "launch/train.py", "--output-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_default_run_learned(out)
    summary = next(r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "engine" in r)
    assert summary["engine"] == "deepspeed-zero3"
