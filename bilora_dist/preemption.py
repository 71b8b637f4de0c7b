"""Pre-emption: SIGTERM / SIGINT ask the run to stop after the current step, with a checkpoint."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

from bilora_dist.engines.base import Engine

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """While active, SIGTERM and SIGINT only record themselves; `agreed` tells every rank, at the same
    step, whether any rank received one (so all ranks save the same checkpoint and leave together)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self, engine: Engine) -> bool:
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=engine.device)
        engine.all_reduce_sum_(flag)
        return bool(flag.item() > 0)
