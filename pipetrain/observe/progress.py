"""The live progress line and the JSON-lines metrics log of a run.

On a terminal the line redraws in place (step, loss, samples/s, per-stage
busy share, the latest held-out loss and the step it was evaluated after);
elsewhere (CI logs, pipes) it prints a plain line every few steps so logs
stay short. Every record also goes to the metrics log
(``RUN_DIR/metrics.jsonl``), one typed record (``observe/records.py``) a line,
and to the log's sinks (``observe/sinks.py``: TensorBoard, callbacks).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from pipetrain.observe.records import Record

log = logging.getLogger("pipetrain.observe")


class MetricsLog:
    """The JSON-lines file at ``path`` (None: no file) and ``sinks`` (``observe/sinks.py``), each
    handed every record written, in order. A sink that raises is logged once (naming it and the
    record's type) and the run goes on; it still gets the records that follow."""

    def __init__(self, path: str | Path | None, *, sinks: Iterable[Any] = ()):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sinks = list(sinks)
        self._failed: set[int] = set()  # indices of the sinks whose failure was logged

    def write(self, record: Record) -> None:
        """Append ``record`` as one line, stamped with the time now unless it carries its own; then the sinks get it."""
        if record.time is None and (self.path is not None or self.sinks):
            record = replace(record, time=time.time())
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record.to_json(), default=_jsonable) + "\n")
        for i, sink in enumerate(self.sinks):
            try:
                sink.write(record)
            except Exception as e:  # a sink's failure is not the job's
                self._warn(i, sink, f"raised on a {record.as_dict()['type']!r} record: "
                                    f"{type(e).__name__}: {e}")

    def close(self) -> None:
        """Close the sinks (the file is opened per record and needs nothing)."""
        for i, sink in enumerate(self.sinks):
            try:
                sink.close()
            except Exception as e:
                self._warn(i, sink, f"raised on close: {type(e).__name__}: {e}")

    def _warn(self, i: int, sink: Any, what: str) -> None:
        if i in self._failed:
            return
        self._failed.add(i)
        log.warning("metrics sink %s %s; the run goes on (further failures of this sink are not logged)",
                    getattr(sink, "name", repr(sink)), what)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class Progress:
    def __init__(self, total_steps: int, *, enabled: bool = True, stream: IO[str] | None = None, every: int = 0,
                 stages: int = 0):
        """``stages``: the pipeline's, when it runs as replicas: the busy shares (one per task)
        are then shown a replica at a time, ``busy 90% 80% | 91% 79%``."""
        self.total = total_steps
        self.stages = stages
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every = every or max(1, total_steps // 10)
        self._last_width = 0
        self.heldout: tuple[int, float] | None = None  # (step, loss) of the latest evaluation

    def eval(self, step: int, loss: float) -> None:
        """The held-out loss after ``step`` steps: shown on the step lines that follow; the ones
        before and after training (no step line follows the last) also as a line of their own."""
        self.heldout = (step, loss)
        if step == 0 or step >= self.total:
            self.note(f"held-out loss {loss:.4f} {'before training' if step == 0 else f'after step {step}'}")

    def step(self, step: int, *, loss: float | None, samples_per_s: float | None, busy: list[float]) -> None:
        if not self.enabled:
            return
        done = step + 1
        bar_width = 24
        filled = int(bar_width * done / max(1, self.total))
        bar = "#" * filled + "." * (bar_width - filled)
        parts = [f"[{bar}] step {done}/{self.total}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if samples_per_s:
            parts.append(f"{samples_per_s:,.0f} samples/s")
        if busy:
            p = self.stages if self.stages and len(busy) > self.stages else len(busy)
            parts.append("busy " + " | ".join(" ".join(f"{b:.0%}" for b in busy[r:r + p])
                                              for r in range(0, len(busy), p)))
        if self.heldout is not None:
            parts.append(f"held-out {self.heldout[1]:.4f} (step {self.heldout[0]})")
        line = "  ".join(parts)
        if self.tty:
            pad = max(0, self._last_width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._last_width = len(line)
            if done >= self.total:
                self.stream.write("\n")
        elif done % self.every == 0 or done >= self.total or done == 1:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty and self._last_width:
            self.stream.write("\n")
            self._last_width = 0
        self.stream.write(text + "\n")
        self.stream.flush()
