"""Rate-limited warnings for what an endpoint refuses (the counters in its stats see everything)."""
from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["WarningBudget"]


class WarningBudget:
    """At most ``burst`` warnings at once, then one per ``every`` seconds: a flood of
    junk connections must not flood the worker's log too (the counters see all)."""

    def __init__(self, log: logging.Logger, burst: int = 20, every: float = 1.0):
        self.log, self.burst, self.every = log, burst, every
        self.tokens, self.last, self.suppressed = float(burst), time.monotonic(), 0

    def warn(self, text: str, *args: Any) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) / self.every)
        self.last = now
        if self.tokens < 1:
            self.suppressed += 1
            return
        self.tokens -= 1
        if self.suppressed:
            text += f" ({self.suppressed} more rejections since the last warning, counted in stats only)"
            self.suppressed = 0
        self.log.warning(text, *args)
