"""The live progress line and the JSON-lines metrics log of a run.

On a terminal the line redraws in place (step, loss, samples/s, per-stage
busy share); elsewhere (CI logs, pipes) it prints a plain line every few
steps so logs stay short. Every record also goes to the metrics log
(``RUN_DIR/metrics.jsonl``), one typed record (``observe/records.py``) a line.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any

from pipetrain.observe.records import Record


class MetricsLog:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Record) -> None:
        """Append ``record`` as one line, stamped with the time now unless it carries its own."""
        if self.path is None:
            return
        line = record.to_json()
        if line["time"] is None:
            line["time"] = time.time()
        with self.path.open("a") as f:
            f.write(json.dumps(line, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class Progress:
    def __init__(self, total_steps: int, *, enabled: bool = True, stream: IO[str] | None = None, every: int = 0):
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every = every or max(1, total_steps // 10)
        self._last_width = 0

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
            parts.append("busy " + " ".join(f"{b:.0%}" for b in busy))
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
