"""Checkpoints: exact resume on every engine (Bi-LoRA with a squeeze between save and end), pre-emption
by SIGTERM, a write killed by SIGKILL, corrupted and incompatible checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bilora_dist.checkpoint.store import find_checkpoint, list_checkpoints, load_checkpoint, verify
from tests_support import (ROOT, assert_trained_close, checkpoint_fixture, launcher, read_metrics, run_cmd, run_env,
                           run_ok, step_rows, tiny_llama_config)

STEPS, SAVE_AT = 8, 4
# Bi-LoRA whose primary is squeezed 8 -> 4 after step 6: between the step-4 checkpoint and the end
SQUEEZE = ["--rank", "8", "--squeeze", "cont:8->4@6", "--squeeze-min-stage", "1"]


def args(model: Path, data: tuple[Path, Path], out: Path, accum: int, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(data[0]), "--eval-data", str(data[1]), "--method", "bilora",
            "--max-steps", str(STEPS), "--micro-batch-size", "4", "--grad-accum", str(accum), "--lr", "2e-3",
            "--warmup-ratio", "0", "--rho", "0.02", "--save-every", str(SAVE_AT), "--keep-last", "0",
            "--output-dir", str(out), *SQUEEZE, *extra]


def assert_identical_from(resumed: Path, full: Path, step: int) -> None:
    """Same losses (exactly) for every step after `step`, bit-identical adapters and optimizer at the end."""
    want = [(r["step"], r["loss"]) for r in step_rows(full) if r["step"] > step]
    got = [(r["step"], r["loss"]) for r in step_rows(resumed) if r["step"] > step]
    assert got == want and len(got) == STEPS - step
    a = load_file(full / "checkpoints" / f"step_{STEPS}" / "adapters.safetensors")
    b = load_file(resumed / "checkpoints" / f"step_{STEPS}" / "adapters.safetensors")
    assert a.keys() == b.keys() == {"primary", "aux"}
    assert a["primary"].numel() < a["aux"].numel()  # the squeeze happened in both runs
    for key in a:
        assert torch.equal(a[key], b[key]), key
    opt_a = torch.load(full / "checkpoints" / f"step_{STEPS}" / "optimizer.pt", weights_only=True)
    opt_b = torch.load(resumed / "checkpoints" / f"step_{STEPS}" / "optimizer.pt", weights_only=True)
    for pid, state in opt_a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["optimizer"]["state"][pid][name]), name


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, module_data):
    """The uninterrupted run of each engine, launched once, on demand."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = tmp_path_factory.mktemp(f"full_{kind}") / "run"
            run_ok(launcher(kind) + args(tiny_model_dir, module_data, cache[kind], 2 if kind == "single" else 1))
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["single", "zero3", "fsdp"])
def test_resume_continues_bit_identically(kind, full_run, tiny_model_dir, module_data, tmp_path):
    accum = 2 if kind == "single" else 1
    full, resumed = full_run(kind), tmp_path / "resumed"
    assert [p.name for p in list_checkpoints(full / "checkpoints")] == [f"step_{STEPS}", f"step_{SAVE_AT}"]
    proc = run_ok(launcher(kind) + args(tiny_model_dir, module_data, resumed, accum,
                                     "--resume", str(full / "checkpoints" / f"step_{SAVE_AT}")))
    assert f"resuming from {full / 'checkpoints' / f'step_{SAVE_AT}'}" in proc.stdout + proc.stderr
    assert_identical_from(resumed, full, SAVE_AT)
    # the frozen base never enters a checkpoint: it holds the adapters and their state only
    sizes = sum(f.stat().st_size for f in (full / "checkpoints" / f"step_{STEPS}").iterdir())
    assert sizes < 200_000


def trained_factors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every layer's A and B of both branches of a checkpoint."""
    return {f"{name}.{shape.name}.{part}": t for name, branch in load_checkpoint(checkpoint).branches.items()
            for i, shape in enumerate(branch.shapes) for part, t in zip("AB", branch.factors(i))}


