"""Every number a run takes (flag, --config YAML key, --ds_config value) is checked against one table, the range
metadata on TrainConfig's fields: non-finite or out-of-range values end in one `error:` line and exit status 2
before anything is written; so do a ds_config that is not an object, a ds_config given to an engine that ignores
it, a --squeeze the run would refuse (in --dry-run too) and a rendezvous port another run holds (issue 32)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import fields

import pytest

from bilora_dist.cli import run_cli, train_main
from bilora_dist.config.train import TrainConfig, range_error
from tests_support import busy_port, ds_config_path, error_line, run_cmd, run_env

NUMERIC = [f for f in fields(TrainConfig) if f.type in ("int", "float", "float | None")]


@pytest.fixture
def out_args(tmp_path):
    return ["--output-dir", str(tmp_path / "out")]


@pytest.mark.parametrize("argv,line", [
    (["--alpha", "nan"], "--alpha must be a finite number > 0, got nan"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number >= 0, got nan"),
    (["--rho", "inf"], "--rho must be a finite number >= 0, got inf"),
    (["--epochs", "nan"], "--epochs must be a finite number >= 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--warmup-ratio", "nan"], "--warmup-ratio must be a finite number in [0, 1), got nan"),
    (["--adam-beta2", "1"], "--adam-beta2 must be in [0, 1), got 1.0"),
    (["--adam-epsilon=-inf"], "--adam-epsilon must be a finite number > 0, got -inf"),
    (["--aux-lr-scale", "0"], "--aux-lr-scale must be > 0, got 0.0"),
    (["--rank", "0"], "--rank must be >= 1, got 0"),
    (["--method", "lora", "--aux-rank", "0"], "--aux-rank must be >= 1, got 0"),
    (["--max-steps", "-1"], "--max-steps must be >= 0, got -1"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1, got 0"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["--epochs", "0"], "one of --max-steps or --epochs must be > 0")])
def test_flag_out_of_range_or_not_finite(capsys, out_args, tmp_path, argv, line):
    assert error_line(capsys, argv + out_args) == f"error: {line}"
    assert not (tmp_path / "out").exists()


def test_launcher_epochs_nan_is_one_line_not_a_traceback(tmp_path):
    """`python launch/train.py --epochs nan` ended in `ValueError: cannot convert float NaN to integer`."""
    proc = run_cmd([sys.executable, "launch/train.py", "--epochs", "nan", "--output-dir", str(tmp_path / "out")],
                   timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: --epochs must be a finite number >= 0, got nan"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", [f.name for f in NUMERIC])
def test_every_numeric_field_has_a_range_and_refuses_non_finite_values(name):
    """The table covers every number: a field added without a range fails here."""
    meta = next(f for f in NUMERIC if f.name == name).metadata
    assert {"ge", "gt"} & set(meta), f"{name}: no lower bound in its _opt(..., ge=/gt=) metadata"
    assert range_error(name, getattr(TrainConfig(), name)) is None  # the default is in range
    kind = next(f for f in NUMERIC if f.name == name).type
    for value in (math.nan, math.inf, -math.inf):
        problem = range_error(name, value)
        assert problem and problem.startswith(f"--{name.replace('_', '-')} must be"), (value, problem)
        if kind != "int":
            assert "finite" in problem
    low = meta.get("ge", meta.get("gt"))
    assert range_error(name, low - 1 if kind == "int" else low - 0.5) is not None


@pytest.mark.parametrize("text,line", [
    ("alpha: .nan\n", "--alpha must be a finite number > 0, got nan (from --config {path} alpha)"),
    ("max_grad_norm: .inf\n",
     "--max-grad-norm must be a finite number >= 0, got inf (from --config {path} max_grad_norm)"),
    ("epochs: .nan\n", "--epochs must be a finite number >= 0, got nan (from --config {path} epochs)"),
    ("rho: -.inf\n", "--rho must be a finite number >= 0, got -inf (from --config {path} rho)"),
    ("grad_accum: 0\n", "--grad-accum must be >= 1, got 0 (from --config {path} grad_accum)"),
    ("rank: .nan\n", "--config {path}: rank: expected an integer, got nan")])
def test_yaml_values_are_checked_by_the_same_table(capsys, out_args, tmp_path, text, line):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert error_line(capsys, ["--config", str(cfg)] + out_args) == "error: " + line.format(path=cfg)


@pytest.mark.parametrize("content,line", [
    ('[{"zero_optimization": {"stage": 3}}]', "expected a JSON object of DeepSpeed keys, got a JSON array"),
    ('"zero3"', "expected a JSON object of DeepSpeed keys, got a JSON string"),
    ('{"gradient_clipping": NaN}', 'gradient_clipping must be a finite number or "auto", got nan'),
    ('{"optimizer": {"type": "AdamW", "params": {"lr": Infinity}}}',
     'optimizer.params.lr must be a finite number or "auto", got inf')])
def test_ds_config_that_is_not_an_object_or_not_finite(capsys, out_args, tmp_path, content, line):
    ds = tmp_path / "ds.json"
    ds.write_text(content)
    assert error_line(capsys, ["--ds_config", str(ds)] + out_args) == f"error: --ds_config {ds}: {line}"


@pytest.mark.parametrize("engine", ["single", "fsdp"])
def test_ds_config_needs_the_deepspeed_engine(capsys, out_args, tmp_path, engine):
    """`--engine single --ds_config ds_configs/zero3.json` ran without ZeRO-3 and said nothing."""
    zero3 = ds_config_path("zero3")
    err = error_line(capsys, ["--engine", engine, "--ds_config", zero3] + out_args)
    assert err == (f"error: --engine {engine} does not use --ds_config {zero3} (its ZeRO stage would be ignored); "
                   "pass --engine deepspeed, or leave --engine auto (--ds_config and the deepspeed launcher pick "
                   "deepspeed), or drop --ds_config")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,line", [
    (["--squeeze", "post:16->4"], "--squeeze 'post:16->4' starts at rank 16 but --rank is 8; pass --rank 16"),
    (["--squeeze", "post:8-4"], "--squeeze 'post:8-4': expected post:R->K, cont:R->K@STEP or in:R->K/STAGES"),
    (["--squeeze", "post:8->8"], "--squeeze 'post:8->8': the target rank must be between 1 and 7"),
    (["--squeeze", "cont:8->4@5", "--max-steps", "100"],
     "--squeeze 'cont:8->4@5': stages of 5 and 95 steps; each must last at least --squeeze-min-stage 20 of the "
     "run's 100 steps"),
    (["--squeeze", "in:8->4/3", "--max-steps", "30"],
     "--squeeze 'in:8->4/3': 4 stages of 7 steps in a 30-step run; each must last at least --squeeze-min-stage 20")])
def test_dry_run_refuses_the_squeeze_the_run_refuses(capsys, argv, line):
    assert error_line(capsys, ["--dry-run"] + argv) == f"error: {line}"


def test_dry_run_accepts_a_valid_squeeze(capsys):
    assert run_cli(train_main, ["--dry-run", "--squeeze", "post:8->4", "--gradient-checkpointing", "false"]) == 0
    assert "memory plan:" in capsys.readouterr().out


def test_a_second_launch_on_a_busy_port_names_it_in_one_line(tmp_path):
    """Two DeepSpeed-launched ranks whose --master_port another process listens on: rank 0, whose store cannot
    listen there, says so in one line instead of an EADDRINUSE traceback. (torchrun's agent listens on
    --master-port itself and fails before any rank starts: that traceback is torchrun's own.)"""
    with busy_port() as port:
        proc = run_cmd(["deepspeed", "--num_gpus", "2", "--master_port", str(port), "launch/train.py",
                        "--ds_config", ds_config_path("zero3"), "--max-steps", "1",
                        "--output-dir", str(tmp_path / "out")], timeout=400)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "EADDRINUSE" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    assert lines == [f"error: port {port} on 127.0.0.1 (the process group's rendezvous) is already in use, by "
                     "another run? Give this launch a free port: deepspeed --master_port N, torchrun --master-port "
                     "N (or --rdzv-endpoint HOST:N), or MASTER_PORT=N without a launcher"], proc.stderr[-3000:]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_single_process_on_a_busy_master_port_names_it(tmp_path):
    """`MASTER_PORT=N python launch/train.py --engine fsdp` with N taken: the same line, exit status 2."""
    with busy_port() as port:
        proc = run_cmd([sys.executable, "launch/train.py", "--engine", "fsdp", "--max-steps", "1",
                        "--output-dir", str(tmp_path / "out")], env=run_env(MASTER_PORT=str(port)), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: port {port} on 127.0.0.1")
