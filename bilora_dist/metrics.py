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
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
