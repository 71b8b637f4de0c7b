"""Faults of long runs: non-finite steps, a disk that fills, a rank killed under torchrun's restarts; each one
survived or stopped with one line, nothing saved lost."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bilora_dist.checkpoint import store as checkpoint
from bilora_dist.checkpoint.store import checkpoint_bytes, list_checkpoints, save_checkpoint, verify
from bilora_dist.cli import run_cli, train_main
from bilora_dist.engines.base import Engine
from bilora_dist.errors import TrainingFault
from bilora_dist.training.loss import token_loss_sum
from tests_support import checkpoint_fixture, fixture_bank, read_metrics, run_cmd, run_env, run_ok, two_ranks

STEPS = 4
PASSES = {"lora": 1, "bilora": 1, "lora-sam": 2}


def _args(model: Path, data: tuple[Path, Path], out: Path, method: str, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(data[0]), "--eval-data", str(data[1]), "--method", method,
            "--max-steps", str(STEPS), "--micro-batch-size", "2", "--lr", "1e-2", "--warmup-ratio", "0",
            "--save-every", "1", "--keep-last", "0", "--eval-on-start", "false", "--output-dir", str(out), *extra]


def _saved(out: Path, step: int) -> dict[str, torch.Tensor]:
    """A checkpoint's adapters and AdamW moments, flat."""
    directory = out / "checkpoints" / f"step_{step}"
    tensors = dict(load_file(directory / "adapters.safetensors"))
    state = torch.load(directory / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    return tensors | {f"{pid}.{k}": v for pid, s in state.items() for k, v in s.items()}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _poison(monkeypatch, calls: set[int]) -> None:
    count = iter(range(10**6))

    def poisoned(model, batch):
        loss, tokens = token_loss_sum(model, batch)
        return (loss * math.nan if next(count) in calls else loss), tokens
    monkeypatch.setattr("bilora_dist.training.methods.token_loss_sum", poisoned)


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("method", ["lora", "bilora", "lora-sam"])
def test_a_nan_step_is_skipped_with_one_warning_and_the_run_goes_on(method, tiny_model_dir, small_data, tmp_path,
                                                                     monkeypatch, capsys):
    out = tmp_path / "run"
    _poison(monkeypatch, {2 * PASSES[method]})  # the first pass of step 3
    assert run_cli(train_main, _args(tiny_model_dir, small_data, out, method)) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: step")]
    assert warnings == ["warning: step 3 skipped (non-finite loss): no update; 1 in a row (the run stops at "
                        "--max-bad-steps 10)"]
    rows = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert rows[3]["skipped"] == "non-finite loss" and rows[3]["loss"] is None and rows[3]["grad_norm"] is None
    assert all("skipped" not in rows[s] and math.isfinite(rows[s]["loss"]) for s in (1, 2, 4))
    _assert_equal(_saved(out, 3), _saved(out, 2))  # no update: adapters, auxiliary and moments as after step 2
    assert all(bool(torch.isfinite(t).all()) for t in _saved(out, 4).values())
    assert all(bool(torch.isfinite(t).all()) for t in load_file(out / "adapter" / "adapter_model.safetensors").values())


def test_max_bad_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tiny_model_dir, small_data, tmp_path,
                                                                                 monkeypatch, capsys):
    out = tmp_path / "run"
    _poison(monkeypatch, set(range(2, 100)))  # every step from step 3 on
    code = run_cli(train_main, _args(tiny_model_dir, small_data, out, "bilora", "--keep-last", "2",
                                     "--max-bad-steps", "2"))
    assert code == 1
    assert _one_line(capsys) == (
        f"error: steps 3-4: 2 in a row skipped for a non-finite loss or gradient (--max-bad-steps 2), last: non-finite "
        f"loss; the adapters are unchanged since step 2 and the newest checkpoint is {out / 'checkpoints' / 'step_3'}; "
        "lower --lr or check the data")
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_3", "step_2"]
    _assert_equal(_saved(out, 3), _saved(out, 2))
    assert not (out / "adapter").exists()


