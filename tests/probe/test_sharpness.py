"""Sharpness probe (bilora_dist/probe/sharpness.py): first-order limits against the gradient of a dense merged copy
taken by plain autograd, the ordering of the three probes, exact restoration, and the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

from bilora_dist.adapters import AdapterBank, Branch, inject, layer_shapes, select_targets
from bilora_dist.cli import run_cli
from bilora_dist.data import IGNORE, prepare_examples
from bilora_dist.data.tokenize import TokenizeOptions
from bilora_dist.engines.base import Engine
from bilora_dist.export.peft import save_peft_adapter
from bilora_dist.training.loss import attach_head_loss
from bilora_dist.probe.cli import sharpness_main
from bilora_dist.probe.sharpness import Probe, lora_adversarial_increases, probe_sharpness
from tests_support import run_cmd, run_ok, two_ranks

RHOS = [1e-3, 0.05, 0.3]
SEQ_LEN = 64


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A rank-4 adapter on q_proj, v_proj and down_proj with random A and B (B non-zero, as after training)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    shapes = layer_shapes(model, select_targets(model, "q_proj,v_proj,down_proj"))
    gen = torch.Generator().manual_seed(5)
    pairs = [(torch.randn(4, s.in_features, generator=gen) / s.in_features ** 0.5,
              torch.randn(s.out_features, 4, generator=gen) * 0.05) for s in shapes]
    path = tmp_path_factory.mktemp("sharpness") / "adapter"
    save_peft_adapter(Branch.from_factors(shapes, pairs, [2.0] * len(shapes)), path, ["q_proj", "v_proj", "down_proj"],
                      str(tiny_model_dir), {})
    return path


@pytest.fixture(scope="module")
def examples(tokenizer, module_data):
    return prepare_examples(str(module_data[1]), "--data", tokenizer, TokenizeOptions(SEQ_LEN), cache="none",
                            log=lambda message: None).examples


def adapted_branch(adapter_dir: Path) -> Branch:
    from bilora_dist.export.peft_io import read_peft_adapter

    return read_peft_adapter(adapter_dir)[0]


@pytest.fixture(scope="module")
def dense_gradients(tiny_model_dir, adapter, examples) -> list[torch.Tensor]:
    """d L / d W_i of every adapted layer of a plain HF copy with W0 + s B A merged in, L the mean token loss of
    full-vocabulary logits over the examples (one right-padded batch), by plain autograd."""
    branch = adapted_branch(adapter)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).requires_grad_(False)
    weights = []
    with torch.no_grad():
        for i, shape in enumerate(branch.shapes):
            A, B = branch.factors(i)
            weight = model.get_submodule(shape.name).weight
            weight += branch.scales[i] * B @ A
            weights.append(weight.requires_grad_(True))
    rows = [examples[i] for i in range(len(examples))]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE).backward()
    return [w.grad.double() for w in weights]


@pytest.fixture(scope="module")
def probed(tiny_model_dir, adapter, examples, tokenizer):
    """The probe over the tiny Llama with the adapter hooked in, its report, and the weights before it ran."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).requires_grad_(False)
    branch = adapted_branch(adapter)
    bank = AdapterBank(branch.shapes, branch)
    inject(model, bank)
    attach_head_loss(model, 16)
    hooks = {s.name: len(model.get_submodule(s.name)._forward_hooks) for s in branch.shapes}
    before = {k: v.clone() for k, v in model.state_dict().items()}, branch.flat.detach().clone(), hooks
    probe = Probe(model, bank, examples, Engine(), 8, tokenizer.pad_token_id)
    return probe, probe_sharpness(probe, RHOS, draws=3, adv_steps=3, seed=1), before


def test_adversarial_increase_is_rho_times_the_gradient_norm_in_the_limit(probed, dense_gradients):
    _, report, _ = probed
    want = float(torch.cat([g.flatten() for g in dense_gradients]).norm())
    assert report["grad_norm"] == pytest.approx(want, rel=1e-3)
    assert report["results"][0]["adversarial"] == pytest.approx(RHOS[0] * want, rel=0.05)


def test_a_subset_of_measures_gives_the_same_numbers(probed):
    """--measure adversarial runs the dense ascent alone: the full report's numbers, nothing else measured."""
    probe, report, _ = probed
    alone = probe_sharpness(probe, RHOS, draws=3, adv_steps=3, seed=1, measures=("adversarial",))
    assert alone["grad_norm"] == pytest.approx(report["grad_norm"], rel=1e-6)
    for row, ref in zip(alone["results"], report["results"]):
        assert row["adversarial"] == pytest.approx(ref["adversarial"], rel=1e-5)
        assert row["random_mean"] is row["lora_adversarial"] is None
    assert alone["lora_grad_norm"] is None and alone["measures"] == ["adversarial"]


