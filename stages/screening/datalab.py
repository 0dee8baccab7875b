"""Detectors ``outliers`` and ``near_duplicates``, on one cleanlab ``Datalab`` audit
(``datalab_issues`` in ``neighbours.py``).

``outliers``: cleanlab ``Datalab`` outlier (kNN) scores on the inputs; only extreme
outliers are flagged: images below Q1 - ``OUTLIER_IQR`` IQR of the score; tables below
Q1 - ``TABLE_OUTLIER_LOG_IQR`` IQR of its logarithm (table columns have long tails, the
score is skewed towards 0, and the images' rule puts the threshold below 0).

``near_duplicates``: ``Datalab`` near-duplicate sets: rows (almost) identical to an
earlier row; the first copy is kept.
"""

from __future__ import annotations

import numpy as np

from stages.screening.context import ScreenContext
from stages.screening.neighbours import DUPLICATE_RELATIVE_DISTANCE
from stages.screening.registry import register_detector
from stages.screening.results import DetectorResult

OUTLIER_IQR = 2.0  # clean digits and MNIST: none below; a uniform-noise image in digits: below
# tables: on log scores; clean breast cancer and wine (seeds 100-104) reach 9.5 IQR at most,
# a row with half its columns pushed to their maximum lies 14 IQR out
TABLE_OUTLIER_LOG_IQR = 10.0


@register_detector("outliers")
def detect_outliers(ctx: ScreenContext) -> DetectorResult:
    """Datalab's kNN outlier score; only extreme outliers (see the module docstring) are
    flagged: Datalab's own threshold flags about 2% of clean digits."""
    scores = ctx.evidence("datalab")["outlier"]["outlier_score"].to_numpy()
    if ctx.is_table:
        logs = np.log(np.clip(scores, 1e-300, None))
        q1, q3 = np.quantile(logs, [0.25, 0.75])
        thr = float(np.exp(q1 - TABLE_OUTLIER_LOG_IQR * (q3 - q1)))
    else:
        q1, q3 = np.quantile(scores, [0.25, 0.75])
        thr = float(q1 - OUTLIER_IQR * (q3 - q1))
    idx = np.where(scores < thr)[0]
    reasons = [f"far from every other row (kNN outlier score {scores[i]:.2g} < {thr:.2g})" for i in idx]
    return DetectorResult(idx, 1.0 - scores[idx], thr, reasons)


@register_detector("near_duplicates")
def detect_near_duplicates(ctx: ScreenContext) -> DetectorResult:
    """Datalab's near-duplicate sets (distance below ``DUPLICATE_RELATIVE_DISTANCE`` of the
    median nearest-neighbour distance); the first row of each set is kept."""
    issues = ctx.evidence("datalab")["near_duplicate"]
    sets = issues["near_duplicate_sets"].tolist()
    flat = ctx.features
    idx, scores, reasons = [], [], []
    for i in np.where(issues["is_near_duplicate_issue"].to_numpy())[0]:
        earlier = [int(j) for j in sets[i] if int(j) < i]
        if not earlier:
            continue
        j = min(earlier)
        same = ctx.labels[i] == ctx.labels[j]
        idx.append(int(i))
        scores.append(float(np.linalg.norm(flat[i] - flat[j])))
        reasons.append(f"near copy of row {ctx.row_id(j)} ({'same label' if same else f'conflicting labels {ctx.labels[j]} vs {ctx.labels[i]}'})")
    return DetectorResult(np.array(idx, dtype=np.int64), np.array(scores), f"{DUPLICATE_RELATIVE_DISTANCE} x median nearest-neighbour distance", reasons)
