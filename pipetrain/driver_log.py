"""RUN_DIR/driver.log: what a detached job's driver says, one timestamped line each.

The driver of a job started with `pipetrain submit` runs as a Dask task
(``detached_driver.drive``), where nobody reads its standard output: what
``pipetrain.job``'s train and resume print there (the partition table, the
progress line, the driver's notes on placement, recoveries and skipped
checkpoints, the summary) goes to this file instead, with the task's own state
lines (``driver: started ...``, ``driver: finished ...``), which
`pipetrain status` and `pipetrain logs -f` read back.

Only the driver's thread is redirected: ``sys.stdout`` becomes a router that
sends each registered thread's writes to its own log and every other thread's
to the worker's stdout as before, so two drivers on one worker keep apart.
"""
from __future__ import annotations

import logging
import re
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from pipetrain.rundir import DRIVER_LOG

SUBMITTED, STARTED, RETRYING = "submitted", "started", "retrying"
FINISHED, CANCELLED, FAILED = "finished", "cancelled", "failed"
FINAL_STATES = (FINISHED, CANCELLED, FAILED)
_STATE = re.compile(r"^driver: (submitted|started|retrying|finished|cancelled|failed)\b:? ?(.*)$")
_STAMP = "%Y-%m-%d %H:%M:%S.%f"


@dataclass(frozen=True)
class LogLine:
    time: float
    text: str

    @property
    def state(self) -> tuple[str, str] | None:
        """(state, detail) when this is one of the driver task's own state lines."""
        match = _STATE.match(self.text)
        return (match.group(1), match.group(2)) if match else None


class DriverLog:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / DRIVER_LOG
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        stamp = datetime.now().strftime(_STAMP)[:-3]  # milliseconds
        with self._lock, self.path.open("a") as f:
            f.writelines(f"{stamp}  {line}\n" for line in text.splitlines() or [""])

    def state(self, state: str, detail: str = "") -> None:
        self.write(f"driver: {state}" + (f": {detail}" if detail else ""))

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Send what this thread prints, and its pipetrain log messages (the checkpoint
        store's warnings), to the log while the block runs."""
        writer, thread = _LineWriter(self), threading.get_ident()
        router = _install_router()
        router.route(thread, writer)
        handler = _ThreadLogHandler(self, thread)
        logging.getLogger("pipetrain").addHandler(handler)
        try:
            yield
        finally:
            logging.getLogger("pipetrain").removeHandler(handler)
            router.unroute(thread)
            writer.close()


def read_lines(run_dir: str | Path, offset: int = 0) -> tuple[list[LogLine], int]:
    """The complete lines of RUN_DIR/driver.log from byte ``offset`` on, and the offset after them."""
    path = Path(run_dir) / DRIVER_LOG
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
    lines, last = [], 0.0
    for raw in complete.decode(errors="replace").splitlines():
        stamp, _, text = raw.partition("  ")
        try:
            last = datetime.strptime(stamp, _STAMP).timestamp()
        except ValueError:  # not one of ours: keep it, at the time of the line before
            text = raw
        lines.append(LogLine(last, text))
    return lines, offset + len(complete)


def last_state(run_dir: str | Path) -> tuple[str, str, float] | None:
    """The driver task's latest (state, detail, time), or None for a run no detached driver ran."""
    states = [(*line.state, line.time) for line in read_lines(run_dir)[0] if line.state]
    return states[-1] if states else None


def attempts(run_dir: str | Path) -> int:
    """How many times a driver task started on this run directory."""
    return sum(1 for line in read_lines(run_dir)[0] if line.state and line.state[0] == STARTED)


class _LineWriter:
    """A text stream that hands whole lines to a DriverLog."""

    def __init__(self, log: DriverLog):
        self.log, self._pending = log, ""

    def write(self, text: str) -> int:
        self._pending += text.replace("\r", "\n")
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if line.strip():
                self.log.write(line)
        return len(text)

    def flush(self) -> None:
        pass  # a line goes out once it is whole

    def isatty(self) -> bool:
        return False  # so the progress line prints plain lines, not redraws

    def close(self) -> None:
        if self._pending.strip():
            self.log.write(self._pending)
        self._pending = ""


class _ThreadLogHandler(logging.Handler):
    def __init__(self, log: DriverLog, thread: int):
        super().__init__(logging.INFO)
        self.log, self.thread = log, thread

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.log.write(f"{record.levelname.lower()}: {record.getMessage()}")


class _ThreadRouter:
    """sys.stdout, sending each registered thread's writes to its own stream."""

    def __init__(self, default: Any):
        self._default, self._streams = default, {}

    def route(self, thread: int, stream: Any) -> None:
        self._streams[thread] = stream

    def unroute(self, thread: int) -> None:
        self._streams.pop(thread, None)

    def _stream(self) -> Any:
        return self._streams.get(threading.get_ident(), self._default)

    def write(self, text: str) -> int:
        return self._stream().write(text)

    def flush(self) -> None:
        self._stream().flush()

    def isatty(self) -> bool:
        return self._stream().isatty()

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, ... of the real stdout
        return getattr(self._default, name)


_router_lock = threading.Lock()


def _install_router() -> _ThreadRouter:
    with _router_lock:
        if not isinstance(sys.stdout, _ThreadRouter):
            sys.stdout = _ThreadRouter(sys.stdout)
        return sys.stdout
