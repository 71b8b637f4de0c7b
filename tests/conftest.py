"""Shared fixtures: the embedded tokenizer and a tiny random Llama that uses it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from bilora_dist.model.embedded import DEFAULT_TRAIN, default_model_dir
from bilora_dist.model.loading import load_tokenizer
from tests_support import tiny_llama_config


@pytest.fixture(scope="session", autouse=True)
def stale_extension_lock(tmp_path_factory) -> None:
    """Every launched process sees a torch-extensions directory whose DeepSpeed shared-memory op was left mid-build
    (a lock file and nothing else): a DeepSpeed engine that tried to JIT-build that op would wait forever."""
    extensions = tmp_path_factory.mktemp("torch_extensions")
    (extensions / "deepspeed_shm_comm").mkdir()
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(str(default_model_dir()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer random Llama with the embedded tokenizer, saved as a local model directory."""
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(1234)
    LlamaForCausalLM(tiny_llama_config(len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def train_records() -> list[dict]:
    return [json.loads(line) for line in DEFAULT_TRAIN.read_text().splitlines()[:64]]


@pytest.fixture
def small_data(tmp_path, train_records) -> tuple[Path, Path]:
    """32 training and 16 held-out records of the embedded task as .jsonl files."""
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_records[:32]))
    held.write_text("".join(json.dumps(r) + "\n" for r in train_records[32:48]))
    return train, held


@pytest.fixture(scope="session")
def module_data(tmp_path_factory, train_records) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist_data")
    train, held = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_records[:48]))
    held.write_text("".join(json.dumps(r) + "\n" for r in train_records[48:64]))
    return train, held
