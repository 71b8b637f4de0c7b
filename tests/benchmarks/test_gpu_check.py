"""benchmarks/gpu_check.py, the one command for a GPU machine, runs end to end in its --smoke mode on the CPU."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys

import pytest

from tests_support import ROOT, run_env, run_ok

CHECKS = ("bilora step", "PEFT parity", "squeeze", "packing", "packing")  # packing: sdpa's mask, packed


def test_smoke_run_passes_every_check_and_reports_every_variant(tmp_path):
    proc = run_ok([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--device", "cpu", "--steps", "1",
                   "--out", str(tmp_path)], timeout=300)
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert all(line.startswith("PASS") for line in verdicts), "\n".join(verdicts)
    assert [next(name for name in CHECKS if name in line) for line in verdicts] == list(CHECKS)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [c["passed"] for c in report["checks"]] == [True] * len(CHECKS)
    with_4bit = importlib.util.find_spec("bitsandbytes") is not None  # its CPU NF4 path runs here
    assert [s["base"] for s in report["throughput"]] == ["float32", "nf4"][:1 + with_4bit]
    for section in report["throughput"]:
        rows = {r["variant"]: r for r in section["rows"]}
        assert list(rows) == ["lora", "bilora", "lora-sam", "peft", "peft, HF loss", "lora, default policy",
                              "bilora, default policy"]
        assert all(r["tokens_per_s"] > 0 and r["tflops_per_s"] > 0 for r in rows.values())
        # our lora and PEFT train exactly the same parameters; bilora adds an auxiliary of rank 8
        lora = rows["lora"]["adapter_params"]
        assert {rows[v]["adapter_params"] for v in ("peft", "peft, HF loss", "lora-sam", "lora, default policy")} == {lora}
        assert rows["bilora"]["adapter_params"] == rows["bilora, default policy"]["adapter_params"] == lora * 3 // 2
        assert section["ratios"]["bilora/lora tokens/s"] > 0
        # the CPU's free memory holds the tiny model without recomputation; Liger runs on CUDA only
        assert section["default_policy"].startswith("checkpointing off (planned peak ")
        assert section["default_policy"].endswith("kernels none: auto: Liger not used, it runs on CUDA only")
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("# GPU check: CPU") and "| lora-sam |" in table and "| peft |" in table


def test_step_flops_formula(monkeypatch):
    """Two examples of 3 and 5 tokens, N = 10 base weights, 2 adapter weights, 2 passes (lora-sam)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    gpu_check = importlib.import_module("gpu_check")
    shapes = gpu_check.SMOKE  # 2 layers, hidden 64
    # per token 4N + 6 N_adapter = 52; attention 12 c d per layer over contexts 1..3 and 1..5 = 6 + 15 = 21
    want = 2 * (8 * 52 + 12 * 2 * 64 * 21)
    assert gpu_check.step_flops(shapes, 10, 2, [3, 5], passes=2) == want


def test_the_check_imports_neither_deepspeed_nor_datasets():
    """The GPU machine has torch, transformers and peft only: importing the script (every bilora_dist module it
    uses) must not pull in deepspeed or datasets."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import gpu_check; "
            "print(sorted({'deepspeed', 'datasets'} & set(sys.modules)))")
    assert run_ok([sys.executable, "-c", code]).stdout.strip().splitlines()[-1] == "[]"


def test_the_deepspeed_wheel_is_pure_python_and_imports(tmp_path):
    """scripts/gpu_wheels.sh builds deepspeed with no op compiled; installed alone into a directory it imports."""
    import zipfile

    run_ok(["bash", "scripts/gpu_wheels.sh", str(tmp_path / "whl")], env=run_env(GPU_WHEELS_DEEPSPEED_ONLY="1"),
           timeout=300)
    wheels = list((tmp_path / "whl").glob("*.whl"))
    assert [w.name for w in wheels] == ["deepspeed-0.19.8-py3-none-any.whl"]
    assert not [n for n in zipfile.ZipFile(wheels[0]).namelist() if n.endswith((".so", ".pyd"))]
    run_ok([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(tmp_path / "site"),
            str(wheels[0])])
    proc = run_ok([sys.executable, "-c", "import deepspeed, deepspeed.git_version_info as v; "
                   "print(deepspeed.__file__, deepspeed.__version__, any(v.installed_ops.values()))"],
                  env=run_env(PYTHONPATH=str(tmp_path / "site")), cwd=tmp_path)
    path, version, compiled = proc.stdout.split()[-3:]
    assert path.startswith(str(tmp_path / "site")) and version == "0.19.8" and compiled == "False"


@pytest.mark.slow
def test_e2e_lora_on_three_engines_agrees_on_the_held_out_loss(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    run_ok([sys.executable, "benchmarks/gpu_e2e.py", str(tmp_path / "e2e"), str(tmp_path / "tok"), "--small", "--runs",
            "lora_single,lora_fsdp_1gpu,lora_zero3_1gpu"], timeout=900)
    report = json.loads((tmp_path / "e2e" / "e2e.json").read_text())
    assert all(report[name]["rc"] == 0 for name in ("lora_single", "lora_fsdp_1gpu", "lora_zero3_1gpu"))
    assert report["engines"]["engines_agree"] and None not in report["engines"]["held_out_loss"].values()
