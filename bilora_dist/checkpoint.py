"""Resumable checkpoints: OUT/checkpoints/step_N/, written atomically, verified by a manifest.

A checkpoint holds what the frozen base cannot give back: both adapter branches (adapters.safetensors,
with their per-layer layout), AdamW and LR-scheduler state (optimizer.pt), every rank's RNG state
(rng.pt), the data position, squeeze history and run identity (state.json), the resolved config
(config.yaml) and manifest.json with the SHA-256 of every file. Adapters and optimizer state are
replicated, so the main rank writes them; only the RNG states are gathered. The directory is built
under a temporary name and renamed into place, so a crash mid-write leaves the previous checkpoints
as they were. Base weights are never written.

A checkpoint that cannot be written (too little free space for its known size, a failed write, a non-finite
state) raises TrainingFault on every rank with one line naming the newest checkpoint kept; the partial
directory is removed and nothing older is pruned.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bilora_dist.adapters.bank import AdapterBank, Branch, LayerShape
from bilora_dist.engines.base import Engine
from bilora_dist.errors import TrainingFault, UserError
from bilora_dist.export import publish_directory

FORMAT = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# what a resume must share with the run that saved: a different value means different adapters
IDENTITY_KEYS = ("model", "method", "rank", "alpha", "aux_rank", "aux_scale", "target_modules", "squeeze")


@dataclass
class Checkpoint:
    """A verified checkpoint, read into memory."""

    path: Path
    state: dict[str, Any]            # step, consumed, total_steps, global_batch, world_size, identity, ...
    branches: dict[str, Branch]      # "primary" and, for Bi-LoRA, "aux"
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def checkpoints_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, Python, NumPy), in torch.load(weights_only) form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _layout(branch: Branch) -> list[list[Any]]:
    """Per layer [name, in, out, rank, scale], and the number of experts after them for a fused projection."""
    return [[s.name, s.in_features, s.out_features, r, sc] + ([s.experts] if s.experts else [])
            for s, r, sc in zip(branch.shapes, branch.ranks, branch.scales)]


def _write_file(directory: Path, name: str, writer: Any) -> None:
    path = directory / name
    writer(path)
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _state_tensors(bank: AdapterBank, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors a checkpoint holds: both adapter branches and their AdamW state."""
    moments = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return [*(b.flat for b in bank.branches()), *moments]


def checkpoint_bytes(bank: AdapterBank, optimizer: torch.optim.Optimizer) -> int:
    """The bytes of a checkpoint's tensors; its files add headers and small records of a few KB."""
    return sum(t.numel() * t.element_size() for t in _state_tensors(bank, optimizer))


def save_checkpoint(out_dir: Path, state: dict[str, Any], bank: AdapterBank, optimizer: torch.optim.Optimizer,
                    scheduler: Any, config_yaml: str, engine: Engine, keep_last: int) -> Path:
    """Write OUT/checkpoints/step_{state['step']} (collective: every rank must call) and keep the newest
    `keep_last` checkpoints. Returns the checkpoint's path; raises TrainingFault (every rank) if it cannot."""
    rng = engine.gather_object(rng_state())
    root = checkpoints_dir(out_dir)
    final = root / f"step_{state['step']}"
    problem = None
    if engine.is_main:
        problem = _write(root, final, bank, optimizer, lambda tmp: _write_files(tmp, state, bank, optimizer, scheduler,
                                                                                 config_yaml, rng))
        if problem is None:
            _prune(root, keep_last)
    problem = engine.gather_object(problem)[0]
    if problem is not None:
        raise TrainingFault(problem)
    return final


def _write(root: Path, final: Path, bank: AdapterBank, optimizer: torch.optim.Optimizer,
           write_files: Callable[[Path], None]) -> str | None:
    """Write the checkpoint `final` (its files by `write_files` into a temporary directory, then renamed into
    place); None, or why it was not written."""
    previous = list_checkpoints(root) if root.is_dir() else []
    kept = f"the newest checkpoint kept is {previous[0]}" if previous else "no earlier checkpoint exists"
    advice = "free space (or move --output-dir with its checkpoints), then run the same command with --resume auto"
    if not all(bool(torch.isfinite(t).all()) for t in _state_tensors(bank, optimizer)):
        return f"not saving {final}: the adapters or their AdamW moments are not finite; {kept}"
    needed = checkpoint_bytes(bank, optimizer)
    try:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if free < needed * 1.05 + 2**20:
            return (f"cannot save {final}: it needs {needed / 2**20:.1f} MiB and {root} has {free / 2**20:.1f} MiB "
                    f"free; {kept}; {advice}")
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{final.name}-"))
    except OSError as exc:
        return f"cannot save {final}: {exc.strerror or exc}; {kept}; {advice}"
    try:
        write_files(tmp)
        publish_directory(tmp, final)  # the same step saved again (a resumed run) is replaced only once whole
    except (OSError, RuntimeError, SafetensorError) as exc:  # torch.save and safetensors word ENOSPC their own way
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[-1]
        return f"cannot save {final}: the write failed ({reason}); {kept}; {advice}"
    return None