def test_resume_on_another_world_size(full_run, tiny_model_dir, module_data, tmp_path):
    """A one-process checkpoint continued by 2 FSDP ranks (same global batch) ends where the one-process run does,
    up to summation order (the squeeze after step 6 included)."""
    full, resumed = full_run("single"), tmp_path / "resumed"
    run_ok(launcher("fsdp") + args(tiny_model_dir, module_data, resumed, 1,
                                "--resume", str(full / "checkpoints" / f"step_{SAVE_AT}")))
    want = trained_factors(full / "checkpoints" / f"step_{STEPS}")
    assert len(want) == 4 * 14  # A and B of 14 layers, primary and auxiliary
    assert_trained_close(trained_factors(resumed / "checkpoints" / f"step_{STEPS}"), want)


def test_sigterm_saves_and_resume_auto_finishes_the_run(full_run, tiny_model_dir, module_data, tmp_path):
    full, stopped = full_run("single"), tmp_path / "stopped"
    cmd = launcher("single") + args(tiny_model_dir, module_data, stopped, 2, "--save-every", "0")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # the run announces itself once the model is loaded, before step 1
        if line.startswith("bilora on"):
            break
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    stop_rows = [r for r in read_metrics(stopped) if "stopped_by" in r]
    assert len(stop_rows) == 1 and stop_rows[0]["stopped_by"] == "SIGTERM"
    at = stop_rows[0]["step"]
    assert 1 <= at < STEPS and [p.name for p in list_checkpoints(stopped / "checkpoints")] == [f"step_{at}"]
    assert f"stopped by SIGTERM after step {at}" in output and not (stopped / "adapter").exists()
    proc = run_ok(cmd + ["--resume", "auto"])
    assert f"resuming from {stopped / 'checkpoints' / f'step_{at}'}" in proc.stdout + proc.stderr
    assert_identical_from(stopped, full, at)
    assert [r["step"] for r in step_rows(stopped)] == list(range(1, STEPS + 1))  # no step logged twice


KILLED_WRITER = """
import sys, time, torch
from bilora_dist.checkpoint import store as checkpoint
from tests_support import checkpoint_fixture
out = sys.argv[1]
def stall(obj, path, *a, **k):  # dies half-way through writing optimizer.pt
    open(path, "wb").write(b"partial")
    open(out + "/writing", "w").close()
    time.sleep(600)
torch.save = stall
checkpoint_fixture(out, step=2)
"""


def test_sigkill_mid_write_leaves_the_previous_checkpoint(tmp_path):
    checkpoint_fixture(tmp_path, step=1)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=ROOT / "tests", env=run_env())
    deadline = time.time() + 120
    while not (tmp_path / "writing").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    root = tmp_path / "checkpoints"
    assert [p.name for p in root.glob(".tmp-step_2-*")] and not (root / "step_2").exists()
    assert find_checkpoint(tmp_path, "auto", pytest.fail) == root / "step_1"
    assert load_checkpoint(root / "step_1").step == 1
    # the next save clears the leftover of the killed write
    checkpoint_fixture(tmp_path, step=3)
    assert not list(root.glob(".tmp-step_*")) and verify(root / "step_3") is None


def test_corrupted_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    checkpoint_fixture(tmp_path, step=1)
    checkpoint_fixture(tmp_path, step=2)
    weights = tmp_path / "checkpoints" / "step_2" / "adapters.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    warnings: list[str] = []
    assert find_checkpoint(tmp_path, "auto", warnings.append) == tmp_path / "checkpoints" / "step_1"
    assert warnings == [f"warning: skipping checkpoint {tmp_path / 'checkpoints' / 'step_2'}: "
                        "adapters.safetensors fails its checksum"]


