"""benchmarks/generalization.py end to end on the tiny model: runs, resumes, aggregates."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import generalization  # noqa: E402


def test_subsets_take_the_first_k_of_every_class(tmp_path):
    data = generalization.TASKS["wordnet"][0]
    rows = [json.loads(line) for line in generalization.subset("wordnet", 2, tmp_path).read_text().splitlines()]
    labels = json.loads((data / "labels.json").read_text())
    assert sorted(r["completion"].strip() for r in rows) == sorted(labels * 2)
    eval_rows = (data / "eval.jsonl").read_text().splitlines()
    assert len(eval_rows) >= 1000 and not {json.loads(e)["prompt"] for e in eval_rows} & {r["prompt"] for r in rows}


def test_quotation_subsets_are_the_first_k_and_disjoint_from_the_held_out_set(tmp_path):
    data = generalization.TASKS["quotes"][0]
    rows = generalization.subset("quotes", 5, tmp_path).read_text().splitlines()
    assert rows == (data / "train.jsonl").read_text().splitlines()[:5]
    train = {json.loads(line)["text"] for line in (data / "train.jsonl").read_text().splitlines()}
    held_out = [json.loads(line)["text"] for line in (data / "eval.jsonl").read_text().splitlines()]
    assert len(held_out) == len(set(held_out)) == 900 and not train & set(held_out)
    assert all("\n-- " in text for text in held_out)  # every quotation ends with its attribution


def test_study_runs_resumes_and_summarises(tiny_model_dir, tmp_path, capsys):
    argv = ["--model", str(tiny_model_dir), "--sizes", "1", "--configs", "bilora rho 0.05", "--epochs", "1",
            "--sharpness-examples", "8", "--sharpness-rhos", "0.01,0.05,0.1", "--jobs", "2", "--work",
            str(tmp_path / "runs"), "--out", str(tmp_path / "study.json"), "--plot", str(tmp_path / "study.png")]
    generalization.main([*argv, "--seeds", "1"])
    generalization.main([*argv, "--seeds", "0,1"])  # seed 1 is read back, seed 0 added to the same file
    report = json.loads((tmp_path / "study.json").read_text())
    assert [(r["config"], r["seed"], r["steps"]) for r in report["runs"]] == [
        ("bilora rho 0.05", 0, 3), ("bilora rho 0.05", 1, 3)]  # 1 epoch of 24 records, micro-batch 8
    for r in report["runs"]:
        assert 0 <= r["accuracy"] <= 1 and r["eval_loss"] > 0 and set(r["sharpness"]) == {"0.01", "0.05", "0.1"}
        assert all(s["adversarial"] > 0 for s in r["sharpness"].values())
    (row,) = report["summary"]
    accuracies = [r["accuracy"] for r in report["runs"]]
    assert row["accuracy"][0] == pytest.approx(sum(accuracies) / 2)
    assert row["accuracy"][1] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2)  # s.e. of two values
    assert (tmp_path / "study.png").stat().st_size > 0
    metrics = tmp_path / "runs" / "wordnet" / "k1" / "bilora_rho_0.05" / "seed0" / "metrics.jsonl"
    stamp = metrics.stat().st_mtime_ns
    generalization.main([*argv, "--seeds", "0,1"])  # every run is read back, none retrained
    assert metrics.stat().st_mtime_ns == stamp
    assert "| 1 | bilora rho 0.05 | 2 | 3 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other settings"):  # runs of another step budget are not mixed in
        generalization.main([*argv, "--seeds", "0", "--epochs", "2"])
    # in another results file they run, over what the first study left in the same --work
    generalization.main([*argv, "--seeds", "0", "--epochs", "2", "--out", str(tmp_path / "two_epochs.json")])
    assert [r["steps"] for r in json.loads((tmp_path / "two_epochs.json").read_text())["runs"]] == [6]


def test_a_task_without_classes_reports_held_out_loss(tiny_model_dir, tmp_path, capsys):
    generalization.main(["--task", "quotes", "--model", str(tiny_model_dir), "--sizes", "8", "--seeds", "0",
                         "--configs", "lora", "--epochs", "1", "--sharpness-examples", "4", "--sharpness-rhos", "0.05",
                         "--work", str(tmp_path / "runs"), "--out", str(tmp_path / "quotes.json")])
    (run,) = json.loads((tmp_path / "quotes.json").read_text())["runs"]
    assert run["accuracy"] is None and run["eval_loss"] > 0 and run["steps"] == 1
    assert "| 8 | lora | 1 | 1 | — |" in capsys.readouterr().out


def test_differences_to_lora_are_paired_by_size_and_seed():
    def run(config, seed, accuracy, sharp, size=8):
        return {"size": size, "config": config, "seed": seed, "steps": 3, "accuracy": accuracy, "eval_loss": 1.0,
                "sharpness": {"0.05": {"adversarial": sharp}}}

    runs = [run("lora", 0, 0.50, 0.30), run("lora", 1, 0.70, 0.20), run("bilora rho 0.05", 0, 0.52, 0.25),
            run("bilora rho 0.05", 1, 0.71, 0.18), run("bilora rho 0.05", 2, 0.90, 0.10),  # seed 2: no lora pair
            run("lora", 0, 0.10, 0.90, size=16)]
    (row,) = generalization.paired_vs_lora(runs)
    assert (row["size"], row["config"], row["seeds"]) == (8, "bilora rho 0.05", 2)
    assert row["accuracy"] == pytest.approx((0.015, 0.005))  # differences 0.02 and 0.01
    assert row["adversarial"]["0.05"] == pytest.approx((-0.035, 0.015))  # -0.05 and -0.02
    assert row["eval_loss"] == (0.0, 0.0)


def test_the_variants_validation_split_is_carved_from_training_and_never_trained_on(tmp_path):
    import aux_variants

    data = generalization.TASKS["wordnet"][0]
    validation = [json.loads(line) for line in aux_variants.validation_split(tmp_path).read_text().splitlines()]
    labels = json.loads((data / "labels.json").read_text())
    assert sorted(r["completion"].strip() for r in validation) == sorted(labels * aux_variants.VALIDATION_PER_CLASS)
    train = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    assert all(r in train for r in validation)
    largest = 32 - aux_variants.VALIDATION_PER_CLASS
    trained = {json.loads(line)["prompt"]
               for line in generalization.subset("wordnet", largest, tmp_path).read_text().splitlines()}
    assert not trained & {r["prompt"] for r in validation}
    held_out = {json.loads(line)["prompt"] for line in (data / "eval.jsonl").read_text().splitlines()}
    assert not held_out & {r["prompt"] for r in validation}
