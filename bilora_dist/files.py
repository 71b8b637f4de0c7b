"""Reading the files a run is given or left (adapters, provenance, configs): a corrupt or truncated one names
itself in one line (UserError) instead of a parser's traceback; and streaming a file's bytes into a hash (data
identity, cache entries, checkpoint manifests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from bilora_dist.errors import UserError


def _corrupt(path: Path, exc: Exception) -> UserError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"{path}: corrupt or truncated ({reason})")


def read_json(path: Path) -> Any:
    """The JSON value in `path`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(Path(path), exc) from None


def read_yaml(path: Path) -> Any:
    """The YAML value in `path`."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise _corrupt(Path(path), exc) from None


def hash_bytes(h: Any, path: Path) -> None:
    """Feed the bytes of file `path` into hash `h` (hashlib), a megabyte at a time."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of the safetensors file `path`, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise _corrupt(Path(path), exc) from None
