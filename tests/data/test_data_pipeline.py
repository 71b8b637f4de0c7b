"""The data pipeline: sources, tokenization through `datasets.map`, the on-disk cache and its rank sync."""

from __future__ import annotations

import copy
import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch

from bilora_dist.data import IGNORE, collate, prepare_examples, tokenize
from bilora_dist.data.source import Source
from bilora_dist.data.tokenize import TokenizeOptions
from bilora_dist.model.embedded import DEFAULT_EVAL, DEFAULT_TRAIN
from bilora_dist.errors import UserError
from bilora_dist.training.evaluation import choice_task
from tests_support import ROOT, run_cmd, run_ok, two_ranks

CHAT = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}


def _prepare(spec, tokenizer, cache, seq_len=64, log=None, **kwargs):
    return prepare_examples(str(spec), "--data", tokenizer, TokenizeOptions(seq_len, **kwargs.pop("opts", {})),
                            cache=str(cache), log=log if log is not None else (lambda _: None), **kwargs)


def _rows(examples) -> list[tuple[list[int], list[int]]]:
    return [(e["input_ids"], e["labels"]) if isinstance(e, dict) else (e.input_ids, e.labels) for e in examples]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("path", [DEFAULT_TRAIN, DEFAULT_EVAL], ids=["train", "eval"])
def test_examples_equal_per_record_tokenization_of_the_embedded_task(path, tokenizer, tmp_path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    prepared = _prepare(path, tokenizer, tmp_path, seq_len=256)
    assert _rows(prepared.examples) == _rows(tokenize(r, tokenizer, 256) for r in records)
    assert prepared.fmt == "prompt_completion" and list(prepared.records) == records
    # the eval view feeds accuracy exactly as the per-record path did
    task = choice_task(prepared, tokenizer, 256)
    labels = sorted({r["completion"] for r in records})
    assert [p.input_ids for p in task.prompts] == [tokenizer(r["prompt"])["input_ids"] for r in records]
    assert task.gold == [labels.index(r["completion"]) for r in records]


def test_collate_of_arrow_rows_equals_collate_of_examples(tokenizer, tmp_path, train_records):
    examples = _prepare(_write_jsonl(tmp_path / "d.jsonl", train_records[:6]), tokenizer, "none").examples
    from_rows = collate([examples[i] for i in range(6)], tokenizer.pad_token_id)
    from_examples = collate([tokenize(r, tokenizer, 64) for r in train_records[:6]], tokenizer.pad_token_id)
    assert from_rows.keys() == from_examples.keys()
    assert all(torch.equal(v, from_examples[k]) if torch.is_tensor(v) else v == from_examples[k]
               for k, v in from_rows.items())


def test_two_workers_equal_one(tokenizer, tmp_path, train_records):
    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
             for r in train_records]
    data = _write_jsonl(tmp_path / "chat.jsonl", chats * 2)
    one = _prepare(data, tokenizer, "none", workers=1).examples
    two = _prepare(data, tokenizer, "none", workers=2).examples
    kept = [e for e in (tokenize(c, tokenizer, 64) for c in chats * 2) if any(t != IGNORE for t in e.labels[1:])]
    assert 0 < len(kept) < 128  # some conversations lose their answer to --seq-len and are left out
    assert _rows(one) == _rows(two) == _rows(kept)


def test_cache_key_follows_data_content_tokenizer_and_options(tokenizer, tmp_path, train_records, monkeypatch):
    data = _write_jsonl(tmp_path / "d.jsonl", train_records[:8])
    cache = tmp_path / "cache"
    said: list[str] = []

    def run(tok=tokenizer, **kwargs):
        said.clear()
        out = _prepare(data, tok, cache, log=said.append, **kwargs)
        assert len(said) == 1
        return out, said[0]

    first, line = run()
    assert "tokenized" in line and "cached in" in line
    monkeypatch.setattr(Source, "read", lambda *a: pytest.fail("a cache hit must not read the data"))
    again, line = run(workers=2)  # the number of workers changes nothing in the result
    assert "read from the cache" in line and _rows(again.examples) == _rows(first.examples)
    monkeypatch.undo()
    assert len(list(cache.iterdir())) == 1

    stat = data.stat()  # same size and mtime, different content: a path+size+mtime key would miss this
    data.write_text(data.read_text().replace(" animal", " plants", 1))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data.stat().st_size == stat.st_size
    changed, line = run()
    assert "tokenized" in line and _rows(changed.examples) != _rows(first.examples)

    other_template = copy.deepcopy(tokenizer)
    other_template.chat_template = tokenizer.chat_template + " "
    for tok, kwargs in ((tokenizer, {"seq_len": 8}), (tokenizer, {"opts": {"train_on_prompt": True}}),
                        (other_template, {}), (tokenizer, {"fmt": "prompt_completion"})):
        _, line = run(tok, **kwargs)
        assert "tokenized" in line, kwargs
    assert len(list(cache.iterdir())) == 6 and not list(cache.glob(".tmp-*"))


