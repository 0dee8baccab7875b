"""Detector ``annotators``: cleanlab CROWDLAB (``get_label_quality_multiannotator``); annotators below
``min_annotator_quality`` are dropped, the consensus is recomputed from the rest, and rows
whose given label disagrees with that consensus are flagged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from cleanlab.multiannotator import get_label_quality_multiannotator

from stages.core.errors import InvalidInput
from stages.screening.context import ScreenContext
from stages.screening.registry import register_detector
from stages.screening.results import DetectorResult

ANNOTATOR_MAX_GAP = 0.15  # also drop annotators this far below the median annotator quality


def _crowdlab(A: np.ndarray, probs: np.ndarray) -> dict[str, Any]:

    frame = pd.DataFrame(np.where(A < 0, np.nan, A.astype(np.float64)))
    return get_label_quality_multiannotator(frame, probs, verbose=False)


def _analyse_annotators(ctx: ScreenContext) -> None:
    """CROWDLAB once with every annotator, then again with only those above the minimum."""
    A = ctx.annotator_labels
    if A is None:
        return
    has = (A >= 0).any(1)
    probs = ctx.pred_probs()
    rows = np.where(has)[0]
    if len(rows) == 0:
        raise InvalidInput("annotator_labels holds no label at all")
    first = _crowdlab(A[rows], probs[rows])
    stats = first["annotator_stats"]
    quality = {int(a): float(stats.loc[a, "annotator_quality"]) for a in stats.index}
    peer = float(np.median(list(quality.values()))) if quality else 0.0
    good = [a for a in range(A.shape[1]) if quality.get(a, 0.0) >= max(ctx.params.min_annotator_quality, peer - ANNOTATOR_MAX_GAP)]
    ctx.annotator_report = [
        {"annotator": a, "quality": quality.get(a, float("nan")), "flagged": a not in good, "n_labels": int((A[:, a] >= 0).sum())}
        for a in range(A.shape[1])
    ]
    consensus = ctx.y_given.copy()
    if good:
        Ag = A[:, good]
        rows_g = np.where((Ag >= 0).any(1))[0]
        second = _crowdlab(Ag[rows_g], probs[rows_g])
        consensus[rows_g] = second["label_quality"]["consensus_label"].to_numpy().astype(np.int64)
        no_trusted = np.setdiff1d(np.arange(len(A)), rows_g)
    else:
        no_trusted = np.arange(len(A))
    ctx.labels = consensus
    ctx.consensus_disagrees = consensus != ctx.y_given
    ctx._cache["no_trusted_rows"] = no_trusted
    for key in ("residuals", "trimmed", "trigger_groups", "net", "datalab"):
        ctx._cache.pop(key, None)


@register_detector("annotators")
def detect_annotators(ctx: ScreenContext) -> DetectorResult:
    if ctx.annotator_labels is None:
        return DetectorResult(np.array([], dtype=np.int64), np.array([]), "no annotator_labels given", [])
    if ctx.annotator_report is None:
        _analyse_annotators(ctx)
    bad = [a["annotator"] for a in ctx.annotator_report if a["flagged"]]
    idx = np.where(ctx.consensus_disagrees)[0]
    reasons = [f"given label {ctx.y_given[i]} but trusted-annotator consensus is {ctx.labels[i]}" for i in idx]
    no_trusted = ctx._cache.get("no_trusted_rows", np.array([], dtype=np.int64))
    if bad and len(no_trusted):
        extra = np.setdiff1d(no_trusted, idx)
        idx = np.concatenate([idx, extra])
        reasons += [f"labelled only by annotators below quality {ctx.params.min_annotator_quality}" for _ in extra]
    return DetectorResult(idx, np.ones(len(idx)), ctx.params.min_annotator_quality, reasons, {"flagged_annotators": bad})
