"""Files a run is given or left (bilora_dist/files.py): a corrupt or truncated adapter, provenance or config names
itself in one `error:` line through every command that reads it, and a metrics row cut off by a killed run is
dropped on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bilora_dist.errors import UserError
from bilora_dist.export.cli import export_main
from bilora_dist.files import read_json, read_safetensors, read_yaml
from bilora_dist.training.metrics import truncate_metrics
from bilora_dist.squeeze.cli import squeeze_main
from tests_support import error_line


def _adapter(path: Path) -> Path:
    """A valid rank-4 PEFT adapter on one 8 x 8 layer."""
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "target_modules": ["q_proj"]}))
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 8),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(8, 4)},
              str(path / "adapter_model.safetensors"))
    return path


@pytest.mark.parametrize("damage", ["truncate", "junk"])
def test_a_corrupt_adapter_names_itself_in_squeeze_and_export(capsys, tmp_path, damage):
    adapter = _adapter(tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file")
    for main, argv in ((squeeze_main, ["--adapter", str(adapter), "--rank", "2", "--out", str(tmp_path / "s")]),
                       (export_main, ["--checkpoint", str(adapter), "--out", str(tmp_path / "e"), "--rank", "2"])):
        err = error_line(capsys, argv, main)
        assert f"{weights}: corrupt or truncated" in err
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()


def test_a_corrupt_adapter_config_or_provenance_names_itself(capsys, tmp_path):
    adapter = _adapter(tmp_path / "adapter")
    (adapter / "bilora_dist.json").write_text('{"method": "bilora", "ra')
    err = error_line(capsys, ["--checkpoint", str(adapter), "--out", str(tmp_path / "e")], export_main)
    assert f"{adapter / 'bilora_dist.json'}: corrupt or truncated" in err
    (adapter / "adapter_config.json").write_text('{"peft_type": "LO')
    err = error_line(capsys, ["--adapter", str(adapter), "--rank", "2", "--out", str(tmp_path / "s")], squeeze_main)
    assert f"{adapter / 'adapter_config.json'}: corrupt or truncated" in err


def test_readers_return_what_was_written_and_name_a_bad_file(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text('{"a": [1, 2]}')
    assert read_json(good) == {"a": [1, 2]} and read_yaml(good) == {"a": [1, 2]}
    save_file({"w": torch.arange(6.0).view(2, 3)}, str(tmp_path / "t.safetensors"))
    torch.testing.assert_close(read_safetensors(tmp_path / "t.safetensors")["w"], torch.arange(6.0).view(2, 3))
    bad.write_bytes(b"\xff{: [")
    for reader in (read_json, read_yaml, read_safetensors):
        with pytest.raises(UserError, match=f"{bad}: corrupt or truncated"):
            reader(bad)


def test_a_metrics_row_cut_off_by_a_killed_run_is_dropped_on_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    truncate_metrics(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n{"step": 1}\n{"step": 2}\n'


# ---- atomic_directory: every directory writer's one way to publish


def _write(final: Path, text: str, exists: str = "error") -> None:
    from bilora_dist.files import atomic_directory

    before = (final / "a.txt").read_text() if final.exists() else None
    with atomic_directory(final, exists) as tmp:  # type: ignore[arg-type]
        assert tmp.parent == final.parent and tmp.name.startswith(f".tmp-{final.name}-")
        (tmp / "a.txt").write_text(text)
        assert (final / "a.txt").read_text() == before if before else not final.exists()  # untouched until the end


def test_atomic_directory_publishes_whole_or_leaves_nothing(tmp_path):
    from bilora_dist.files import atomic_directory

    final = tmp_path / "sub" / "out"
    _write(final, "one")
    assert (final / "a.txt").read_text() == "one" and sorted(p.name for p in final.parent.iterdir()) == ["out"]
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic_directory(tmp_path / "failed") as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # the failed write left no temporary directory


def test_atomic_directory_policies_for_an_existing_directory(tmp_path):
    final = tmp_path / "out"
    _write(final, "first")
    _write(final, "second", "replace")
    assert (final / "a.txt").read_text() == "second"
    _write(final, "third", "keep")  # another process published the same entry first: ours is dropped
    assert (final / "a.txt").read_text() == "second"
    with pytest.raises(OSError):
        _write(final, "fourth", "error")
    assert (final / "a.txt").read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_sets_the_mode_a_shared_cache_needs(tmp_path):
    from bilora_dist.files import atomic_directory

    with atomic_directory(tmp_path / "entry", mode=0o755) as tmp:
        assert tmp.stat().st_mode & 0o777 == 0o755
