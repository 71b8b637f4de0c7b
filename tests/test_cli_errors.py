"""Every bad input of interface.md ends in one clear line and exit status 2, and damages nothing saved."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from bilora_dist.cli import run_cli, train_main
from bilora_dist.config.train import parse_config
from tests_support import error_line, run_cmd, run_ok


@pytest.fixture
def base_args(tiny_model_dir, small_data, tmp_path):
    return ["--model", str(tiny_model_dir), "--data", str(small_data[0]), "--eval-data", str(small_data[1]),
            "--max-steps", "1", "--micro-batch-size", "2", "--output-dir", str(tmp_path / "out")]


def _with(args: list[str], **flags: str) -> list[str]:
    out = list(args)
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def test_missing_data_file(capsys, base_args, tmp_path):
    assert "file not found" in error_line(capsys, _with(base_args, data=str(tmp_path / "nope.jsonl")))


def test_malformed_record_names_the_line(capsys, base_args, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion": \n')
    assert "line 2: malformed JSON" in error_line(capsys, _with(base_args, data=str(bad)))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "fine"}\n{"question": "x"}\n')
    assert "line 2: not a text record like the rest of the dataset (expected text; keys are ['question'])" in error_line(capsys, _with(base_args, data=str(wrong)))


def test_empty_dataset(capsys, base_args, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "dataset is empty" in error_line(capsys, _with(base_args, eval_data=str(empty)))


def test_rank_larger_than_a_layer(capsys, base_args):
    err = error_line(capsys, _with(base_args, rank="24"))
    assert "--rank 24 exceeds min(in, out) = 16 of layer model.layers.0.self_attn.k_proj" in err


def test_negative_rho(capsys, base_args):
    assert "--rho must be >= 0" in error_line(capsys, _with(base_args, rho="-0.1"))


def test_target_modules_matching_nothing(capsys, base_args):
    assert "matches no linear layer" in error_line(capsys, _with(base_args, target_modules="qkv_fused"))


def test_unknown_flag_and_unknown_yaml_key(capsys, base_args, tmp_path):
    assert "unrecognized arguments: --rnak" in error_line(capsys, base_args + ["--rnak", "4"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rank: 4\nlearning_rate: 0.1\n")
    assert "unknown key 'learning_rate'" in error_line(capsys, base_args + ["--config", str(cfg)])


@pytest.mark.parametrize("flag,value,message", [
    ("lr", "-1", "--lr must be > 0"), ("micro_batch_size", "0", "--micro-batch-size must be >= 1"),
    ("warmup_ratio", "1.5", "--warmup-ratio must be in [0, 1)"), ("method", "sam", "invalid choice: 'sam'"),
    ("rank", "four", "invalid int value: 'four'")])
def test_out_of_range_values(capsys, base_args, flag, value, message):
    assert message in error_line(capsys, _with(base_args, **{flag: value}))


def test_a_failed_run_leaves_the_saved_run_untouched(capsys, base_args, tmp_path):
    assert run_cli(train_main, base_args) == 0
    out = tmp_path / "out"
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    assert (out / "adapter" / "adapter_model.safetensors") in digest
    capsys.readouterr()
    assert "already holds a run" in error_line(capsys, base_args)
    resume = _with(base_args, data=str(tmp_path / "gone.jsonl"), resume="auto")
    assert "file not found" in error_line(capsys, resume)
    assert "--method" in error_line(capsys, _with(base_args, method="lora", resume="auto"))  # another run's checkpoint
    # a longer budget would switch learning-rate schedules midway (step 2 at lr 0, then another curve)
    longer = error_line(capsys, _with(base_args, max_steps="2", resume="auto"))
    assert "the checkpoint's run has 1 steps" in longer and "this run has 2" in longer
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()} == digest


@pytest.mark.parametrize("text,message", [
    ("rho: abc\n", "rho: expected a number, got 'abc'"),
    ("rank: 2.5\n", "rank: expected an integer, got 2.5"),
    ("bf16: maybe\n", "bf16: 'maybe' is not one of auto, true, false"),
    ("packing: maybe\n", "packing: expected true or false, got 'maybe'"),
    ("method: sam\n", "method: 'sam' is not one of lora, bilora, lora-sam"),
    ("target_modules: 7\n", "target_modules: expected a string, got 7"),
    ("lerning_rate: 0.1\n", "unknown key 'lerning_rate'"),
    ("lrr: 0.1\n", "unknown key 'lrr' (did you mean 'lr'?)"),
    ("rho: -0.5\n", "--rho must be >= 0")])
def test_yaml_values_are_checked_like_flags(capsys, base_args, tmp_path, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert message in error_line(capsys, base_args + ["--config", str(cfg)])


def test_yaml_strings_mean_what_yaml_1_2_says(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-4` as a string and a quoted 'no' as a true-ish string."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("bf16: 'no'\ngradient_checkpointing: 'yes'\nlr: 1e-4\nrank: '4'\nrho: null\n")
    parsed = parse_config(["--config", str(cfg)])
    assert (parsed.bf16, parsed.gradient_checkpointing, parsed.lr, parsed.rank, parsed.rho) == ("false", "true", 1e-4, 4, 0.05)


def test_aux_scale_must_be_positive(capsys, base_args):
    assert "--aux-scale must be > 0" in error_line(capsys, _with(base_args, aux_scale="0"))


def test_launcher_prints_one_line_without_traceback(tmp_path):
    proc = run_cmd([sys.executable, "launch/train.py", "--rho", "-1"], timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --rho must be >= 0, got -1.0"
    assert "Traceback" not in proc.stderr


def test_yaml_config_is_overridden_by_flags_and_written_resolved(base_args, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rank: 4\nalpha: 8\nmethod: lora-sam\n")
    assert run_cli(train_main, _with(base_args, config=str(cfg), alpha="2")) == 0
    resolved = yaml.safe_load((tmp_path / "out" / "train_config.yaml").read_text())
    assert (resolved["rank"], resolved["alpha"], resolved["method"], resolved["rho"]) == (4, 2.0, "lora-sam", 0.01)
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 2.0)


def test_ds_config_that_is_not_json_or_misspelt(capsys, base_args, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text("{not json")
    assert "malformed JSON at line 1" in error_line(capsys, base_args + ["--ds_config", str(ds)])
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_com": True}}))
    assert "did you mean" in error_line(capsys, base_args + ["--ds_config", str(ds)])


def test_ds_config_batch_size_must_agree_with_the_flags(capsys, base_args, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 3}}))
    assert "train_batch_size 64 != micro 2 x accum 1 x world 1" in error_line(capsys, base_args + ["--ds_config", str(ds)])


def test_single_engine_under_a_multi_process_launcher(capsys, base_args, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "--engine single runs one process" in error_line(capsys, base_args + ["--engine", "single"])
    assert not (Path(base_args[-1]) / "metrics.jsonl").exists()


def test_negative_checkpoint_counts(capsys, base_args):
    assert "--save-every must be >= 0" in error_line(capsys, _with(base_args, save_every="-1"))
    assert "--keep-last must be >= 0" in error_line(capsys, _with(base_args, keep_last="-2"))


def test_export_errors(capsys, tmp_path):
    from bilora_dist.export.cli import export_main

    def fail(argv: list[str]) -> str:
        assert run_cli(export_main, argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        return err

    existing = tmp_path / "exists"
    existing.mkdir()
    assert "no such directory" in fail(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert "already exists" in fail(["--checkpoint", str(tmp_path), "--out", str(existing)])
    assert "holds no checkpoint" in fail(["--checkpoint", str(existing), "--out", str(tmp_path / "o")])
    assert "--shard-size '2 lots'" in fail(["--checkpoint", str(existing), "--out", str(tmp_path / "o"),
                                            "--shard-size", "2 lots"])
    assert not (tmp_path / "o").exists()


FREE_AND_MEASURE = """
import sys, torch
from bilora_dist.cli import return_freed_cpu_memory
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "set":
    assert return_freed_cpu_memory()
