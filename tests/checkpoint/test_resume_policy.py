"""Resume policy and the output directory's lifecycle (docs/RESUME.md): every setting refused or honoured on resume,
key by key, as RESUME_POLICY says; one run per output directory (its lock); a directory a failed run left reused;
a finished one never overwritten silently."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from bilora_dist.checkpoint.store import (BUDGET, HONOUR, IDENTITY_KEYS, IGNORE, REFUSE, RESUME_POLICY, describe_changes,
                                    honoured_changes, list_checkpoints, policy_markdown)
from bilora_dist.cli import run_cli, train_main
from bilora_dist.config.train import TrainConfig, parse_config
from bilora_dist.checkpoint.preemption import LOCK_NAME
from tests_support import ROOT, launcher, read_metrics, run_env, step_rows, tiny_llama_config

HOST = socket.gethostname()


def _args(model: Path, data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(data[0]), "--eval-data", str(data[1]), "--method", "bilora",
            "--max-steps", "4", "--save-every", "2", "--keep-last", "0", "--micro-batch-size", "2", "--lr", "2e-3",
            "--scheduler", "constant", "--warmup-ratio", "0", "--squeeze", "cont:8->4@3", "--squeeze-min-stage", "1",
            "--eval-on-start", "false", "--output-dir", str(out), *extra]


def _run(capsys, argv: list[str], code: int = 0) -> str:
    """Run the trainer in this process; its stdout if it exits with `code` 0, else its one `error:` line."""
    got = run_cli(train_main, argv)
    captured = capsys.readouterr()
    assert got == code, captured.err[-3000:]
    if code == 0:
        return captured.out
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _snapshot(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_dir, module_data) -> Path:
    """A finished 4-step Bi-LoRA run with checkpoints at steps 2 and 4 (a squeeze after step 3)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    assert run_cli(train_main, _args(tiny_model_dir, module_data, out)) == 0
    return out


# ---- the table, in code and in docs/RESUME.md


def test_every_setting_has_a_resume_policy():
    """A new TrainConfig field fails here until RESUME_POLICY (bilora_dist/checkpoint/store.py) gives it a policy."""
    assert set(RESUME_POLICY) == {f.name for f in fields(TrainConfig)}
    assert {policy for policy, _ in RESUME_POLICY.values()} == {REFUSE, BUDGET, HONOUR, IGNORE}


def test_resume_doc_holds_the_generated_policy_table():
    doc = (ROOT / "docs" / "RESUME.md").read_text()
    assert policy_markdown() in doc, "regenerate the table of docs/RESUME.md with checkpoint.policy_markdown()"
    assert "docs/RESUME.md" in (ROOT / "README.md").read_text().split("### Faults")[1].split("\n## ")[0]


# ---- refused settings, key by key: one line naming the setting and the saved value, nothing touched

REFUSED_CHANGES = {"method": ["--method", "lora", "--squeeze", ""], "rank": ["--rank", "4", "--squeeze", ""],
                   "alpha": ["--alpha", "8"], "aux_rank": ["--aux-rank", "4"], "aux_scale": ["--aux-scale", "0.5"],
                   "aux_optimizer": ["--aux-optimizer", "sgd-normalized"],
                   "target_modules": ["--target-modules", "q_proj"],
                   "squeeze": ["--squeeze", "cont:8->4@2"], "squeeze_min_stage": ["--squeeze-min-stage", "0"],
                   "squeeze_ranks": ["--squeeze-ranks", "linear"], "data_format": ["--data-format", "text"],
                   "train_on_prompt": ["--train-on-prompt"], "last_turn_only": ["--last-turn-only"],
                   "seq_len": ["--seq-len", "128"], "packing": ["--packing"], "seed": ["--seed", "1"]}
SAVED_SHOWN = {"method": "--method 'bilora'", "rank": "--rank 8", "alpha": "--alpha 16.0", "aux_rank": "--aux-rank 8",
               "aux_scale": "--aux-scale 1.0", "aux_optimizer": "--aux-optimizer 'adamw'",
               "target_modules": "--target-modules 'all-linear'", "squeeze": "--squeeze 'cont:8->4@3'",
               "squeeze_min_stage": "--squeeze-min-stage 1", "squeeze_ranks": "--squeeze-ranks 'geometric'",
               "data_format": "--data-format 'auto'", "train_on_prompt": "--train-on-prompt False",
               "last_turn_only": "--last-turn-only False", "seq_len": "--seq-len 256", "packing": "--packing False",
               "seed": "--seed 0"}


