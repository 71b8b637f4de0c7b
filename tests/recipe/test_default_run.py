"""The main job: `bilora-dist train` with no flags fine-tunes the embedded model and beats the untuned one."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from peft import LoraConfig

from tests_support import read_metrics, run_ok, step_rows


def assert_default_run_learned(out: Path) -> None:
    evals = [r for r in read_metrics(out) if "accuracy" in r]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] > 0
    assert after["accuracy"] > before["accuracy"] + 0.15
    assert after["eval_loss"] < before["eval_loss"]
    steps = step_rows(out)
    assert all(r["aux_norm"] <= 0.05 * (1 + 1e-6) for r in steps)
    assert {"step", "loss", "lr", "grad_norm", "aux_norm", "rank", "tokens_per_s", "elapsed_s"} <= set(steps[-1])
    assert LoraConfig.from_pretrained(str(out / "adapter")).r == 8
    assert json.loads((out / "adapter" / "bilora_dist.json").read_text())["method"] == "bilora"
    assert (out / "train_config.yaml").is_file() and any((out / "tensorboard").iterdir())


@pytest.mark.slow
def test_default_run_improves_held_out_accuracy(tmp_path):
    out = tmp_path / "run"
    # in the caller's environment, as the README's command runs (not run_env's one thread per process)
    run_ok([str(Path(sys.executable).parent / "bilora-dist"), "train", "--output-dir", str(out)],
           env=dict(os.environ), timeout=900)
    assert_default_run_learned(out)


@pytest.mark.slow
def test_deepspeed_launcher_runs_the_default_to_the_end(tmp_path):
    out = tmp_path / "run"
    run_ok(["deepspeed", "--module", "bilora_dist", "train", "--output-dir", str(out)], env=dict(os.environ),
           timeout=900)
    assert_default_run_learned(out)
    summary = next(r for r in read_metrics(out) if "engine" in r)
    assert summary["engine"] == "deepspeed-zero3"