def _write_files(tmp: Path, state: dict[str, Any], bank: AdapterBank, optimizer: torch.optim.Optimizer,
                 scheduler: Any, config_yaml: str, rng: list[dict[str, Any]]) -> None:
    branches = {name: b for name, b in (("primary", bank.primary), ("aux", bank.aux)) if b is not None}
    _write_file(tmp, "adapters.safetensors", lambda p: save_file(
        {name: b.flat.detach().contiguous() for name, b in branches.items()}, str(p),
        metadata={"layout": json.dumps({name: _layout(b) for name, b in branches.items()})}))
    _write_file(tmp, "optimizer.pt", lambda p: torch.save({"optimizer": optimizer.state_dict(),
                                                           "scheduler": scheduler.state_dict()}, p))
    _write_file(tmp, "rng.pt", lambda p: torch.save(rng, p))
    _write_file(tmp, "state.json", lambda p: p.write_text(json.dumps(state, indent=2)))
    _write_file(tmp, "config.yaml", lambda p: p.write_text(config_yaml))
    files = {f.name: {"sha256": _sha256(f), "bytes": f.stat().st_size} for f in sorted(tmp.iterdir())}
    manifest = {"format": FORMAT, "step": state["step"], "files": files}
    _write_file(tmp, MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))


def _prune(root: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` checkpoints and leftovers of interrupted writes."""
    for leftover in root.glob(".tmp-step_*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last > 0:
        for old in list_checkpoints(root)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """step_N directories under `root`, newest first."""
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def verify(path: Path) -> str | None:
    """None if the checkpoint at `path` is whole and every file matches its manifest checksum; else why not."""
    manifest_file = Path(path) / MANIFEST
    if not manifest_file.is_file():
        return "no manifest.json (not a checkpoint, or its write did not finish)"
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as exc:
        return f"manifest.json is not valid JSON ({exc})"
    if manifest.get("format") != FORMAT:
        return f"checkpoint format {manifest.get('format')} (this version reads {FORMAT})"
    for name, entry in manifest.get("files", {}).items():
        file = Path(path) / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
            return f"{name} fails its checksum"
    return None


def find_checkpoint(out_dir: Path, resume: str, warn: Any) -> Path | None:
    """The checkpoint `--resume` names: with 'auto' the newest valid one under OUT/checkpoints (None if
    there is none; invalid ones are skipped with a warning naming them), else the directory given."""
    if resume == "auto":
        for path in list_checkpoints(checkpoints_dir(out_dir)):
            problem = verify(path)
            if problem is None:
                return path
            warn(f"warning: skipping checkpoint {path}: {problem}")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint directory")
    problem = verify(path)
    if problem is not None:
        raise UserError(f"--resume {resume}: {problem}")
    return path


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "state.json").read_text())


def check_compatible(state: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint written by a run with different adapters."""
    for key in IDENTITY_KEYS:
        saved, now = state["identity"].get(key), identity.get(key)
        if saved != now:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"--resume {path}: the checkpoint was written with {flag} {saved!r}, this run has "
                            f"{flag} {now!r}; resume with the same settings or start a new --output-dir")


def check_step_budget(state: dict[str, Any], total_steps: int, path: Path) -> None:
    """Refuse to resume into another step budget: the learning-rate schedule spans the run's steps, so a
    longer or shorter run would switch schedules midway."""
    if state["total_steps"] != total_steps:
        raise UserError(f"--resume {path}: the checkpoint's run has {state['total_steps']} steps (its learning-rate "
                        f"schedule spans them) but this run has {total_steps} (from --max-steps/--epochs and the "
                        "global batch); resume with the same budget or start a new --output-dir")


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a verified checkpoint directory."""
    path = Path(path)
    branches = {}
    with safe_open(str(path / "adapters.safetensors"), framework="pt") as f:
        layout = json.loads(f.metadata()["layout"])
        for name, rows in layout.items():
            shapes = [LayerShape(*row[:3], *row[5:]) for row in rows]
            branches[name] = Branch(shapes, [row[3] for row in rows], [row[4] for row in rows], f.get_tensor(name))
    # onto the CPU whichever device saved them: each rank moves what it needs (optimizer.load_state_dict puts the
    # moments on their parameters' device; RNG states are CPU tensors), instead of every rank onto rank 0's GPU
    bundle = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    return Checkpoint(path, read_state(path), branches, bundle["optimizer"], bundle["scheduler"],
                      torch.load(path / "rng.pt", weights_only=True, map_location="cpu"))


def restore_bank(bank: AdapterBank, checkpoint: Checkpoint) -> None:
    """Put the checkpoint's branches (at their saved, possibly squeezed, ranks) into the live bank."""
    for name, branch in checkpoint.branches.items():
        current: Branch = bank.primary if name == "primary" else bank.aux
        if current is None or current.shapes != branch.shapes:
            raise UserError(f"--resume {checkpoint.path}: its {name} adapter covers other layers than this model's")
        bank.replace_branch(name, branch.to(bank.primary.flat.device))
