"""Run metrics: one JSON object per logged step in metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


class MetricsLog:
    """Appends rows to DIR/metrics.jsonl (non-finite numbers as null) and DIR/tensorboard/; a no-op on non-main
    ranks."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            self._jsonl = (out_dir / "metrics.jsonl").open("a", encoding="utf-8")
            self._tb = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}  # strict JSON
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop metrics.jsonl rows after `step` (a resumed run redoes them); the file is replaced atomically."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if _row_step(line) <= step]
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl row; inf for a line that is no row (e.g. cut off when a run was killed), so
    a resume drops it."""
    try:
        row = json.loads(line)
    except ValueError:
        return math.inf
    return row.get("step", 0) if isinstance(row, dict) and isinstance(row.get("step", 0), int) else math.inf


def trained_steps(out_dir: Path) -> int:
    """The last training step metrics.jsonl logged (0: none; a row of step 0 is the evaluation before training).
    An unreadable line counts as a step: a file someone wrote in is not thrown away."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    last = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            step = json.loads(line).get("step", 1) if line.strip() else 0
        except (ValueError, AttributeError):
            step = 1
        last = max(last, step if isinstance(step, int) else 1)
    return last