@pytest.mark.parametrize("key", IDENTITY_KEYS)
def test_each_refused_setting_is_refused_with_its_line(key, saved, capsys, tiny_model_dir, module_data, tmp_path):
    change = REFUSED_CHANGES.get(key)
    saved_shown = SAVED_SHOWN.get(key)
    if key == "model":
        from transformers import LlamaForCausalLM

        other = tmp_path / "other_model"
        vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
        LlamaForCausalLM(tiny_llama_config(vocab)).save_pretrained(other)
        for f in tiny_model_dir.glob("tokenizer*"):
            (other / f.name).write_bytes(f.read_bytes())
        change, saved_shown = ["--model", str(other)], f"--model {str(tiny_model_dir.resolve())!r}"
    if key == "data":  # the same records under another path are the same data; other records are not
        same = tmp_path / "copy.jsonl"
        same.write_bytes(module_data[0].read_bytes())
        out = _run(capsys, _args(tiny_model_dir, (same, module_data[1]), tmp_path / "copy", "--resume",
                                 str(saved / "checkpoints" / "step_2")))
        assert "resuming from" in out
        change, saved_shown = ["--data", str(module_data[1])], f"--data {str(module_data[0])!r} (files sha256 "
    before = _snapshot(saved)
    line = _run(capsys, _args(tiny_model_dir, module_data, saved, *change, "--resume", "auto"), code=2)
    assert line.startswith(f"error: --resume {saved / 'checkpoints' / 'step_4'}: the checkpoint was written with "
                           f"{saved_shown}"), line
    assert "start a new --output-dir" in line
    assert _snapshot(saved) == before and not (saved / LOCK_NAME).exists()


def test_another_step_budget_is_refused_with_its_line(saved, capsys, tiny_model_dir, module_data):
    line = _run(capsys, _args(tiny_model_dir, module_data, saved, "--max-steps", "6", "--resume", "auto"), code=2)
    assert "the checkpoint's run has 4 steps" in line and "this run has 6" in line


# ---- honoured settings: key by key in the comparison, and end to end


def _other_value(key: str, value):
    field = {f.name: f for f in fields(TrainConfig)}[key]
    if "choices" in field.metadata:
        return next(c for c in field.metadata["choices"] if c != value)
    if isinstance(value, bool):
        return not value
    if value is None or isinstance(value, float):
        return 0.5 if value in (None, 0.25) else value / 2 if value else 0.25
    if isinstance(value, int):
        return value + 1
    return value + "x"


@pytest.mark.parametrize("key", [k for k, (policy, _) in RESUME_POLICY.items() if policy != REFUSE])
def test_each_honoured_setting_is_said_and_each_ignored_one_is_not(key, tmp_path):
    config = vars(parse_config(["--method", "bilora"]))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    changed = {**config, key: _other_value(key, config[key])}
    changes = honoured_changes(tmp_path, changed)
    if RESUME_POLICY[key][0] == IGNORE:
        assert changes == []
    else:
        assert changes == [(key, config[key], changed[key])]
        assert f"--{key.replace('_', '-')} {config[key]!r} -> {changed[key]!r}" in describe_changes(changes)