def test_two_ranks_agree_on_a_nan_that_only_one_rank_sees(tiny_model_dir, small_data, tmp_path):
    out = tmp_path / "run"
    cmd = two_ranks("torchrun") + ["tests/fault_worker.py", "--engine", "fsdp", "--replica-check-every", "1",
                                   *_args(tiny_model_dir, small_data, out, "bilora")]
    proc = run_ok(cmd, env=run_env(FAULT="nan:1:2"))  # rank 1's loss on its step-3 micro-batch
    assert proc.stdout.count("warning: step 3 skipped (non-finite loss)") == 1
    rows = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert rows[3]["skipped"] == "non-finite loss" and len(set(rows[3]["adapter_sha256"])) == 1
    _assert_equal(_saved(out, 3), _saved(out, 2))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "lora-sam"])
def test_two_ranks_skip_a_nan_step_of_every_method(method, tiny_model_dir, small_data, tmp_path):
    out = tmp_path / "run"
    cmd = two_ranks("torchrun") + ["tests/fault_worker.py", "--engine", "fsdp", "--replica-check-every", "1",
                                   *_args(tiny_model_dir, small_data, out, method)]
    run_ok(cmd, env=run_env(FAULT=f"nan:1:{2 * PASSES[method] + PASSES[method] - 1}"))  # the last pass of step 3
    rows = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert rows[3]["skipped"].startswith("non-finite loss") and len(set(rows[4]["adapter_sha256"])) == 1
    _assert_equal(_saved(out, 3), _saved(out, 2))


def test_checkpoint_size_is_known_before_writing(tmp_path):
    bank, optimizer = checkpoint_fixture(tmp_path, step=1, return_state=True)
    written = sum(f.stat().st_size for f in (tmp_path / "checkpoints" / "step_1").iterdir())
    assert checkpoint_bytes(bank, optimizer) <= written < checkpoint_bytes(bank, optimizer) + 64 * 1024


def test_a_non_finite_state_is_never_saved_and_older_checkpoints_stay(tmp_path):
    checkpoint_fixture(tmp_path, step=1)
    bank = fixture_bank()
    optimizer = torch.optim.AdamW([bank.primary.flat, bank.aux.flat])
    with torch.no_grad():
        bank.aux.flat[3] = math.inf
    state = {"step": 2, "consumed": 16, "total_steps": 10, "global_batch": 8, "world_size": 1,
             "squeeze_history": [], "identity": {}}
    with pytest.raises(TrainingFault, match="step_2: the adapters or their AdamW moments are not finite; the newest "
                                            "checkpoint kept is .*step_1"):
        save_checkpoint(tmp_path, state, bank, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1),
                        "", Engine(), keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_1"]


def _full_disk_at(monkeypatch, save: int) -> None:
    """shutil.disk_usage, as the checkpoint writer sees it, reports 1 MiB free from the `save`-th call on."""
    real, calls = checkpoint.shutil.disk_usage, iter(range(1, 10**6))

    def usage(path):
        total, used, free = real(path)
        return type(real(path))(total, used, 2**20 if next(calls) >= save else free)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", usage)


def test_too_little_space_stops_with_one_line_before_writing(tiny_model_dir, small_data, tmp_path, monkeypatch,
                                                             capsys):
    out = tmp_path / "run"
    _full_disk_at(monkeypatch, save=2)
    assert run_cli(train_main, _args(tiny_model_dir, small_data, out, "bilora")) == 1
    line = _one_line(capsys)
    step_1 = out / "checkpoints" / "step_1"
    needed = sum(f.stat().st_size for f in step_1.iterdir() if f.suffix in (".safetensors", ".pt")) / 2**20
    assert line.startswith(f"error: cannot save {out / 'checkpoints' / 'step_2'}: it needs ")
    assert float(line.split("it needs ")[1].split(" MiB")[0]) == pytest.approx(needed, rel=0.05)
    assert line.endswith(f"has 1.0 MiB free; the newest checkpoint kept is {step_1}; free space (or move --output-dir "
                         "with its checkpoints), then run the same command with --resume auto")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_1"] and verify(step_1) is None


