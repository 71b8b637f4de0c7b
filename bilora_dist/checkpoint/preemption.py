"""Pre-emption: SIGTERM / SIGINT ask the run to stop after the current step, with a checkpoint. And the output
directory's lock, which keeps a second run (a second `--resume auto`, a second launch) out of it."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from bilora_dist.engines.base import Engine
from bilora_dist.errors import UserError

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


LOCK_NAME = ".lock"


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, Linux), to tell a reused pid apart; None elsewhere."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    """Whether process `pid` of this host still runs (and is the one that started at `start`, where known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return start is None or _process_start(pid) in (None, start)


class OutputLock:
    """Exclusive use of an output directory by one run: OUT/.lock names the holder (host, pid). Only the main rank
    holds it (ranks on other nodes may share the filesystem); every rank learns whether it was taken. A lock whose
    process is dead on this host is taken over (one line says so). Released on leaving the `with` block, whatever
    ended it (an error, a stop request); a directory this lock created and nothing else filled is removed again."""

    def __init__(self, out: Path, engine: Engine, say: Callable[[str], None]) -> None:
        self.out, self.engine, self.say = Path(out), engine, say
        self.path, self.held, self.created = self.out / LOCK_NAME, False, False

    def __enter__(self) -> "OutputLock":
        problem = None
        if self.engine.is_main:
            try:
                problem = self._take()
            except OSError as exc:
                problem = f"--output-dir {self.out}: cannot create it or its lock ({exc.strerror or exc})"
        problem = self.engine.gather_object(problem)[0]
        if problem is not None:
            self.__exit__()
            raise UserError(problem)
        return self

    def _take(self) -> str | None:
        """None once the lock is held; else the line saying who holds it."""
        if self.out.exists() and not self.out.is_dir():
            return f"--output-dir {self.out} is an existing file, not a directory; choose another --output-dir"
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        host, me = socket.gethostname(), {"host": socket.gethostname(), "pid": os.getpid(),
                                          "start": _process_start(os.getpid()), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == host and isinstance(holder.get("pid"), int) \
                        and not _alive(holder["pid"], holder.get("start")):
                    self.path.unlink(missing_ok=True)  # another taker may win the race for it: the loop sees
                    self.say(f"taking over the stale lock {self.path} of pid {holder['pid']} on {host} "
                             "(that process has ended)")
                    continue
                return self._in_use(holder, host)
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return None
        return self._in_use(self._holder(), host)

    def _holder(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _in_use(self, holder: dict[str, Any], host: str) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
        who = (f"host {holder.get('host')}, pid {holder.get('pid')}, since {since}" if holder else
               "an unreadable lock file")
        gone = ("" if holder.get("host") == host else
                f"; if that run is gone (another host cannot be checked from here), delete {self.path}")
        return (f"--output-dir {self.out} is in use by another run ({who}); wait for it to end or choose another "
                f"--output-dir{gone}")

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        if self.created and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()  # a run refused before it wrote anything leaves no directory behind
