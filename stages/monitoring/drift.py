"""Windowed input drift against the champion's training data.

Two tests on the most recent ``window`` inputs, flattened to features:

* ``mean_z``: each feature's window mean against the signed reference statistics
  (``feature_mean``, ``feature_std`` of the champion's data), in standard errors:
  ``|mean_w - mean_ref| / (std_ref / sqrt(n))``. Features constant in the reference
  (std 0, such as always-blank pixels) count when the window moves them at all.
* a distribution test per feature against a sample of the verified training rows
  (``DISTRIBUTION_TESTS``), with the p-value threshold Bonferroni-corrected over the
  features; ``drifted_features`` counts those below it.

The window drifts when either test says so. Both are pure functions of arrays.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from stages.core.errors import InvalidInput


def mean_shift_z(window: np.ndarray, *, feature_mean: np.ndarray, feature_std: np.ndarray) -> np.ndarray:
    """Per-feature |window mean - reference mean| in standard errors (inf where a constant
    reference feature moved)."""
    n = len(window)
    diff = np.abs(window.mean(axis=0) - feature_mean)
    se = feature_std / math.sqrt(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, diff / np.where(se > 0, se, 1), np.where(diff > 1e-6, np.inf, 0.0))
    return np.where(np.isfinite(feature_mean), z, 0.0)


def ks_pvalues(window: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Two-sample Kolmogorov-Smirnov p-value per feature (SciPy)."""
    from scipy.stats import ks_2samp  # SciPy: slow to import, only the drift test needs it

    out = np.ones(window.shape[1])
    for j in range(window.shape[1]):
        a, b = window[:, j], reference[:, j]
        if np.ptp(a) == 0 and np.ptp(b) == 0 and a[0] == b[0]:
            continue  # the same constant on both sides
        out[j] = ks_2samp(a, b).pvalue
    return out


DISTRIBUTION_TESTS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {"ks": ks_pvalues}


@dataclass(frozen=True)
class DriftResult:
    drifted: bool
    n: int
    max_mean_z: float
    mean_z_features: int          # features over the z threshold
    drifted_features: int         # features under the corrected p-value threshold
    min_p_value: float
    test: str

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


def drift_test(window: np.ndarray, *, reference_sample: np.ndarray, statistics: dict[str, Any], p_value: float,
               max_mean_z: float, test: str = "ks") -> DriftResult:
    """Test a window (N, F) of inputs against the reference; see the module docstring."""
    window = window.reshape(len(window), -1).astype(np.float64)
    reference_sample = reference_sample.reshape(len(reference_sample), -1).astype(np.float64)
    k = window.shape[1]
    mean = np.asarray([np.nan if v is None else v for v in statistics.get("feature_mean", [])], dtype=np.float64)
    std = np.asarray([np.nan if v is None else v for v in statistics.get("feature_std", [])], dtype=np.float64)
    if len(mean) != k or len(std) != k or reference_sample.shape[1] != k:
        raise InvalidInput(f"drift reference has {len(mean)} features and a sample of {reference_sample.shape[1]}, "
                           f"the inputs {k}")
    if test not in DISTRIBUTION_TESTS:
        raise InvalidInput(f"unknown drift test {test!r}; known: {sorted(DISTRIBUTION_TESTS)}")
    z = mean_shift_z(window, feature_mean=mean, feature_std=std)
    p = DISTRIBUTION_TESTS[test](window, reference_sample)
    over_z = int((z > max_mean_z).sum())
    under_p = int((p < p_value / k).sum())
    return DriftResult(drifted=bool(over_z or under_p), n=len(window), max_mean_z=float(z.max()), mean_z_features=over_z,
                       drifted_features=under_p, min_p_value=float(p.min()), test=test)


class DriftMonitor:
    """A ring buffer of recent inputs, tested every ``every`` new rows once it is full, and at
    most once per ``min_interval_s`` (at high traffic the test would otherwise take a core)."""

    def __init__(self, *, reference_sample: np.ndarray, statistics: dict[str, Any], window: int, every: int,
                 p_value: float, max_mean_z: float, test: str = "ks", min_interval_s: float = 0.0):
        self.reference_sample = reference_sample.reshape(len(reference_sample), -1)
        self.statistics = statistics
        self.window, self.every = window, every
        self.p_value, self.max_mean_z, self.test = p_value, max_mean_z, test
        self.min_interval_s = min_interval_s
        self._rows: deque = deque(maxlen=window)
        self._since = 0
        self._last_test = -math.inf
        self._lock = threading.Lock()
        self.last: DriftResult | None = None

    def add(self, X: np.ndarray) -> np.ndarray | None:
        """Add rows; return a window to test when one is due (test it off the request path)."""
        with self._lock:
            self._rows.extend(X.reshape(len(X), -1))
            self._since += len(X)
            now = time.monotonic()
            if len(self._rows) < self.window or self._since < self.every or now - self._last_test < self.min_interval_s:
                return None
            self._since, self._last_test = 0, now
            return np.stack(self._rows)

    def evaluate(self, window: np.ndarray) -> DriftResult:
        self.last = drift_test(window, reference_sample=self.reference_sample, statistics=self.statistics,
                               p_value=self.p_value, max_mean_z=self.max_mean_z, test=self.test)
        return self.last
