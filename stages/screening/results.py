"""What screening returns: one ``DetectorResult`` per detector, one ``ScreenFindings`` per dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class DetectorResult:
    """What one detector found: row indices, one score each, a threshold, a reason each."""

    indices: np.ndarray
    scores: np.ndarray
    threshold: float | str
    reasons: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScreenFindings:
    """Outcome of ``screen_dataset``; ``flags[i]["index"]`` is a row of the given X."""

    labels: np.ndarray
    flags: list[dict[str, Any]]
    per_detector: dict[str, dict[str, Any]]
    annotators: list[dict[str, Any]] | None
    seconds: float
    n_rows: int = 0

    @property
    def flagged_indices(self) -> np.ndarray:
        return np.array([f["index"] for f in self.flags], dtype=np.int64)

    @property
    def flagged_fraction(self) -> float:
        return len(self.flags) / self.n_rows if self.n_rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_rows": self.n_rows,
            "n_flagged": len(self.flags),
            "flagged_fraction": self.flagged_fraction,
            "labels": [int(v) for v in self.labels],
            "flags": self.flags,
            "per_detector": self.per_detector,
            "annotators": self.annotators,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, n_rows: int) -> "ScreenFindings":
        """The findings :meth:`to_dict` wrote, for ``n_rows`` screened rows (checked)."""
        if d.get("n_rows") != n_rows or len(d.get("labels", ())) != n_rows:
            raise ValueError(f"findings are for {d.get('n_rows')} rows, the data has {n_rows}")
        return cls(labels=np.asarray(d["labels"], dtype=np.int64), flags=list(d["flags"]), per_detector=dict(d["per_detector"]),
                   annotators=d.get("annotators"), seconds=float(d.get("seconds", 0.0)), n_rows=n_rows)
