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
from bilora_dist.files import atomic_directory, hash_bytes

FORMAT = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")

# The resume policy of every setting (TrainConfig field), in one place; docs/RESUME.md is generated from it
# (tests/checkpoint/test_resume_policy.py checks both). A resume compares each setting with the checkpoint's run:
#   refuse  - a different value is refused with one line naming the setting and the saved value: the adapters,
#             or the examples the saved data position counts, would not be the ones the checkpoint continues
#   budget  - honoured (and said) while the run keeps its step count; another step count is refused (the
#             learning-rate schedule spans the run's steps)
#   honour  - the new value applies from the checkpoint's step on; one start-up line lists every change, and the
#             run's train_config.yaml and later checkpoints record it
#   ignore  - not part of the run (how this invocation is started); never compared
REFUSE, BUDGET, HONOUR, IGNORE = "refuse", "budget", "honour", "ignore"
RESUME_POLICY: dict[str, tuple[str, str]] = {
    "model": (REFUSE, "the frozen base the adapters were trained on"),
    "method": (REFUSE, "the training method and its adapter branches"),
    "rank": (REFUSE, "the adapter's shape"),
    "alpha": (REFUSE, "the adapter's scale"),
    "aux_rank": (REFUSE, "Bi-LoRA: the auxiliary's shape"),
    "aux_scale": (REFUSE, "Bi-LoRA: the auxiliary's scale"),
    "aux_optimizer": (REFUSE, "Bi-LoRA: what the auxiliary's saved optimizer state means"),
    "target_modules": (REFUSE, "the adapted layers"),
    "squeeze": (REFUSE, "the rank schedule the saved ranks follow"),
    "squeeze_min_stage": (REFUSE, "the rank schedule the saved ranks follow"),
    "squeeze_ranks": (REFUSE, "the rank schedule the saved ranks follow"),
    "data": (REFUSE, "the training examples (compared by the SHA-256 of the data files, not by path), which the "
                     "saved position counts"),
    "data_format": (REFUSE, "how records become examples"),
    "train_on_prompt": (REFUSE, "the examples' loss masks"),
    "last_turn_only": (REFUSE, "the examples' loss masks"),
    "seq_len": (REFUSE, "the examples (truncation, packing) the saved position counts"),
    "packing": (REFUSE, "the examples per row the saved position counts"),
    "seed": (REFUSE, "the order of the examples the saved position continues"),
    "max_steps": (BUDGET, "the step count the schedule spans"),
    "epochs": (BUDGET, "the step count the schedule spans"),
    "micro_batch_size": (BUDGET, "the global batch (the data position continues at the same example)"),
    "grad_accum": (BUDGET, "the global batch (the data position continues at the same example)"),
    "lr": (HONOUR, "the schedule continues at the saved step, scaled to the new peak"),
    "aux_lr_scale": (HONOUR, "Bi-LoRA: the auxiliary's schedule, scaled to the new ratio"),
    "aux_schedule": (HONOUR, "Bi-LoRA: the auxiliary's schedule from the saved step on"),
    "scheduler": (HONOUR, "the schedule's shape from the saved step on"),
    "warmup_ratio": (HONOUR, "the schedule's shape from the saved step on"),
    "warmup_steps": (HONOUR, "the schedule's shape from the saved step on"),
    "warmup_type": (HONOUR, "the schedule's shape from the saved step on"),
    "weight_decay": (HONOUR, "AdamW's decay from the saved step on (its moments are kept)"),
    "adam_beta1": (HONOUR, "AdamW's betas from the saved step on (its moments are kept)"),
    "adam_beta2": (HONOUR, "AdamW's betas from the saved step on (its moments are kept)"),
    "adam_epsilon": (HONOUR, "AdamW's epsilon from the saved step on"),
    "max_grad_norm": (HONOUR, "gradient clipping from the saved step on"),
    "rho": (HONOUR, "the perturbation radius from the saved step on"),
    "aux_refresh": (HONOUR, "Bi-LoRA: auxiliary refreshes from the saved step on"),
    "aux_diagnostics_every": (HONOUR, "diagnostics rows only"),
    "squeeze_optimizer": (HONOUR, "how later rank changes treat the moments"),
    "squeeze_aux": (HONOUR, "whether later rank changes squeeze the auxiliary"),
    "eval_data": (HONOUR, "held-out evaluation only"),
    "bf16": (HONOUR, "the frozen base's dtype from the saved step on (adapters stay fp32)"),
    "quantize": (HONOUR, "the frozen base's storage from the saved step on"),
    "attn_implementation": (HONOUR, "the attention kernel (same maths)"),
    "kernels": (HONOUR, "fused kernels of the base (same maths)"),
    "compile": (HONOUR, "compilation (same maths)"),
    "loss_chunk": (HONOUR, "the head's loss chunking (same maths)"),
    "gradient_checkpointing": (HONOUR, "recomputation (same maths)"),
    "checkpoint_every": (HONOUR, "recomputation (same maths)"),
    "memory_budget": (HONOUR, "recomputation planning"),
    "engine": (HONOUR, "what shards the base (adapters are replicated; any world size resumes)"),
    "ds_config": (HONOUR, "the DeepSpeed engine's settings"),
    "replica_check_every": (HONOUR, "replica checks"),
    "eval_every": (HONOUR, "evaluation cadence"),
    "eval_on_start": (HONOUR, "a resumed run never evaluates before its first step"),
    "eval_batch_size": (HONOUR, "evaluation batching (same maths)"),
    "log_every": (HONOUR, "metrics cadence"),
    "save_every": (HONOUR, "checkpoint cadence"),
    "keep_last": (HONOUR, "checkpoints kept"),
    "on_save_error": (HONOUR, "what a failed save does"),
    "max_bad_steps": (HONOUR, "how many skipped steps stop the run"),
    "output_dir": (IGNORE, "where the run is (--resume DIR may name another directory's checkpoint)"),
    "resume": (IGNORE, "how this invocation starts"),
    "overwrite_output_dir": (IGNORE, "how this invocation starts"),
    "config": (IGNORE, "where this invocation's settings came from (the settings themselves are compared)"),
    "dry_run": (IGNORE, "a dry run trains nothing"),
    "plan_ranks": (IGNORE, "dry runs only"),
    "data_workers": (IGNORE, "how the data is tokenized (same examples)"),
    "data_cache": (IGNORE, "where tokenized data is cached (same examples)"),
}
# what the checkpoint's state.json identity holds: the refused settings, normalised (trainer.run_identity)
IDENTITY_KEYS = tuple(key for key, (policy, _) in RESUME_POLICY.items() if policy == REFUSE)


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
    hash_bytes(digest, path)
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
    except OSError as exc:
        return f"cannot save {final}: {exc.strerror or exc}; {kept}; {advice}"
    try:  # the same step saved again (a resumed run) is replaced only once whole
        with atomic_directory(final, exists="replace") as tmp:
            write_files(tmp)
    except (OSError, RuntimeError, SafetensorError) as exc:  # torch.save and safetensors word ENOSPC their own way
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


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _shown(key: str, value: Any, config: dict[str, Any]) -> str:
    """A setting's value as the refusal line shows it; the data by its path and digest."""
    if key == "data":
        return f"{config.get('data') or 'the embedded default'!r} (files sha256 {str(value)[:12]})"
    return repr(value)


