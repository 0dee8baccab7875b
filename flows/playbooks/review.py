"""Labelled review items into a retraining run (``evasion-response --retrain``).

The reviewers' labelled, non-discarded items of a verified queue are added to the
champion's verified training data as a new source under ``data/purged/``; the run that
trains on it is named before it starts, so the ``review.train`` ledger entry (under that
run's id) says which items, with which labels and by whom, enter which run. After the run
ingested the source, its verified data must hold exactly those rows with those labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flows.playbooks.data import DatasetVersion, write_source
from stages.core.errors import IntegrityError, InvalidInput
from stages.core.workspace import Workspace
from stages.data.prepared import parse_prepared
from stages.data.prepared import row_digest as sample_digest
from stages.monitoring.review import queue_path
from stages.monitoring.review_labels import Review, open_review, record_training, training_rows
from stages.monitoring.reviewers import check_labellers
from stages.trust.context import RunContext
from stages.trust.hashing import sha256_file


def labelled_rows(ws: Workspace, name: str, *, model: str, data: DatasetVersion,
                  where: str) -> tuple[Review, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Queue ``name`` verified, with its labelled items as training rows ``(review, X, y, items)``.

    ``InvalidInput`` when the queue is another model's, holds no labelled item, or its rows
    cannot join the champion's data (table data, another input shape or class list);
    ``IntegrityError`` when the queue or a label changed since it was signed; ``GateRejected``
    when an item's final decision is not by a pinned reviewer of the signed policy in force.
    """
    review = open_review(ws, name, where=where)
    q = review.queue
    if q.model != model:
        raise InvalidInput(f"review queue {name} is of model {q.model!r}, not {model!r}")
    X, y, items = training_rows(q, review.final)
    if not items:
        raise InvalidInput(f"review queue {name} has no labelled items to train on "
                           f"({len(q.items)} items, {sum(d.decision == 'discard' for d in review.final.values())} "
                           "discarded): label them with 'mlsec review label'")
    check_labellers(ws, queue=name, decisions=review.final.values())   # by the signed policy's reviewers only
    check_joinable(review, data)
    return review, X, y, items


def check_joinable(review: Review, data: DatasetVersion) -> None:
    """The queue's rows are inputs of the champion's data: same kind, input shape and classes."""
    q = review.queue
    if data.kind != "image":
        raise InvalidInput(f"review queue {q.name}: the champion was trained on {data.kind} data, whose served inputs are "
                           "the scaled features, not rows of its training data; review items can join image data only")
    if list(q.X.shape[1:]) != list(data.X.shape[1:]):
        raise InvalidInput(f"review queue {q.name} holds inputs of shape {list(q.X.shape[1:])}, the champion's data "
                           f"{list(data.X.shape[1:])}")
    if list(q.classes) != list(data.classes):
        raise InvalidInput(f"review queue {q.name} was labelled with the classes {q.classes}, the champion now has "
                           f"{data.classes}")


def review_source(ws: Workspace, review: Review, data: DatasetVersion, X: np.ndarray, y: np.ndarray,
                  items: list[dict[str, Any]], *, run_id: str, declared: list[Any] | None,
                  label_column: str) -> tuple[str, list[str], dict]:
    """Write the champion's data plus the labelled rows as a new source and record which
    items enter run ``run_id``; return ``(source, overrides, record)``.

    Labels are written as class names, so the run's class list is the champion's
    (``flows.playbooks.data.write_source``; ``declared`` and ``label_column``: the run's
    ``data.classes`` and ``data.label_column`` settings).
    """
    X_all = np.concatenate([data.X, X.reshape(len(X), *data.X.shape[1:]).astype(data.X.dtype)]) if len(X) else data.X
    positions = np.concatenate([data.y, y]) if len(y) else data.y
    source, overrides = write_source(ws, f"review-{review.queue.name}-{run_id}", data, X_all, positions,
                                     label_column=label_column, declared=declared)
    for item, row in zip(items, X):
        item["sample_sha256"] = sample_digest(row[None], int(item["position"]), 0)   # as the run's data will name it
    # checked again where the items are committed to the run: the policy in force now
    policy = check_labellers(ws, queue=review.queue.name, decisions=review.final.values()) if items else None
    record = record_training(ws, review.queue, items, run_id=run_id, source=source, source_sha256=sha256_file(source),
                             policy_sha256=policy.sha256 if policy else None)
    return source, overrides, {"queue": review.queue.name, "path": queue_path(ws, review.queue), "run_id": run_id,
                               "items": len(items), "champion_rows": int(len(data.y)), "source": source,
                               "source_sha256": record["source_sha256"]}


def check_run_data(ws: Workspace, run_id: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """After the run ingested the source: its verified data holds every review row with the
    reviewer's label (``IntegrityError`` otherwise: the source changed between write and ingest)."""
    ctx = RunContext(ws, run_id)
    if not ctx.manifest_path.exists():
        return {"checked": False, "reason": "the run stopped before ingest"}
    files, _ = ctx.dataset_bytes(where="evasion-response")
    X, y, _, _ = parse_prepared(files)
    present = {sample_digest(X, int(y[i]), i) for i in range(len(y))}
    missing = [it["input_sha256"] for it in items if it["sample_sha256"] not in present]
    if missing:
        raise IntegrityError(f"run {run_id}'s verified data lacks {len(missing)} of the {len(items)} review rows with "
                             f"their reviewers' labels (first: {missing[0][:16]}...): its source changed after it was written")
    return {"checked": True, "review_rows_in_run_data": len(items)}