def test_killed_run_leaves_no_cache_entry_that_is_read_later(tokenizer, tmp_path, train_records):
    data = _write_jsonl(tmp_path / "d.jsonl", train_records[:8])
    cache = tmp_path / "cache"
    # killed (SIGKILL, no cleanup) with the tokenized dataset fully written, just before the entry is committed
    script = ("import os, signal, pathlib, sys\n"
              "from bilora_dist.data import prepare_examples\n"
              "from bilora_dist.data.tokenize import TokenizeOptions\n"
              "from bilora_dist.model.embedded import default_model_dir\n"
              "from bilora_dist.model.loading import load_tokenizer\n"
              "pathlib.Path.rename = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
              "prepare_examples(sys.argv[1], '--data', load_tokenizer(str(default_model_dir())), "
              "TokenizeOptions(64), cache=sys.argv[2])\n")
    proc = run_cmd([sys.executable, "-c", script, str(data), str(cache)], timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (partial,) = cache.iterdir()
    assert partial.name.startswith(".tmp-") and (partial / "dataset").is_dir()
    said: list[str] = []
    prepared = _prepare(data, tokenizer, cache, log=said.append)
    assert "tokenized" in said[0]
    assert _rows(prepared.examples) == _rows(tokenize(r, tokenizer, 64) for r in train_records[:8])


def test_dataset_name_from_the_local_hub_cache(tokenizer, tmp_path, train_records, monkeypatch):
    """A dataset repo in HF_HUB_CACHE (as `huggingface-cli download --repo-type dataset` leaves it) loads by name,
    `NAME:SPLIT` picks a split; with datasets 5.2 an offline `load_dataset(name)` reads only HF_DATASETS_CACHE,
    so the snapshot is resolved with `snapshot_download(local_files_only=True)` and loaded from its directory."""
    hub = tmp_path / "hub"
    repo = hub / "datasets--org--supersense"
    snapshot = repo / "snapshots" / ("a" * 40)
    (snapshot / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    _write_jsonl(snapshot / "data" / "train.jsonl", train_records[:8])
    _write_jsonl(snapshot / "data" / "test.jsonl", train_records[8:12])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    train = _prepare("org/supersense", tokenizer, tmp_path / "cache")
    test = _prepare("org/supersense:test", tokenizer, tmp_path / "cache")
    assert _rows(train.examples) == _rows(tokenize(r, tokenizer, 64) for r in train_records[:8])
    assert _rows(test.examples) == _rows(tokenize(r, tokenizer, 64) for r in train_records[8:12])
    with pytest.raises(UserError, match="no split 'dev' \\(splits: train, test\\)"):
        _prepare("org/supersense:dev", tokenizer, tmp_path / "cache")
    for name in ("org/unknown", "supersense"):
        with pytest.raises(UserError, match=f"'{name}' is neither a file nor a dataset in the local Hugging Face"):
            _prepare(name, tokenizer, tmp_path / "cache")


def test_dataset_name_from_the_datasets_arrow_cache(tokenizer, tmp_path, train_records, monkeypatch):
    """What an online `load_dataset("org/supersense")` leaves in HF_DATASETS_CACHE (Arrow files named after the
    dataset, under org___supersense/CONFIG/VERSION/HASH) loads by name, offline."""
    from datasets.packaged_modules.json.json import Json

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    builder = Json(data_files={"train": str(_write_jsonl(tmp_path / "t.jsonl", train_records[:8]))},
                   dataset_name="supersense", cache_dir=str(tmp_path / "build"))
    builder.download_and_prepare()
    shutil.copytree(builder.cache_dir, tmp_path / "datasets_cache" / "org___supersense" / "default" / "0.0.0" / "0123")
    prepared = _prepare("org/supersense", tokenizer, tmp_path / "cache")
    assert _rows(prepared.examples) == _rows(tokenize(r, tokenizer, 64) for r in train_records[:8])


def test_parquet_csv_and_saved_dataset_directories_load(tokenizer, tmp_path, train_records):
    ds = datasets.Dataset.from_list(train_records[:6])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(train_records[6:9])}).save_to_disk(
        str(tmp_path / "saved"))
    (tmp_path / "folder").mkdir()
    _write_jsonl(tmp_path / "folder" / "train.jsonl", train_records[:6])
    expected = _rows(tokenize(r, tokenizer, 64) for r in train_records[:6])
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in train_records[:6])
                                                        .encode()))
    for spec in ("d.parquet", "d.csv", "d.jsonl.gz", "saved", "folder"):
        assert _rows(_prepare(tmp_path / spec, tokenizer, tmp_path / "cache").examples) == expected, spec
    test = _prepare(f"{tmp_path / 'saved'}:test", tokenizer, tmp_path / "cache")
    assert list(test.records) == train_records[6:9]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: neither a saved datasets directory nor a folder of data files"):
        _prepare(tmp_path / "empty", tokenizer, tmp_path / "cache")


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_inputs_are_one_line_errors_naming_file_and_row(tokenizer, tmp_path, train_records, workers):
    def error(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError) as info:
            _prepare(tmp_path / name, tokenizer, tmp_path / "cache", workers=workers)
        message = str(info.value)
        assert len(message.splitlines()) == 1 and message.startswith(f"--data {tmp_path / name}")
        return message

    good = "".join(json.dumps(r) + "\n" for r in train_records[:4])
    assert error("a.jsonl", good + '\n{"prompt": "a", "completion": \n').endswith(
        "line 6: malformed JSON (Expecting value)")
    assert error("b.jsonl", good + '\n{"prompt": "a", "completion": ""}\n').endswith("line 6: 'completion' is empty")
    assert error("c.jsonl", good + '["not", "a record"]\n').endswith("line 5: not a JSON object")
    assert error("d.jsonl", " \n\n").endswith("dataset is empty")
    assert error("e.json", json.dumps(train_records[:2] + [{"prompt": "x", "completion": 3}])).endswith(
        "record 3: 'prompt' and 'completion' must both be strings")
    assert error("f.json", "[{\"text\": ").endswith("malformed JSON at line 1 (Expecting value)")
    assert error("g.txt", "hello\n").endswith("unsupported file type '.txt' (use .jsonl, .json or .csv, each also "
                                              ".gz/.bz2/.xz compressed, .parquet, a datasets dir or a cached dataset name)")
    assert error("i.jsonl", "").endswith("i.jsonl: dataset is empty")  # 0 bytes
    assert error("j.parquet", "not parquet\n").endswith(
        "cannot be read (Parquet magic bytes not found in footer. Either the file is corrupted or this is not a "
        "parquet file.)")
    assert error("k.jsonl", json.dumps(CHAT | {"messages": [{"role": "robot", "content": "x"}] + CHAT["messages"]})
                 ).endswith("line 1: messages[0]: unknown role 'robot' (expected system, user, assistant, tool)")
    (tmp_path / "l.jsonl.gz").write_bytes(gzip.compress((good + '{"prompt": 1}\n').encode()))
    with pytest.raises(UserError, match=r"l\.jsonl\.gz: line 5: 'prompt' and 'completion' must both be strings"):
        _prepare(tmp_path / "l.jsonl.gz", tokenizer, tmp_path / "cache", workers=workers)
    (tmp_path / "no_data").mkdir()
    (tmp_path / "no_data" / "README.md").write_text("# notes\n")
    with pytest.raises(UserError, match="no_data: neither a saved datasets directory nor a folder of data files"):
        _prepare(tmp_path / "no_data", tokenizer, tmp_path / "cache", workers=workers)
    assert not list((tmp_path / "cache").glob(".tmp-*"))  # failed preparations leave nothing behind
    with pytest.raises(UserError, match="--data: file not found: .*nope.jsonl"):
        _prepare(tmp_path / "nope.jsonl", tokenizer, tmp_path / "cache")
    with pytest.raises(UserError, match="no record keeps a supervised token within --seq-len 1"):
        _prepare(_write_jsonl(tmp_path / "h.jsonl", train_records[:2]), tokenizer, tmp_path / "cache", seq_len=1)


