"""``screen_dataset``: run the detectors ``screen.detectors`` names on one dataset and gather
their flags into ``ScreenFindings``. A pure core: no file I/O.

Fail closed: a detector that raises makes ``screen_dataset`` raise ``PipelineError``;
nothing is skipped silently. Unknown detector names raise ``InvalidInput``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from stages.core.errors import InvalidInput, PipelineError
from stages.core.fanout import Mapper
from stages.core.params import ScreenParams
from stages.ml.runtime import one_intra_op_thread

# importing the detector modules registers them
from stages.screening import datalab, labels  # noqa: F401
from stages.screening.annotators import _analyse_annotators
from stages.screening.backdoor import loss, shortcuts, spectral, stamps  # noqa: F401
from stages.screening.context import ScreenContext, check_categorical, check_screen_inputs
from stages.screening.prefetch import prefetch_evidence
from stages.screening.registry import DETECTORS
from stages.screening.results import DetectorResult, ScreenFindings


def screen_dataset(X: np.ndarray, y: np.ndarray, *, params: ScreenParams, annotator_labels: np.ndarray | None = None, progress: bool = False,
                   mapper: Mapper | None = None, categorical: Sequence[tuple[int, int]] | None = None,
                   row_ids: np.ndarray | None = None) -> ScreenFindings:
    """Run the detectors in ``params.detectors`` and gather their flags.

    Parameters
    ----------
    X : float array, N x C x H x W or N x F, values on the [0, 1] scale.
    y : int array (N,), labels 0..K-1.
    params : ScreenParams; ``detectors`` names registered detectors, run in that order.
    annotator_labels : optional int array (N, A), -1 = no label. When given, ``labels`` in
        the result is the consensus of annotators whose quality >= ``min_annotator_quality``.

    mapper : optional :class:`stages.core.fanout.Mapper`; when given, the heavy evidence (the
        folds, the screening network, the trigger-group search) is computed through it first,
        item by item (in parallel on a parallel mapper), with the same results.
    categorical : tables only: the [start, stop) columns of each categorical column's one-hot
        block, so that a category weighs in a distance as one column does
        (``stages.data.preprocessing.categorical_blocks``).
    row_ids : optional int array (N,): the number a reason gives each row (a near duplicate's
        original) when the rows are screened in another order than the dataset's; flags are
        still by position.

    Raises
    ------
    InvalidInput for bad inputs or unknown detector names; PipelineError when a detector
    fails (fail closed).
    """
    start = time.perf_counter()
    unknown = [d for d in params.detectors if d not in DETECTORS]
    if unknown:
        raise InvalidInput(f"unknown detector(s) {unknown}; known: {sorted(DETECTORS)}")
    if not params.detectors:
        raise InvalidInput("screen.detectors is empty: screening that checks nothing would pass everything")
    X, y, annotator_labels, k = check_screen_inputs(X, y, annotator_labels)
    ctx = ScreenContext(X, y, params=params, num_classes=k, annotator_labels=annotator_labels, mapper=mapper,
                        categorical=check_categorical(categorical, X), row_ids=_check_row_ids(row_ids, len(X)))
    # the screening nets are tiny: one intra-op thread is much faster than several
    # competing for a small, shared CPU (17 s vs 0.2 s measured for one digits net); the
    # items a mapper runs elsewhere set the same for themselves
    with one_intra_op_thread():
        return _screen(ctx, params, annotator_labels, progress, start, mapper)


def _check_row_ids(row_ids: np.ndarray | None, n: int) -> np.ndarray | None:
    if row_ids is None:
        return None
    ids = np.asarray(row_ids)
    if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
        raise InvalidInput(f"row_ids must be {n} integers, one per screened row, got shape {ids.shape} dtype {ids.dtype}")
    return ids


def _screen(ctx: ScreenContext, params: ScreenParams, annotator_labels: np.ndarray | None, progress: bool, start: float,
            mapper: Mapper | None) -> ScreenFindings:
    X = ctx.X

    per_detector: dict[str, dict[str, Any]] = {}
    merged: dict[int, dict[str, Any]] = {}
    if annotator_labels is not None:
        t0 = time.perf_counter()
        try:
            _analyse_annotators(ctx)
        except PipelineError:
            raise
        except Exception as err:  # fail closed
            raise PipelineError(f"screening check 'annotators' could not run: {type(err).__name__}: {err}") from err
        first_seconds = {"annotators": time.perf_counter() - t0}
    else:
        first_seconds = {}

    if mapper is not None:
        try:
            prefetch_evidence(ctx, list(params.detectors), mapper)
        except PipelineError:
            raise
        except Exception as err:  # fail closed: evidence that cannot be computed fails the screen
            raise PipelineError(f"screening evidence could not be computed: {type(err).__name__}: {err}") from err

    report = getattr(mapper, "progress", None)  # the flow's progress reporter (log, UI), when it gave one
    names = list(dict.fromkeys(params.detectors))
    for position, name in enumerate(names):
        t0 = time.perf_counter()
        if progress:
            print(f"[screen] {name} ...", file=sys.stderr, flush=True)
        if report:
            report("detectors", position, len(names), f"{name} running")
        try:
            res = DETECTORS[name](ctx)
        except PipelineError:
            raise
        except Exception as err:  # fail closed: a check that cannot run is a failed check
            raise PipelineError(f"screening check {name!r} could not run: {type(err).__name__}: {err}") from err
        if not isinstance(res, DetectorResult) or len(res.indices) != len(res.reasons) or len(res.indices) != len(res.scores):
            raise PipelineError(f"screening check {name!r} returned a malformed result")
        seconds = time.perf_counter() - t0 + first_seconds.pop(name, 0.0)
        per_detector[name] = {"flagged": int(len(res.indices)), "threshold": res.threshold, "seconds": round(seconds, 3), **res.extra}
        for i, s, r in zip(res.indices.tolist(), res.scores.tolist(), res.reasons):
            entry = merged.setdefault(int(i), {"index": int(i), "detectors": [], "scores": {}, "reasons": []})
            if name not in entry["detectors"]:
                entry["detectors"].append(name)
                entry["scores"][name] = float(s)
                entry["reasons"].append(r)
        if progress:
            print(f"[screen] {name}: {len(res.indices)} flagged in {seconds:.1f}s", file=sys.stderr, flush=True)
        if report:
            report("detectors", position + 1, len(names), f"{name}: {len(res.indices)} flagged in {seconds:.1f} s")

    flags = []
    for i in sorted(merged):
        e = merged[i]
        flags.append({"index": e["index"], "detectors": e["detectors"], "scores": e["scores"], "reason": "; ".join(e["reasons"])})
    return ScreenFindings(
        labels=ctx.labels,
        flags=flags,
        per_detector=per_detector,
        annotators=ctx.annotator_report,
        seconds=round(time.perf_counter() - start, 3),
        n_rows=len(X),
    )
