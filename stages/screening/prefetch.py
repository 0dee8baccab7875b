"""The heavy evidence of a screen, computed at once through a mapper, in two waves:

1. the K folds of the out-of-sample probabilities, the screening network, the trimmed
   nearest neighbours, the cross-class residuals and the Datalab audit, which are
   independent of each other;
2. what needs only the first wave: the first refits without doubted rows (``label_issues``'
   second fit, ``shortcuts``' first round; their 2K folds go out as one batch, so that two
   workers are not left with one idle for the last of each detector's K folds) and the
   trigger-group search (on the trimmed neighbours).

A mapper backed by several workers (local processes, a Dask cluster) runs each wave's items
side by side. Each item is the context's own recipe for that evidence (``RECIPES`` and
``fold_jobs`` in ``context.py``): the function and arguments the lazy path would call, so the
detectors then find in the context exactly what they would have computed one after another.

Only evidence that a configured detector uses is computed; whatever is already in the
context (the annotator analysis may have asked for the probabilities) is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from stages.core.fanout import Mapper
from stages.screening import labels
from stages.screening.backdoor import shortcuts
from stages.screening.context import ScreenContext, compute_evidence
from stages.screening.evidence import combine_folds

# evidence -> the detectors that read it (a detector not listed computes what it needs itself)
USERS = {
    "model_probs": {"label_issues", "annotators", "shortcuts"},
    "net": {"loss_isolation"},
    "trimmed": {"shortcuts", "stamps", "spectral"},
    "residuals": {"spectral"},
    "datalab": {"outliers", "near_duplicates"},
    "trigger_groups": {"spectral"},
}
# detector -> the mask of rows its first refit leaves out (None: no refit), from the first wave
REFITS: dict[str, Callable[[ScreenContext], np.ndarray | None]] = {
    "label_issues": labels.refit_mask,
    "shortcuts": shortcuts.refit_mask,
}


def prefetch_evidence(ctx: ScreenContext, detectors: list[str], mapper: Mapper) -> list[str]:
    """Compute the evidence the named detectors will read, through ``mapper``; return what
    was computed (in the order of the items)."""
    return _first_wave(ctx, detectors, mapper) + _second_wave(ctx, detectors, mapper)


def _wanted(ctx: ScreenContext, detectors: list[str]) -> set[str]:
    return {key for key, users in USERS.items() if users & set(detectors) and key not in ctx._cache}


def _second_wave(ctx: ScreenContext, detectors: list[str], mapper: Mapper) -> list[str]:
    jobs: list[tuple[Any, ...]] = []
    if "trigger_groups" in _wanted(ctx, detectors):
        # first: on poisoned data it searches again without the rows found so far
        jobs.append(ctx.evidence_job("trigger_groups"))
    masks: dict[str, np.ndarray] = {}
    for name, mask_of in REFITS.items():
        mask = mask_of(ctx) if name in detectors else None
        key = None if mask is None else ctx.refit_key(mask)
        if key is not None and key not in ctx._cache:
            masks[key] = mask   # two detectors leaving out the same rows share one refit
    split: list[tuple[str, list[tuple[np.ndarray, np.ndarray]]]] = []
    for key, mask in masks.items():
        folds, fold_jobs = ctx.fold_jobs(mask)
        jobs += fold_jobs
        split.append((key, folds))
    if not jobs:
        return []
    results = mapper(compute_evidence, jobs, label="screen-refit")
    if jobs[0][0] == "trigger_groups":
        ctx._cache["trigger_groups"] = results.pop(0)
    start = 0
    for key, folds in split:
        ctx._cache[key] = combine_folds(results[start:start + len(folds)], folds, len(ctx.X), ctx.num_classes)
        start += len(folds)
    return [job[0] if job[0] != "fold" else "refit" for job in jobs]


def _first_wave(ctx: ScreenContext, detectors: list[str], mapper: Mapper) -> list[str]:
    wanted = _wanted(ctx, detectors)
    # the longest items first, so that none starts last and leaves the other workers idle: the
    # network trains on every row, a fold on (K-1)/K of them; then the nearest-neighbour
    # searches (10,000 MNIST rows: trimmed 9 s, before the wave on this process, alone)
    jobs: list[tuple[Any, ...]] = []
    folds = None
    if "net" in wanted:
        jobs.append(ctx.evidence_job("net"))
    if "model_probs" in wanted:
        folds, fold_jobs = ctx.fold_jobs()
        jobs += fold_jobs
    for key in ("trimmed", "datalab", "residuals"):
        if key in wanted:
            jobs.append(ctx.evidence_job(key))
    if not jobs:
        return []
    results = mapper(compute_evidence, jobs, label="screen-evidence")
    by_kind: dict[str, list[Any]] = {}
    for job, result in zip(jobs, results):
        by_kind.setdefault(job[0], []).append(result)
    if folds is not None:
        ctx._cache["model_probs"] = combine_folds(by_kind["fold"], folds, len(ctx.X), ctx.num_classes)
    for key in ("net", "trimmed", "datalab", "residuals"):
        if key in by_kind:
            ctx._cache[key] = by_kind[key][0]
    return [job[0] for job in jobs]