def test_two_ranks_tokenize_once_and_read_the_same_examples(tmp_path, train_records):
    data = _write_jsonl(tmp_path / "d.jsonl", train_records[:12])
    bad = _write_jsonl(tmp_path / "bad.jsonl", train_records[:3] + [{"prompt": "a", "completion": ""}])
    results = {}
    for name, spec in (("good", data), ("bad", bad)):
        out = tmp_path / name
        out.mkdir()
        run_ok(two_ranks("torchrun") + [str(ROOT / "tests" / "data_pipeline_worker.py"), str(out), str(spec),
                                        str(tmp_path / "cache")], timeout=300)
        results[name] = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    rank0, rank1 = results["good"]
    assert rank0["tokenized"] == 12 and rank1["tokenized"] == 0
    assert rank0["examples"] == rank1["examples"] and len(rank0["examples"]) == 12
    # the main rank's error reaches the other rank as the same line instead of leaving it waiting
    assert results["bad"][0]["error"] == results["bad"][1]["error"]
    assert results["bad"][0]["error"].endswith("line 4: 'completion' is empty")


def test_an_unreadable_file_is_one_line(tokenizer, tmp_path, train_records, monkeypatch):
    path = _write_jsonl(tmp_path / "locked.jsonl", train_records[:2])
    path.chmod(0)
    if os.geteuid() == 0:  # root reads past permission bits: refuse the open as the kernel would for a user
        def refuse(file, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(file))
        monkeypatch.setattr("bilora_dist.data.source.open", refuse, raising=False)
    with pytest.raises(UserError) as info:
        _prepare(path, tokenizer, tmp_path / "cache")
    assert str(info.value) == f"--data {path}: cannot be read (Permission denied)"