def test_changed_lr_and_others_are_honoured_said_and_recorded(saved, capsys, tiny_model_dir, module_data, tmp_path):
    """Issue 32: `--lr 0.1` on resume ran with the checkpoint's lr while train_config.yaml said 0.1. Now the run
    continues with the new lr (and the other changes), says so in one line, and records what ran."""
    out = tmp_path / "resumed"
    changes = ["--lr", "0.1", "--aux-lr-scale", "0.5", "--weight-decay", "0.01", "--max-grad-norm", "0.5", "--rho",
               "0.03", "--eval-every", "3", "--micro-batch-size", "4", "--epochs", "2"]
    stdout = _run(capsys, _args(tiny_model_dir, module_data, out, "--resume", str(saved / "checkpoints" / "step_2"),
                                *changes))
    (line,) = [x for x in stdout.splitlines() if x.startswith("resume honours changed settings")]
    for flag, value in zip(changes[::2], changes[1::2]):
        assert f"{flag} " in line and f"-> {float(value) if '.' in value or 'e' in value else int(value)!r}" in line
    assert [r["lr"] for r in step_rows(out)] == [0.1, 0.1]  # steps 3 and 4 ran at the new lr
    assert [r["step"] for r in read_metrics(out) if "accuracy" in r] == [3, 4]
    final = torch.load(out / "checkpoints" / "step_4" / "optimizer.pt", weights_only=True)["optimizer"]
    assert [g["lr"] for g in final["param_groups"]] == [0.1, 0.05]
    assert [g["weight_decay"] for g in final["param_groups"]] == [0.01, 0.0]
    recorded = (out / "train_config.yaml").read_text()
    assert yaml.safe_load(recorded)["lr"] == 0.1
    note = recorded.splitlines()[-1]
    assert note.startswith(f"# resumed at step 2 from {saved / 'checkpoints' / 'step_2'} with ")
    assert " lr 0.002 -> 0.1," in note and note.endswith("(steps 1-2 ran with the earlier values)")
    assert yaml.safe_load((out / "checkpoints" / "step_4" / "config.yaml").read_text())["lr"] == 0.1


# ---- the output directory


