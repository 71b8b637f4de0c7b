"""Gradient checkpointing chosen from the memory plan: the least recomputation that fits the budget."""

from __future__ import annotations

import pytest

from bilora_dist.cli import run_cli, train_main
from bilora_dist.config.train import parse_config
from bilora_dist.memory.run_plan import build_run_plan
from bilora_dist.memory.recompute import HEADROOM, Recompute, choose
from tests_support import step_rows


def test_choose_takes_the_fewest_recomputed_blocks_that_fit():
    peaks = lambda blocks: 100 - 10 * len(blocks)  # noqa: E731 - each recomputed block saves 10 bytes
    assert choose(8, peaks, int(100 / (1 - HEADROOM)) + 1).describe() == "off"
    assert choose(8, peaks, int(80 / (1 - HEADROOM)) + 1).describe() == "every 4-th block (2 of 8)"
    assert choose(8, peaks, int(60 / (1 - HEADROOM)) + 1).describe() == "every 2-th block (4 of 8)"
    assert choose(8, peaks, int(50 / (1 - HEADROOM)) + 1).describe() == "all 8 blocks"  # no every-K gives 5
    short = choose(8, peaks, 10)
    assert short.every == 1 and "exceeds" in short.why and "expect to run out of memory" in short.why
    assert Recompute(3, 8, "").blocks == {0, 3, 6}


@pytest.mark.parametrize("outcome", ["off", "every 2-th block (1 of 2)", "all 2 blocks"])
def test_memory_budget_decides_and_the_gradients_stay(outcome, tiny_model_dir, small_data, tmp_path, capsys):
    args = ["--model", str(tiny_model_dir), "--data", str(small_data[0]), "--eval-data", str(small_data[1]),
            "--max-steps", "2", "--micro-batch-size", "4", "--seq-len", "64", "--eval-on-start", "false"]
    plan = build_run_plan(parse_config(args), 1)
    peaks = {"off": plan.peak_bytes(set()), "every 2-th block (1 of 2)": plan.peak_bytes({0}),
             "all 2 blocks": plan.peak_bytes({0, 1})}
    assert peaks["off"] > peaks["every 2-th block (1 of 2)"] > peaks["all 2 blocks"]
    budget = int(peaks[outcome] / (1 - HEADROOM)) + 1024
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert run_cli(train_main, args + ["--output-dir", str(ref), "--gradient-checkpointing", "false"]) == 0
    capsys.readouterr()
    assert run_cli(train_main, args + ["--output-dir", str(out), "--memory-budget", f"{budget}B"]) == 0
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("gradient checkpointing")]
    assert line == [f"gradient checkpointing {outcome}: planned peak {peaks[outcome] / 2**30:.2f} GiB within "
                    f"{int(budget * (1 - HEADROOM)) / 2**30:.2f} GiB ({budget / 2**30:.2f} GiB budget less 10% "
                    "headroom)"]
    for got, want in zip(step_rows(out), step_rows(ref)):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