def check_compatible(state: dict[str, Any], identity: dict[str, Any], path: Path,
                     config: dict[str, Any] | None = None) -> None:
    """Refuse to resume a checkpoint written by a run whose refused settings (RESUME_POLICY) differ: one line
    naming the setting and the saved value. A setting an older checkpoint did not record is not compared.
    `config` is this run's configuration (for the data's path in the line)."""
    saved_config = saved_settings(path)
    for key in IDENTITY_KEYS:
        if key not in state["identity"]:
            continue
        saved, now = state["identity"][key], identity.get(key)
        if saved != now:
            flag = _flag(key)
            raise UserError(f"--resume {path}: the checkpoint was written with {flag} "
                            f"{_shown(key, saved, saved_config)}, this run has {flag} "
                            f"{_shown(key, now, config or {})}; {flag} sets {RESUME_POLICY[key][1]}, so resume with "
                            f"the same {flag} or start a new --output-dir")


def saved_settings(path: Path) -> dict[str, Any]:
    """The configuration of the run that wrote the checkpoint at `path` (its config.yaml; {} if absent)."""
    import yaml

    file = Path(path) / "config.yaml"
    values = yaml.safe_load(file.read_text()) if file.is_file() else None
    return values if isinstance(values, dict) else {}


def honoured_changes(path: Path, config: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(setting, saved value, this run's value) of every honoured or budget setting that differs from the run that
    wrote the checkpoint at `path` (one missing from its config.yaml is not compared)."""
    saved = saved_settings(path)
    return [(key, saved[key], config[key]) for key, (policy, _) in RESUME_POLICY.items()
            if policy in (HONOUR, BUDGET) and key in saved and key in config and saved[key] != config[key]]


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """The start-up line of a resume that honours changed settings."""
    return ("resume honours changed settings (docs/RESUME.md): "
            + ", ".join(f"{_flag(key)} {old!r} -> {new!r}" for key, old, new in changes))


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


POLICY_WORDS = {REFUSE: "refused: one line names the setting and the saved value",
                BUDGET: "honoured and said while the step count stays; another step count is refused",
                HONOUR: "honoured from the saved step on, and said in one start-up line",
                IGNORE: "not compared"}


def policy_markdown() -> str:
    """The resume policy table of docs/RESUME.md, generated from RESUME_POLICY."""
    rows = [f"| `{_flag(key)}` | {policy} | {why} |" for key, (policy, why) in RESUME_POLICY.items()]
    return "\n".join(["| setting | on resume | why |", "|---|---|---|", *rows])