def _failing_write(monkeypatch, at_save: int, target: str) -> None:
    """The `at_save`-th checkpoint's adapters.safetensors (target "save_file") or optimizer.pt ("torch") runs out
    of space half-written, as safetensors and torch.save report it."""
    calls = iter(range(1, 10**6))
    if target == "save_file":
        real = checkpoint.save_file

        def writer(tensors, path, metadata=None):
            if next(calls) == at_save:
                Path(path).write_bytes(b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(tensors, path, metadata=metadata)
        monkeypatch.setattr(checkpoint, "save_file", writer)
    else:
        real_save = torch.save

        def writer(obj, path, *args, **kwargs):
            if str(path).endswith("optimizer.pt") and next(calls) == at_save:
                Path(path).write_bytes(b"\0" * 100)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
            return real_save(obj, path, *args, **kwargs)
        monkeypatch.setattr(checkpoint.torch, "save", writer)


@pytest.mark.parametrize("target", ["save_file", "torch"])
def test_a_failed_write_is_one_line_and_removes_its_partial_directory(target, tiny_model_dir, small_data, tmp_path,
                                                                      monkeypatch, capsys):
    out = tmp_path / "run"
    _failing_write(monkeypatch, 2, target)
    assert run_cli(train_main, _args(tiny_model_dir, small_data, out, "lora")) == 1
    reason = "No space left on device" if target == "save_file" else "[enforce fail at inline_container.cc:672] . " \
                                                                      "unexpected pos 64 vs 0"
    step_1 = out / "checkpoints" / "step_1"
    assert _one_line(capsys) == (f"error: cannot save {out / 'checkpoints' / 'step_2'}: the write failed ({reason}); "
                                 f"the newest checkpoint kept is {step_1}; free space (or move --output-dir with its "
                                 "checkpoints), then run the same command with --resume auto")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"] and verify(step_1) is None


def test_on_save_error_continue_trains_on_and_saves_at_the_next_step(tiny_model_dir, small_data, tmp_path,
                                                                      monkeypatch, capsys):
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert run_cli(train_main, _args(tiny_model_dir, small_data, ref, "bilora")) == 0
    _failing_write(monkeypatch, 2, "save_file")
    assert run_cli(train_main, _args(tiny_model_dir, small_data, out, "bilora", "--on-save-error", "continue")) == 0
    assert "training goes on (--on-save-error continue)" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1", "step_3", "step_4"]
    assert [r["step"] for r in read_metrics(out) if "save_error" in r] == [2]
    for step in (1, 3, 4):
        _assert_equal(_saved(out, step), _saved(ref, step))  # the training state never noticed
    _assert_equal(load_file(out / "adapter" / "adapter_model.safetensors"),
                  load_file(ref / "adapter" / "adapter_model.safetensors"))


def test_a_final_adapter_that_cannot_be_written_names_the_export_command(tiny_model_dir, small_data, tmp_path,
                                                                          monkeypatch, capsys):
    out = tmp_path / "run"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("bilora_dist.recipe.train.save_peft_adapter", full)
    assert run_cli(train_main, _args(tiny_model_dir, small_data, out, "lora")) == 1
    assert _one_line(capsys) == (f"error: cannot write the adapter to {out / 'adapter'} (No space left on device); "
                                 f"free space, then bilora-dist export --checkpoint "
                                 f"{out / 'checkpoints' / f'step_{STEPS}'} --out {out / 'adapter'}")


@pytest.mark.slow
def test_a_killed_rank_restarts_the_group_which_resumes_to_the_same_adapter(tiny_model_dir, small_data, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    flags = ["--engine", "fsdp", "--resume", "auto", *_args(tiny_model_dir, small_data, ref, "bilora")]
    run_ok(two_ranks("torchrun") + ["launch/train.py", *flags])
    flags[flags.index(str(ref))] = str(out)
    marker = tmp_path / "killed"
    proc = run_cmd(two_ranks("torchrun") + ["--max-restarts", "2", "tests/fault_worker.py", *flags],
                   env=run_env(FAULT=f"kill:1:3:{marker}"))  # rank 1 dies as step 3 begins, after step_2 is saved
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert marker.exists() and f"resuming from {out / 'checkpoints' / 'step_2'}" in proc.stdout
    _assert_equal(load_file(out / "adapter" / "adapter_model.safetensors"),
                  load_file(ref / "adapter" / "adapter_model.safetensors"))
    _assert_equal(_saved(out, STEPS), _saved(ref, STEPS))
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, STEPS + 1))