def test_lora_sam_step_matches_its_first_order_value(probed, dense_gradients, adapter):
    """One normalised ascent step on the factors, d = t g_f with g_f = (s B^T G, s G A^T) from the dense
    gradient G: at first order the loss rises by <G, J d> = rho ||g_f||^2 / ||J g_f||, J g_f = s (dB A + B dA)."""
    probe, report, _ = probed
    branch = adapted_branch(adapter)
    factor_sq, change_sq = 0.0, 0.0
    for i, G in enumerate(dense_gradients):
        A, B = (t.detach().double() for t in branch.factors(i))
        s = branch.scales[i]
        dA, dB = s * B.T @ G, s * G @ A.T
        factor_sq += float(dA.square().sum() + dB.square().sum())
        change_sq += float((s * (dB @ A + B @ dA)).square().sum())
    assert report["lora_grad_norm"] == pytest.approx(factor_sq ** 0.5, rel=1e-3)
    rho = RHOS[0]
    got = lora_adversarial_increases(probe, [rho], 1, report["base_loss"])[0][0]
    assert got == pytest.approx(rho * factor_sq / change_sq ** 0.5, rel=0.05)


def test_probes_are_ordered(probed):
    _, report, _ = probed
    for row in report["results"]:
        assert row["adversarial"] > row["random_mean"] + row["random_std"]
        assert row["lora_adversarial"] <= row["adversarial"]
    # at first order the full-space step is the maximum (Cauchy-Schwarz) and a random direction gains nothing
    small = report["results"][0]
    assert small["lora_adversarial"] <= small["first_order"] * 1.01
    assert abs(small["random_mean"]) < 0.05 * small["adversarial"]


def test_weights_and_factors_are_restored_bitwise(probed):
    probe, _, (weights, factors, hooks) = probed
    after = probe.model.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], v) for k, v in weights.items())
    assert torch.equal(probe.bank.primary.flat.detach(), factors)
    assert {n: len(probe.model.get_submodule(n)._forward_hooks) for n in hooks} == hooks  # the dense hooks are gone
    assert not probe.delta.flat.any()


def cli_args(adapter: Path, data: Path, out: Path) -> list[str]:
    return ["--adapter", str(adapter), "--data", str(data), "--rho", "0.01,0.1", "--draws", "2", "--adv-steps", "2",
            "--max-examples", "8", "--seq-len", str(SEQ_LEN), "--data-cache", "none", "--out", str(out)]


@pytest.fixture(scope="module")
def single_report(adapter, module_data, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("cli") / "s" / "sharp.json"
    proc = run_ok([sys.executable, "launch/sharpness.py", *cli_args(adapter, module_data[1], out)])
    return out, proc.stdout


def test_cli_writes_report_and_plot(single_report):
    out, stdout = single_report
    report = json.loads(out.read_text())
    assert {"adapter", "model", "data", "examples", "engine", "base_loss", "grad_norm", "lora_grad_norm", "draws",
            "adv_steps", "results"} <= report.keys()
    assert report["examples"] == 8 and [r["rho"] for r in report["results"]] == [0.01, 0.1]
    assert all(r.keys() == {"rho", "random_mean", "random_std", "adversarial", "lora_adversarial", "first_order"}
               for r in report["results"])
    assert out.with_suffix(".png").stat().st_size > 0 and "plot to" in stdout


def test_fsdp_two_ranks_give_the_single_process_numbers(single_report, adapter, module_data, tmp_path):
    """Two FSDP2 ranks, each with half the examples and a sharded base, perturbed through the same hooks."""
    out = tmp_path / "fsdp.json"
    run_ok(two_ranks("torchrun") + ["launch/sharpness.py", "--engine", "fsdp", *cli_args(adapter, module_data[1], out)])
    want, got = json.loads(single_report[0].read_text()), json.loads(out.read_text())
    assert (got["engine"], got["world_size"]) == ("fsdp2", 2)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    for row, ref in zip(got["results"], want["results"]):  # loss differences of a ~10.8 loss: a few float32 ulps
        assert all(row[k] == pytest.approx(ref[k], abs=1e-5) for k in ref)


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "/nonexistent", "--data", "x.jsonl"], "--adapter /nonexistent: no such directory"),
    (["--rho", "0.1,0", "--data", "x.jsonl"], "every radius must be a finite number > 0"),
    (["--rho", "a", "--data", "x.jsonl"], "expected comma-separated numbers"),
    (["--draws", "0", "--data", "x.jsonl"], "--draws must be >= 1"),
    (["--measure", "adversarial,hessian", "--data", "x.jsonl"], "expected some of random,adversarial,lora"),
])
def test_bad_input_is_one_line(argv, message, adapter, capsys):
    if "--adapter" not in argv:
        argv = ["--adapter", str(adapter), *argv]
    assert run_cli(sharpness_main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_module_entry_point_reports_an_adapter_without_weights(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    proc = run_cmd([sys.executable, "-m", "bilora_dist", "probe", "--adapter", str(tmp_path), "--data", "x.jsonl"])
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "not a PEFT adapter directory" in proc.stderr
