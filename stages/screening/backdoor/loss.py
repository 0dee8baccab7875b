"""Detector ``loss_isolation``: anti-backdoor-learning style (Li et al. 2021): per-sample loss over
the first epochs of the screening network; rows learned abnormally fast for their class
(robust z of the log-loss area below ``LOSS_Z``) are flagged.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import median_abs_deviation

from stages.screening.context import ScreenContext
from stages.screening.registry import register_detector
from stages.screening.results import DetectorResult

LOSS_Z = -4.0


def _robust_z(v: np.ndarray) -> np.ndarray:
    """(v - median) / (normal-consistent MAD), the usual robust z-score."""
    return (v - np.median(v)) / (median_abs_deviation(v, scale="normal") + 1e-12)


@register_detector("loss_isolation")
def detect_loss_isolation(ctx: ScreenContext) -> DetectorResult:
    losses = ctx.screening_net()["losses"]
    early = losses[: max(1, len(losses) // 2)]
    area = np.log(early.mean(0) + 1e-8)
    idx, scores, reasons = [], [], []
    for c in np.unique(ctx.labels):
        ic = np.where(ctx.labels == c)[0]
        z = _robust_z(area[ic])
        hit = z < LOSS_Z
        for r, v in zip(ic[hit], z[hit]):
            idx.append(int(r))
            scores.append(float(-v))
            reasons.append(f"class {c}: learned abnormally fast (robust z of early log-loss {v:.1f})")
    return DetectorResult(np.array(idx, dtype=np.int64), np.array(scores), f"robust z < {LOSS_Z}", reasons)
