"""benchmarks/bilora_aux.py on a tiny Bi-LoRA run, against a plain HF copy with the checkpoint merged in."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

from bilora_dist.data import IGNORE, prepare_examples
from bilora_dist.data.tokenize import TokenizeOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bilora_aux  # noqa: E402
import generalization  # noqa: E402

EXAMPLES = 8


@pytest.fixture(scope="module")
def measured(tiny_model_dir, tmp_path_factory) -> tuple[Path, dict, Path]:
    """A lora and a bilora ρ 0.05 run of the study's layout (3 steps), the script's report on the bilora one, and
    its results file."""
    root = tmp_path_factory.mktemp("aux")
    generalization.main(["--model", str(tiny_model_dir), "--sizes", "1", "--seeds", "0", "--epochs", "1",
                         "--configs", "lora,bilora rho 0.05", "--sharpness-examples", "4", "--sharpness-rhos", "0.05",
                         "--work", str(root / "runs"), "--out", str(root / "study.json")])
    run = root / "runs" / "wordnet" / "k1" / "bilora_rho_0.05" / "seed0"
    bilora_aux.main([str(run), "--max-examples", str(EXAMPLES), "--draws", "2", "--out", str(root / "aux.json")])
    return run, json.loads((root / "aux.json").read_text())["runs"][0], root / "aux.json"


def merged_factors(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{branch: {layer: s B A}} in float64, read from adapters.safetensors by its layout: the layers in order of
    (in, out, rank), ties in layer order, each as A (r×in) then B (out×r), one after another in the flat tensor."""
    out = {}
    with safe_open(str(checkpoint / "adapters.safetensors"), framework="pt") as f:
        for branch, rows in json.loads(f.metadata()["layout"]).items():
            flat, start, out[branch] = f.get_tensor(branch).double(), 0, {}
            for name, n, m, r, scale in sorted(rows, key=lambda row: (row[1], row[2], row[3])):
                A = flat[start:start + r * n].view(r, n)
                B = flat[start + r * n:start + r * (n + m)].view(m, r)
                out[branch][name] = scale * B @ A
                start += r * (n + m)
    return out


def reference(tiny_model_dir: Path, run: Path, tokenizer) -> tuple[float, float, float, float]:
    """(loss with the primary merged, with primary + auxiliary merged, ||E||, cos(E, dL/dW at the primary)) of a
    float64 HF copy over the first EXAMPLES training examples, full-vocabulary logits, plain autograd."""
    checkpoint = sorted((run / "checkpoints").glob("step_*"))[-1]
    deltas = merged_factors(checkpoint)
    train = yaml.safe_load((run / "train_config.yaml").read_text())["data"]
    examples = prepare_examples(train, "--data", tokenizer, TokenizeOptions(256), cache="none",
                                log=lambda message: None).examples
    rows = [examples[i] for i in range(EXAMPLES)]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])

    def loss(model) -> torch.Tensor:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double().requires_grad_(False)
    weights = {}
    with torch.no_grad():
        for name, delta in deltas["primary"].items():
            weights[name] = model.get_submodule(name).weight
            weights[name] += delta
    for w in weights.values():
        w.requires_grad_(True)
    base = loss(model)
    base.backward()
    E = torch.cat([deltas["aux"][n].flatten() for n in weights])
    g = torch.cat([w.grad.flatten() for w in weights.values()])
    with torch.no_grad():
        for name, w in weights.items():
            w += deltas["aux"][name]
        perturbed = loss(model)
    return base.item(), float(perturbed), float(E.norm()), float(E @ g / (E.norm() * g.norm()))


def test_the_auxiliary_rise_and_alignment_match_a_merged_copy(measured, tiny_model_dir, tokenizer):
    run, report, _ = measured
    base, perturbed, radius, cosine = reference(tiny_model_dir, run, tokenizer)
    assert report["examples"] == EXAMPLES and report["checkpoint_step"] == 3
    assert report["radius"] == pytest.approx(radius, rel=1e-5) and 0 < radius <= 0.05 * (1 + 1e-5)
    assert report["base_loss"] == pytest.approx(base, rel=1e-5)
    assert abs(perturbed - base) > 1e-4  # the check below can tell a wrong perturbation from none
    assert report["aux"] == pytest.approx(perturbed - base, abs=2e-5)
    assert report["cosine"] == pytest.approx(cosine, abs=1e-3)
    assert report["adversarial"] > report["aux"]  # 3 ascent steps of the same radius do at least as well


def test_the_training_loss_gap_is_read_from_both_runs_metrics(measured):
    run, report, _ = measured

    def losses(path: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]

    gap = [a - b for a, b in zip(losses(run / "metrics.jsonl"), losses(run.parents[1] / "lora" / "seed0" /
                                                                       "metrics.jsonl"))]
    assert len(gap) == 3
    assert report["train_loss_gap"]["first_10"] == pytest.approx(sum(gap) / 3)
    assert report["train_loss_gap"]["last_third"] == pytest.approx(gap[2])


def test_runs_already_measured_are_read_back(measured, monkeypatch, capsys):
    run, report, out = measured
    monkeypatch.setattr(bilora_aux, "measure", lambda *a: pytest.fail("measured again"))
    bilora_aux.main([str(run), "--max-examples", str(EXAMPLES), "--draws", "2", "--out", str(out)])
    assert json.loads(out.read_text())["runs"] == [report]
    assert "| 0.05 | 1 |" in capsys.readouterr().out


def test_a_run_without_an_auxiliary_is_refused_in_one_line(measured, tmp_path):
    run, _, _ = measured
    with pytest.raises(SystemExit, match="no auxiliary branch"):
        bilora_aux.main([str(run.parents[1] / "lora" / "seed0"), "--out", str(tmp_path / "aux.json")])
    with pytest.raises(SystemExit, match="no checkpoint"):
        bilora_aux.main([str(tmp_path), "--out", str(tmp_path / "aux.json")])
    assert not (tmp_path / "aux.json").exists()
