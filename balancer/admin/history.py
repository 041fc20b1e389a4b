"""The charts' history, kept by the balancer so a new dashboard page starts with it. Pure.

One sample per step: the time and each backend's request counter. The dashboard derives the
per-step shares from successive samples, exactly as it does from the live state stream.
Bounded: at most ``window / step`` samples, and a sample holds only the backends present.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

HISTORY_WINDOW = 600.0  # seconds: the last 10 minutes
HISTORY_STEP = 1.0


@dataclass(frozen=True)
class Sample:
    t: float  # wall-clock seconds, as "now" in /api/state
    requests: dict[str, int]


class History:
    def __init__(self, window: float = HISTORY_WINDOW, step: float = HISTORY_STEP) -> None:
        if not (math.isfinite(window) and math.isfinite(step) and 0 < step <= window):
            raise ValueError(f"history needs 0 < step <= window, got {step} and {window}")
        self.window = window
        self.step = step
        self.samples: deque[Sample] = deque(maxlen=math.ceil(window / step) + 1)

    def record(self, t: float, requests: dict[str, int]) -> None:
        """Keep one sample per step; an earlier-than-step call (or a clock step back) is skipped."""
        if self.samples and t - self.samples[-1].t < self.step * 0.5:
            return
        self.samples.append(Sample(t, dict(requests)))
        while self.samples and t - self.samples[0].t > self.window:
            self.samples.popleft()

    def as_dict(self, now: Sample | None = None) -> dict[str, Any]:
        """The samples, oldest first; ``now`` (not stored) ends them with the present."""
        samples = list(self.samples)
        if now is not None and (not samples or now.t > samples[-1].t):
            samples.append(now)
        return {
            "window_s": self.window,
            "step_s": self.step,
            "samples": [{"t": s.t, "requests": s.requests} for s in samples],
        }
