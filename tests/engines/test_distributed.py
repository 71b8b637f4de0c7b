"""Sharded training on 2 processes over gloo: ZeRO-3, ZeRO-2, FSDP2 and 2-node torchrun against one process.

Every run trains the tiny model on the same global batch (single: micro 4 x accumulation 2; two ranks:
micro 4 x 1 x 2 ranks), so the per-step losses and gradient norms and the final adapters must agree with the
single run up to summation order.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests_support import (ROOT, assert_same_run, assert_trained_close, free_port, launcher,
                           read_metrics, relative_error, run_env, run_ok, step_rows, two_ranks)

STEPS = 6


def train_args(model: Path, data: tuple[Path, Path], out: Path, method: str, accum: int) -> list[str]:
    return ["--model", str(model), "--data", str(data[0]), "--eval-data", str(data[1]), "--method", method,
            "--max-steps", str(STEPS), "--micro-batch-size", "4", "--grad-accum", str(accum), "--lr", "2e-3",
            "--warmup-ratio", "0", "--rho", "0.02", "--replica-check-every", "1", "--output-dir", str(out)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, module_data):
    """Launch each (engine, method) run once, on demand; returns its output directory."""
    cache: dict[tuple[str, str, tuple[str, ...]], Path] = {}

    def get(kind: str, method: str, *extra: str) -> Path:
        if (kind, method, extra) not in cache:
            out = tmp_path_factory.mktemp(f"{kind}_{method}") / "run"
            cmd = launcher(kind) + train_args(tiny_model_dir, module_data, out, method, 2 if kind == "single" else 1)
            run_ok(cmd + list(extra))
            cache[kind, method, extra] = out
        return cache[kind, method, extra]

    return get


def summary(out: Path) -> dict:
    return next(r for r in read_metrics(out) if "base_held_numel" in r)


def assert_same_training(out: Path, ref: Path, products: bool = False) -> None:
    assert_same_run(out, ref, STEPS, products)


@pytest.mark.parametrize("method", ["lora", "bilora"])
@pytest.mark.parametrize("kind", ["zero3", "fsdp"])
def test_two_ranks_match_one_process(runs, kind, method):
    out = runs(kind, method)
    assert_same_training(out, runs("single", method))
    # after every step, both ranks held bit-identical adapters (auxiliary included, after projection)
    rows = step_rows(out)
    assert all(len(r["adapter_sha256"]) == 2 and len(set(r["adapter_sha256"])) == 1 for r in rows)
    if method == "bilora":
        assert all(r["aux_norm"] <= 0.02 * (1 + 1e-6) for r in rows)


def test_comparison_holds_under_summation_order_noise_and_catches_real_errors(runs, tiny_model_dir, module_data,
                                                                             tmp_path):
    """Another CPU sums in another order; beyond that, every base weight moved by up to 1 ulp and 2 threads instead
    of 1: the single run still matches. One layer off by 1e-3, or one gradient norm off by 1e-4, does not."""
    ref = runs("single", "bilora")
    model, out = tmp_path / "model", tmp_path / "run"
    shutil.copytree(tiny_model_dir, model)
    gen, eps = torch.Generator().manual_seed(0), torch.finfo(torch.float32).eps
    save_file({k: w * (1 + eps * (2 * torch.rand(w.shape, generator=gen) - 1))
               for k, w in load_file(model / "model.safetensors").items()}, model / "model.safetensors",
              metadata={"format": "pt"})
    run_ok(launcher("single") + train_args(model, module_data, out, "bilora", 2), env=run_env(OMP_NUM_THREADS="2"))
    assert_same_training(out, ref)
    adapter, want = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, ref))
    key = next(iter(want))
    with pytest.raises(AssertionError, match=key):
        assert_trained_close({**adapter, key: adapter[key] * (1 + 1e-3)}, want)
    rows = read_metrics(out)
    next(r for r in rows if "grad_norm" in r)["grad_norm"] *= 1 + 1e-4
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(AssertionError, match="grad_norm"):
        assert_same_training(out, ref)


@pytest.mark.parametrize("kind", ["zero3", "fsdp"])
def test_each_rank_holds_half_the_base_and_all_adapters(runs, kind, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    s, ref = summary(runs(kind, "bilora")), summary(runs("single", "bilora"))
    assert s["world_size"] == 2 and s["base_numel"] == total and ref["base_held_numel"] == [total]
    for held in s["base_held_numel"]:
        assert abs(held - total / 2) <= block, (held, total, block)
    assert s["adapter_numel"] == ref["adapter_numel"]  # replicated in full
    assert s["optimizer_state_bytes"] == ref["optimizer_state_bytes"]


def test_zero3_with_parameter_offload_matches_one_process(runs):
    out = runs("zero3_offload", "bilora")
    assert_same_training(out, runs("single", "bilora"))
    assert summary(out)["engine"] == "deepspeed-zero3"


def test_zero2_replicates_the_base_and_matches_one_process(runs):
    out = runs("zero2", "bilora")
    assert_same_training(out, runs("single", "bilora"))
    s = summary(out)
    assert s["engine"] == "deepspeed-zero2" and s["base_held_numel"] == [s["base_numel"]] * 2


def test_two_nodes_match_one_node(runs, tiny_model_dir, module_data, tmp_path):
    out = tmp_path / "run"
    port = free_port()
    procs = [subprocess.Popen(["torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--node-rank", str(node),
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t2n",
                               "-m", "bilora_dist", "train", "--engine", "fsdp"]  # torchrun -m: the CLI's module form
                              + train_args(tiny_model_dir, module_data, out, "bilora", 1),
                              cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-2000:] + logs[1][-2000:]
    assert_same_training(out, runs("fsdp", "bilora"))
    assert summary(out)["world_size"] == 2


def test_memory_plan_matches_what_the_engines_hold(runs, tiny_model_dir):
    for kind, flags in (("zero3", ["--ds_config", "ds_configs/zero3.json"]), ("fsdp", ["--engine", "fsdp"])):
        proc = run_ok([sys.executable, "launch/train.py", "--dry-run", "--plan-ranks", "2",
                       "--model", str(tiny_model_dir), *flags])
        plan = json.loads(proc.stdout.strip().splitlines()[-1])
        real = summary(runs(kind, "bilora"))
        for rank, planned in enumerate(plan["ranks"]):
            assert planned["base_bytes"] == pytest.approx(real["base_held_bytes"][rank], rel=0.10)
            assert planned["adapter_bytes"] == pytest.approx(real["adapter_numel"] * 4, rel=0.10)
            assert planned["adapter_grad_bytes"] == pytest.approx(real["adapter_sync_bytes"], rel=0.10)
            assert planned["optimizer_bytes"] == pytest.approx(real["optimizer_state_bytes"], rel=0.10)


def test_dry_run_plans_llama2_7b_on_eight_ranks_without_allocating():
    proc = run_ok([sys.executable, "launch/train.py", "--dry-run", "--plan-ranks", "8", "--bf16",
                   "--model", "benchmarks/model_configs/llama-2-7b", "--ds_config", "ds_configs/zero3.json"])
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plan["engine"] == "zero3" and len(plan["ranks"]) == 8
    n_params = 6_738_415_616  # Llama-2-7B
    # by hand: bf16 partition of 1/8 of every tensor; the 65 RMSNorm weights (4096 each) stay resident
    assert plan["ranks"][0]["base_bytes"] == pytest.approx(n_params * 2 / 8 + 65 * 4096 * 2, rel=1e-3)
    # r = 8 primary + 8 auxiliary on q,k,v,o (4096 -> 4096) and gate, up, down (4096 <-> 11008), fp32
    per_block = 4 * 16 * (4096 + 4096) + 3 * 16 * (4096 + 11008)
    assert plan["ranks"][0]["adapter_bytes"] == 32 * per_block * 4
    block_bytes = (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) * 2
    assert plan["ranks"][0]["gathered_block_bytes"] == block_bytes


ANNEAL = ("--rank", "8", "--squeeze", "in:8->2/2", "--squeeze-min-stage", "2")


@pytest.mark.parametrize("kind", ["zero3", "fsdp"])
def test_in_training_annealing_matches_one_process(runs, kind):
    out, ref = runs(kind, "bilora", *ANNEAL), runs("single", "bilora", *ANNEAL)
    assert_same_training(out, ref, products=True)
    ranks = [r["rank"] for r in step_rows(out)]
    assert ranks == [r["rank"] for r in step_rows(ref)] == [8, 4, 4, 2, 2, 2]
    events = [r for r in step_rows(out) if "squeeze_rank" in r]
    assert [(r["step"], r["squeeze_rank"]) for r in events] == [(2, 4), (4, 2)]
    # after each compression (and every other step) both ranks hold bit-identical adapters
    assert all(len(set(r["adapter_sha256"])) == 1 for r in events)
    provenance = json.loads((out / "adapter" / "bilora_dist.json").read_text())
    assert [e["rank"] for e in provenance["squeeze_history"]] == [4, 2]


@pytest.mark.parametrize("kind", ["single", "deepspeed", "fsdp"])
def test_gradient_checkpointing_keeps_the_gradients(kind, tiny_model_dir, tmp_path):
    """Adapter gradients of lora and bilora (the auxiliary's too) with recomputed activations, on every other block
    or on all, equal those with stored ones (1e-5 relative per branch), on every engine, and every rank holds the
    same; exactly the checkpointed blocks run twice."""
    start = [sys.executable] if kind == "single" else two_ranks(kind)
    run_ok(start + ["tests/checkpointing_worker.py", kind, str(tiny_model_dir), str(tmp_path)], timeout=600)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in ((0,) if kind == "single" else (0, 1))]
    for method in ("lora", "bilora"):
        plain = ranks[0][method, "off"]
        assert len(plain) == (2 if method == "bilora" else 1)
        assert [ranks[0][method, s, "calls"] for s in ("off", "every 2", "all")] == [[1, 1], [2, 1], [2, 2]]
        for setting in ("every 2", "all"):
            recomputed = ranks[0][method, setting]
            for want, got in zip(plain, recomputed):
                assert want.norm() > 0 and relative_error(got, want) <= 1e-5, (method, setting)
            assert all(torch.equal(g, want) for r in ranks for g, want in zip(r[method, setting], recomputed))

@pytest.mark.parametrize("kind", ["zero3", "fsdp"])
def test_aux_diagnostics_and_refresh_match_one_process(runs, kind):
    """Bi-LoRA's diagnostics (reduced like the loss) and refresh (from the all-reduced gradient sketch) on 2 ranks
    equal one process's."""
    flags = ("--aux-diagnostics-every", "2", "--aux-refresh", "3")
    out, ref = runs(kind, "bilora", *flags), runs("single", "bilora", *flags)
    assert_same_training(out, ref)
    got, want = ([r for r in step_rows(run) if r.get("aux_alignment") is not None] for run in (out, ref))
    assert [r["step"] for r in got] == [r["step"] for r in want] == [3, 5]
    for g, w in zip(got, want):
        for key in ("aux_alignment", "aux_gain", "aux_gain_ratio", "aux_best_gain"):
            assert g[key] == pytest.approx(w[key], rel=1e-3, abs=1e-7), key
