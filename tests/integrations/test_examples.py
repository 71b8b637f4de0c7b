"""examples/: the TRL SFTTrainer and HF Trainer scripts run on the embedded model and task, their three Bi-LoRA
lines marked, and write an adapter PEFT loads."""

from __future__ import annotations

import sys

import pytest
from peft import PeftConfig

from tests_support import ROOT, run_ok

pytest.importorskip("trl", reason="the hf extra (trl) is part of the test extra")


@pytest.mark.parametrize("script", ["sft_bilora.py", "trainer_bilora.py"])
def test_example_runs_and_writes_a_peft_adapter(tmp_path, script):
    text = (ROOT / "examples" / script).read_text()
    assert [line.split("# Bi-LoRA")[1].strip() for line in text.splitlines() if "  # Bi-LoRA (" in line] == \
        ["(1/3)", "(2/3)", "(3/3)"]
    out = tmp_path / "out"
    proc = run_ok([sys.executable, f"examples/{script}", "--max-steps", "2", "--output-dir", str(out)], timeout=900)
    assert "auxiliary norm 0.0500 (rho 0.05)" in proc.stdout and f"adapter written to {out}" in proc.stdout
    assert PeftConfig.from_pretrained(str(out)).r == 8 and (out / "adapter_model.safetensors").is_file()