before = rss()
for megabytes in (16, 16, 12, 12, 8, 8):  # activation-sized buffers, each freed before the next
    buffer = torch.ones(megabytes * 2**18)
    del buffer
print(rss() - before)
"""


def test_freed_cpu_buffers_go_back_to_the_system():
    """Training on the CPU sets glibc's mmap threshold: buffers freed within a step leave the process's resident
    memory; with glibc's default (a threshold that rises at the first large free) they stay in its heap."""
    default, fixed = (float(run_ok([sys.executable, "-c", FREE_AND_MEASURE, mode]).stdout)
                      for mode in ("default", "set"))
    assert default >= 8 and fixed < 4, (default, fixed)


@pytest.mark.parametrize("value", ["true", "false"])
def test_eval_on_start_decides_the_evaluation_before_training(base_args, tmp_path, value):
    from bilora_dist.recipe.train import train

    result = train(parse_config(_with(base_args, eval_on_start=value, max_steps="2")))
    evals = [r["step"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r]
    assert evals == ([0, 2] if value == "true" else [2])
    assert (result["before"] is None) == (value == "false") and result["after"]["eval_loss"] > 0


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_rank_of_a_multi_process_launch_exits_at_once(monkeypatch, world_size):
    """One process exits through the interpreter; a rank of a launch flushes its streams and leaves at once,
    skipping the native teardown that now and then aborted a finished 2-rank run."""
    from bilora_dist import cli

    calls = []
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(cli.os, "_exit", lambda code: calls.append(("os._exit", code)))
    monkeypatch.setattr(cli.sys.stdout, "flush", lambda: calls.append(("flush", "stdout")))
    with pytest.raises(SystemExit) as exited:  # reached under world size 2 only because os._exit is patched
        cli.exit_process(3)
    assert exited.value.code == 3
    assert calls == ([] if world_size == "1" else [("flush", "stdout"), ("os._exit", 3)])
