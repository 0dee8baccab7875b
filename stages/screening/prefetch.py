"""The heavy evidence of a screen, computed at once through a mapper: the K folds of the
out-of-sample probabilities, the screening network, and the trigger-group search. These are
independent of each other, so a mapper backed by several workers (local processes, a Dask
cluster) runs them side by side; each item is a module-level call on its own inputs, seeded
as the lazy path seeds it, so the detectors then find in the context exactly what they would
have computed one after another.

Only evidence that a configured detector uses is computed; whatever is already in the
context (the annotator analysis may have asked for the probabilities) is left as it is.
"""

from __future__ import annotations

from typing import Any

from stages.core.fanout import Mapper
from stages.screening.backdoor.trigger_groups import _trigger_groups
from stages.screening.context import ScreenContext
from stages.screening.evidence import _train_screening_net, combine_folds, fold_probs, oos_folds

# evidence -> the detectors that read it (a detector not listed computes what it needs itself)
USERS = {
    "model_probs": {"label_issues", "annotators", "shortcuts"},
    "net": {"loss_isolation"},
    "trigger_groups": {"spectral"},
}


def evidence_item(job: tuple[Any, ...]) -> Any:
    """One piece of evidence; ``job[0]`` says which (``fold``, ``net`` or ``trigger_groups``)."""
    kind, args = job[0], job[1:]
    if kind == "fold":
        return fold_probs(*args)
    if kind == "net":
        return _train_screening_net(*args)
    if kind == "trigger_groups":
        *positional, data_kind = args
        return _trigger_groups(*positional, kind=data_kind)
    raise ValueError(f"unknown evidence {kind!r}")


def prefetch_evidence(ctx: ScreenContext, detectors: list[str], mapper: Mapper) -> list[str]:
    """Compute the evidence the named detectors will read, through ``mapper``; return what
    was computed (in the order of the items)."""
    wanted = {key for key, users in USERS.items() if users & set(detectors) and key not in ctx._cache}
    jobs: list[tuple[Any, ...]] = []
    folds = None
    if "model_probs" in wanted:
        folds = oos_folds(ctx.labels, ctx.num_classes, ctx.params)
        X_view, features = ctx.view
        jobs += [("fold", X_view, features, ctx.labels, tr, te, ctx.num_classes, ctx.params, i) for i, (tr, te) in enumerate(folds)]
    if "net" in wanted:
        jobs.append(("net", ctx.view[0], ctx.labels, ctx.num_classes, ctx.params))
    if "trigger_groups" in wanted:
        jobs.append(("trigger_groups", ctx.flat, ctx.labels, ctx.typical, ctx.trimmed(), "table" if ctx.is_table else "image"))
    if not jobs:
        return []
    results = mapper(evidence_item, jobs, label="screen-evidence")
    by_kind: dict[str, list[Any]] = {}
    for job, result in zip(jobs, results):
        by_kind.setdefault(job[0], []).append(result)
    if folds is not None:
        ctx._cache["model_probs"] = combine_folds(by_kind["fold"], folds, len(ctx.X), ctx.num_classes)
    if "net" in by_kind:
        ctx._cache["net"] = by_kind["net"][0]
    if "trigger_groups" in by_kind:
        ctx._cache["trigger_groups"] = by_kind["trigger_groups"][0]
    return [job[0] for job in jobs]