def test_keep_last_prunes_older_checkpoints(tmp_path):
    for step in (1, 2, 3):
        checkpoint_fixture(tmp_path, step=step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_3", "step_2"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_model_dir, module_data) -> Path:
    out = tmp_path_factory.mktemp("saved") / "run"
    run_ok(launcher("single") + args(tiny_model_dir, module_data, out, 2, "--max-steps", "4", "--squeeze-min-stage", "0",
                                  "--squeeze", "cont:8->4@2"))
    return out


@pytest.mark.parametrize("change, named", [(["--method", "lora"], "--method"), (["--rank", "4", "--squeeze", ""], "--rank"),
                                           (["--squeeze", "cont:8->2@2"], "--squeeze"), (["--model", "OTHER"], "--model")])
def test_incompatible_resume_is_refused(saved_run, change, named, module_data, tmp_path, tiny_model_dir):
    from transformers import LlamaForCausalLM

    if "OTHER" in change:
        other = tmp_path / "other_model"
        LlamaForCausalLM(tiny_llama_config(int(json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]))
                         ).save_pretrained(other)
        for f in tiny_model_dir.glob("tokenizer*"):
            (other / f.name).write_bytes(f.read_bytes())
        change = ["--model", str(other)]
    before = {p: p.stat().st_mtime_ns for p in saved_run.rglob("*") if p.is_file()}
    cmd = launcher("single") + args(tiny_model_dir, module_data, saved_run, 2, "--max-steps", "4",
                                    "--squeeze", "cont:8->4@2", "--squeeze-min-stage", "0", *change,
                                    "--resume", str(saved_run / "checkpoints" / "step_4"))
    proc = run_cmd(cmd, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume") and named in lines[0], proc.stderr
    assert before == {p: p.stat().st_mtime_ns for p in saved_run.rglob("*") if p.is_file()}  # nothing touched


def test_unsupported_checkpoint_and_resume_errors(saved_run, tmp_path, module_data, tiny_model_dir):
    base = launcher("single") + args(tiny_model_dir, module_data, tmp_path / "new", 2)
    for extra, message in ((["--resume", str(tmp_path / "nowhere")], "no such checkpoint directory"),
                           (["--resume", str(saved_run)], "no manifest.json")):
        proc = run_cmd(base + extra, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    # an output directory that holds a run is never overwritten without --resume
    proc = run_cmd(launcher("single") + args(tiny_model_dir, module_data, saved_run, 2), timeout=300)
    assert proc.returncode == 2 and "--resume auto" in proc.stderr
    assert not (tmp_path / "new").exists()


def test_checkpoint_round_trip_in_process(tmp_path):
    bank, optimizer = checkpoint_fixture(tmp_path, step=5, return_state=True)
    loaded = load_checkpoint(tmp_path / "checkpoints" / "step_5")
    assert torch.equal(loaded.branches["primary"].flat, bank.primary.flat)
    assert torch.equal(loaded.branches["aux"].flat, bank.aux.flat)
    assert loaded.branches["primary"].ranks == bank.primary.ranks and loaded.state["consumed"] == 40
    state = optimizer.state_dict()["state"][0]
    assert torch.equal(loaded.optimizer["state"][0]["exp_avg"], state["exp_avg"])
    assert len(loaded.rng) == 1 and torch.equal(loaded.rng[0]["torch"], torch.get_rng_state())


def test_checkpoint_saved_on_a_gpu_rank_loads_onto_the_cpu(tmp_path, monkeypatch):
    """optimizer.pt and rng.pt as GPU rank 1 would have written them (storages tagged cuda:1) load here, on a
    machine without CUDA, onto the CPU; a plain torch.load of them would try to restore them onto cuda:1."""
    bank, optimizer = checkpoint_fixture(tmp_path, step=5, return_state=True)
    path = tmp_path / "checkpoints" / "step_5"
    saved = {name: torch.load(path / name, weights_only=True) for name in ("optimizer.pt", "rng.pt")}
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:1")
    for name, obj in saved.items():
        torch.save(obj, path / name)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path / "optimizer.pt", weights_only=True)
    loaded = load_checkpoint(path)
    moment = loaded.optimizer["state"][0]["exp_avg"]
    assert moment.device.type == "cpu" and torch.equal(moment, optimizer.state_dict()["state"][0]["exp_avg"])
    assert loaded.rng[0]["torch"].device.type == "cpu"
