"""benchmarks/generalization.py end to end on the tiny model: runs, resumes, aggregates."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import generalization  # noqa: E402


def test_subsets_take_the_first_k_of_every_class(tmp_path):
    rows = [json.loads(line) for line in generalization.subset(2, tmp_path).read_text().splitlines()]
    labels = json.loads((generalization.DATA / "labels.json").read_text())
    assert sorted(r["completion"].strip() for r in rows) == sorted(labels * 2)
    eval_rows = (generalization.DATA / "eval.jsonl").read_text().splitlines()
    assert len(eval_rows) >= 1000 and not {json.loads(e)["prompt"] for e in eval_rows} & {r["prompt"] for r in rows}


def test_study_runs_resumes_and_summarises(tiny_model_dir, tmp_path, capsys):
    argv = ["--model", str(tiny_model_dir), "--sizes", "1", "--seeds", "0,1", "--configs", "bilora rho 0.05",
            "--epochs", "1", "--sharpness-examples", "8", "--jobs", "2", "--work", str(tmp_path / "runs"), "--out",
            str(tmp_path / "study.json")]
    generalization.main(argv)
    report = json.loads((tmp_path / "study.json").read_text())
    assert [(r["config"], r["seed"], r["steps"]) for r in report["runs"]] == [
        ("bilora rho 0.05", 0, 3), ("bilora rho 0.05", 1, 3)]  # 1 epoch of 24 records, micro-batch 8
    for r in report["runs"]:
        assert 0 <= r["accuracy"] <= 1 and r["eval_loss"] > 0 and set(r["sharpness"]) == {"0.01", "0.05", "0.1"}
    (row,) = report["summary"]
    accuracies = [r["accuracy"] for r in report["runs"]]
    assert row["accuracy"][0] == pytest.approx(sum(accuracies) / 2)
    assert row["accuracy"][1] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2)  # s.e. of two values
    result = tmp_path / "runs" / "k1" / "bilora_rho_0.05" / "seed0" / "result.json"
    stamp = result.stat().st_mtime_ns
    generalization.main(argv)  # every run is read back, none retrained
    assert result.stat().st_mtime_ns == stamp
    assert "| 1 | bilora rho 0.05 | 2 | 3 |" in capsys.readouterr().out
