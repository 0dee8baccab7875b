"""Alert rules over the prediction stream. Pure: they say what to raise, the service raises it
(Prefect event, ledger entry, telemetry row, status page).

Kinds (the event each maps to is documented with the project's events):
``drift`` (input distribution moved away from the champion's training data),
``evasion`` (the share of inputs the detector flags in a window is above policy),
``low_confidence`` (the share of low-confidence predictions in a window is above policy),
``extraction`` (a client's query stream looks like an extraction sweep),
``alias_drift`` (the served alias was moved outside the pipeline),
``reload_refused`` (a new version failed verification and was not served),
``revoked`` (the served version was revoked: nothing is answered until the alias moves),
``telemetry`` (the telemetry store is locked or full, or recovered).
Each kind and subject is raised at most once per ``cooldown_s``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("drift", "evasion", "low_confidence", "extraction", "alias_drift", "reload_refused", "revoked", "telemetry")
SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Alert:
    kind: str
    severity: str
    message: str
    payload: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.severity not in SEVERITIES:
            raise ValueError(f"unknown alert kind or severity: {self.kind!r}, {self.severity!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RateRules:
    """Windowed shares of flagged and low-confidence predictions, with a cooldown per alert."""

    def __init__(self, *, window: int, low_confidence: float, max_low_confidence_rate: float, max_detector_rate: float,
                 cooldown_s: float = 300.0):
        self.window = window
        self.low_confidence = low_confidence
        self.max_low_confidence_rate = max_low_confidence_rate
        self.max_detector_rate = max_detector_rate
        self.cooldown_s = cooldown_s
        self._low: deque = deque(maxlen=window)
        self._flagged: deque = deque(maxlen=window)
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def allow(self, kind: str, subject: str = "", *, now: float | None = None) -> bool:
        """True when ``kind`` for ``subject`` was not raised within the cooldown (and records it)."""
        now = time.time() if now is None else now
        with self._lock:
            last = self._last.get((kind, subject))
            if last is not None and now - last < self.cooldown_s:
                return False
            self._last[(kind, subject)] = now
            return True

    def rates(self) -> dict[str, float]:
        with self._lock:
            n = len(self._low)
            return {"window": n, "low_confidence_rate": sum(self._low) / n if n else 0.0,
                    "detector_rate": sum(self._flagged) / n if n else 0.0}

    def observe(self, confidences: list[float], flagged: list[bool]) -> list[Alert]:
        with self._lock:
            self._low.extend(c < self.low_confidence for c in confidences)
            self._flagged.extend(bool(f) for f in flagged)
            full = len(self._low) >= self.window
        if not full:
            return []
        rates = self.rates()
        out = []
        if rates["detector_rate"] > self.max_detector_rate and self.allow("evasion"):
            out.append(Alert("evasion", "critical",
                             f"{rates['detector_rate']:.0%} of the last {self.window} inputs were flagged as adversarial or "
                             f"out of distribution (policy: at most {self.max_detector_rate:.0%})", rates))
        if rates["low_confidence_rate"] > self.max_low_confidence_rate and self.allow("low_confidence"):
            out.append(Alert("low_confidence", "warning",
                             f"{rates['low_confidence_rate']:.0%} of the last {self.window} predictions had confidence below "
                             f"{self.low_confidence} (policy: at most {self.max_low_confidence_rate:.0%})", rates))
        return out