def test_a_second_run_on_the_directory_is_refused_naming_the_holder(capsys, tiny_model_dir, module_data, tmp_path):
    """Issue 32: a second run (--resume auto) on a directory a run trains in crashed with FileNotFoundError on a
    checkpoint the first had rotated away. Now it is refused; the first runs on and releases the lock at exit."""
    out = tmp_path / "run"
    cmd = launcher("single") + _args(tiny_model_dir, module_data, out, "--max-steps", "100000", "--squeeze", "",
                                     "--save-every", "1", "--keep-last", "2")
    first = subprocess.Popen(cmd, cwd=ROOT, env=run_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        for text in first.stdout:  # announced once the model is loaded, before step 1
            if text.startswith("bilora on"):
                break
        deadline = time.time() + 60
        while not list_checkpoints(out / "checkpoints") and time.time() < deadline:
            time.sleep(0.1)
        line = _run(capsys, _args(tiny_model_dir, module_data, out, "--max-steps", "100000", "--squeeze", "",
                                  "--resume", "auto"), code=2)
        assert line.startswith(f"error: --output-dir {out} is in use by another run (host {HOST}, pid {first.pid}, ")
        assert "wait for it to end or choose another --output-dir" in line
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid  # the refused run left it alone
    finally:
        first.send_signal(signal.SIGTERM)
        output, _ = first.communicate(timeout=300)
    assert first.returncode == 0 and "stopped by SIGTERM" in output
    assert not (out / LOCK_NAME).exists()  # released by the stopped run


def test_a_stale_lock_is_taken_over_and_every_exit_releases_the_lock(capsys, tiny_model_dir, module_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"host": HOST, "pid": dead.pid, "start": None, "since": time.time()}))
    stdout = _run(capsys, _args(tiny_model_dir, module_data, out, "--max-steps", "2", "--squeeze", ""))
    assert f"taking over the stale lock {out / LOCK_NAME} of pid {dead.pid} on {HOST} (that process has ended)" \
        in stdout
    assert not (out / LOCK_NAME).exists()
    # a live holder on this host (this very process stands in for it): refused, its lock kept
    (out / LOCK_NAME).write_text(json.dumps({"host": HOST, "pid": os.getpid(), "since": time.time()}))
    line = _run(capsys, _args(tiny_model_dir, module_data, out, "--max-steps", "2", "--squeeze", "", "--resume",
                              "auto"), code=2)
    assert f"in use by another run (host {HOST}, pid {os.getpid()}, since " in line
    (out / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": time.time()}))
    line = _run(capsys, _args(tiny_model_dir, module_data, out, "--resume", "auto"), code=2)
    assert "(host elsewhere, pid 1, since" in line and f"if that run is gone" in line and str(out / LOCK_NAME) in line
    (out / LOCK_NAME).unlink()
    # a run that fails on an input releases the lock too
    _run(capsys, _args(tiny_model_dir, module_data, out, "--seed", "3", "--max-steps", "2", "--squeeze", "",
                       "--resume", "auto"), code=2)
    assert not (out / LOCK_NAME).exists()


def test_output_dir_naming_a_file_is_one_line(capsys, tiny_model_dir, module_data, tmp_path):
    file = tmp_path / "taken"
    file.write_text("keep me")
    line = _run(capsys, _args(tiny_model_dir, module_data, file), code=2)
    assert line == f"error: --output-dir {file} is an existing file, not a directory; choose another --output-dir"
    assert file.read_text() == "keep me"


def test_a_failed_start_leaves_no_directory_and_its_leftovers_are_reused(capsys, tiny_model_dir, module_data,
                                                                         tmp_path):
    """Issue 32: a tokenizer with ids beyond the model's embedding failed after the directory was opened, leaving it
    unusable. Now that is refused first, and a directory such a run left (config, empty metrics, tensorboard/)
    starts afresh, with or without --resume auto."""
    from transformers import LlamaForCausalLM

    small = tmp_path / "small_vocab"
    LlamaForCausalLM(tiny_llama_config(1000)).save_pretrained(small)
    for f in tiny_model_dir.glob("tokenizer*"):
        (small / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "run"
    line = _run(capsys, _args(small, module_data, out), code=2)
    assert line.startswith(f"error: --data: the tokenizer of {small} gives token id ") and "embedding has 1000 rows" \
        in line
    assert not out.exists()
    for resume in ([], ["--resume", "auto"]):
        out.mkdir()
        (out / "train_config.yaml").write_text("lr: 1\n")
        (out / "metrics.jsonl").write_text("")
        (out / "tensorboard").mkdir()
        (out / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x")
        stdout = _run(capsys, _args(tiny_model_dir, module_data, out, "--max-steps", "2", "--squeeze", "", *resume))
        assert f"starting afresh in {out}: removing the earlier run's metrics.jsonl, tensorboard" in stdout
        assert [r["step"] for r in step_rows(out)] == [1, 2]
        assert not (out / "tensorboard" / "events.out.tfevents.1").exists()
        assert json.loads((out / "adapter" / "bilora_dist.json").read_text())["steps"] == 2
        import shutil
        shutil.rmtree(out)


def test_a_run_directory_is_continued_or_overwritten_only_when_asked(capsys, tiny_model_dir, module_data, tmp_path):
    """Issue 32: `python launch/train.py` twice (outputs/run) said only 'already holds a run'. The line now says
    both ways on; --overwrite-output-dir (HF Trainer's overwrite_output_dir) starts over, --resume auto continues."""
    out = tmp_path / "run"
    _run(capsys, _args(tiny_model_dir, module_data, out, "--squeeze", ""))
    before = _snapshot(out)
    line = _run(capsys, _args(tiny_model_dir, module_data, out, "--squeeze", ""), code=2)
    assert line == (f"error: --output-dir {out} already holds a run (4 logged step(s), checkpoint step_4, adapter/); "
                    "pass --resume auto to continue it, --overwrite-output-dir to start over in it (deletes that run), "
                    "or another --output-dir")
    line = _run(capsys, _args(tiny_model_dir, module_data, out, "--squeeze", "", "--resume", "auto",
                              "--overwrite-output-dir"), code=2)
    assert "pass one of them" in line
    assert _snapshot(out) == before
    stdout = _run(capsys, _args(tiny_model_dir, module_data, out, "--squeeze", "", "--resume", "auto"))
    assert f"resuming from {out / 'checkpoints' / 'step_4'}" in stdout  # a finished run: evaluated, adapter rewritten
    stdout = _run(capsys, _args(tiny_model_dir, module_data, out, "--squeeze", "", "--max-steps", "2",
                                "--overwrite-output-dir"))
    assert f"starting afresh in {out}: removing the earlier run's checkpoints, metrics.jsonl, tensorboard, adapter" \
        in stdout
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_2"]
    assert [r["step"] for r in step_rows(out)] == [1, 2]
    # logged steps but no checkpoint: --resume auto says how to start over
    import shutil
    shutil.rmtree(out / "checkpoints")
    line = _run(capsys, _args(tiny_model_dir, module_data, out, "--squeeze", "", "--max-steps", "2", "--resume",
                              "auto"), code=2)
    assert "holds a run (2 logged step(s), adapter/) but no valid checkpoint" in line
    assert "pass --overwrite-output-dir instead to start over in it" in line
