"""Reading the files a run is given or left (adapters, provenance, configs): a corrupt or truncated one names
itself in one line (UserError) instead of a parser's traceback; and streaming a file's bytes into a hash (data
identity, cache entries, checkpoint manifests); and writing a directory atomically (atomic_directory), which
every writer of a directory uses: checkpoints, adapters, merged models, data-cache entries, the embedded model."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

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


@contextmanager
def atomic_directory(final: Path, exists: Literal["replace", "keep", "error"] = "error",
                     mode: int | None = None) -> Iterator[Path]:
    """Yield a new temporary directory `.tmp-NAME-*` beside `final` to write into; once the block ends, it
    becomes `final` in one rename, so `final` appears complete or not at all. Where `final` exists by then:
    `replace` swaps it out (removed only once the new one is in place), `keep` discards the new one (another
    process wrote the same thing first), `error` raises. If the block or the rename fails, the temporary
    directory is removed. `mode` sets its permissions (mkdtemp's are 0700)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        if mode is not None:
            tmp.chmod(mode)
        yield tmp
        if exists == "replace" and final.exists():
            old = final.with_name(f".old-{final.name}-{tmp.name.rsplit('-', 1)[-1]}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        elif exists == "keep":
            try:
                tmp.rename(final)
            except OSError:  # another process published it first
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
