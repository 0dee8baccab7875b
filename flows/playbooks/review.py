"""Labelled review items into a retraining run (``evasion-response --retrain``).

The reviewers' labelled, non-discarded items of a verified queue are added to the
champion's verified training data as a new source under ``data/purged/``; the run that
trains on it is named before it starts, so the ``review.train`` ledger entry (under that
run's id) says which items, with which labels and by whom, enter which run. After the run
ingested the source, its verified data must hold exactly those rows with those labels.

A table champion's queue keeps each flagged row as the client sent it (by column name): those
raw rows, with the reviewers' labels as class names, are appended to the champion's verified
table, and the run screens them, refits the preprocessing on its accepted rows, trains and
gates as any other; its data is checked by column values, since a category the champion's
rows lacked renumbers the category codes at ingest.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from flows.playbooks.data import DatasetVersion, write_source
from stages.core.errors import IntegrityError, InvalidInput
from stages.core.workspace import Workspace
from stages.core.canonical import canonical_json
from stages.data.prepared import class_name, parse_prepared, row_values
from stages.data.prepared import row_digest as sample_digest
from stages.data.preprocessing import (
    CATEGORICAL,
    apply_table_preprocessing,
    column_values,
    fit_table_preprocessing,
    prepared_rows,
    table_columns,
)
from stages.monitoring.review import ReviewQueue, queue_path
from stages.monitoring.review_labels import Review, open_review, record_training, training_rows
from stages.monitoring.reviewers import check_labellers
from stages.trust.context import RunContext
from stages.trust.hashing import sha256_file


def labelled_rows(ws: Workspace, name: str, *, model: str, data: DatasetVersion,
                  where: str) -> tuple[Review, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Queue ``name`` verified, with its labelled items as training rows ``(review, X, y, items)``.

    ``InvalidInput`` when the queue is another model's, holds no labelled item, or its rows
    cannot join the champion's data (another kind of data, columns, input shape or class list);
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
    if data.kind == "table":
        check_table_items(q.name, items)
    return review, X, y, items


def check_joinable(review: Review, data: DatasetVersion) -> None:
    """The queue's rows are inputs of the champion's data: same kind, columns (tables) or
    input shape (images), and classes."""
    q = review.queue
    kind = q.payload.get("data_kind", "image")
    if kind != data.kind:
        raise InvalidInput(f"review queue {q.name} holds {kind} inputs, the champion was trained on {data.kind} data")
    if data.kind == "table":
        want = [{"name": c["name"], "type": c["type"]} for c in table_columns(data.meta, data.X.shape[1])]
        if q.columns is None:
            raise InvalidInput(f"review queue {q.name} keeps only the scaled features of its rows (written before queues "
                               "kept a table's raw rows): its rows cannot join the champion's table; queue them again")
        if q.columns != want:
            raise InvalidInput(f"review queue {q.name} holds rows of the columns {[c['name'] for c in q.columns][:5]}..., "
                               f"the champion's table {[c['name'] for c in want][:5]}... (names and types differ)")
    elif list(q.X.shape[1:]) != list(data.X.shape[1:]):
        raise InvalidInput(f"review queue {q.name} holds inputs of shape {list(q.X.shape[1:])}, the champion's data "
                           f"{list(data.X.shape[1:])}")
    if list(q.classes) != list(data.classes):
        raise InvalidInput(f"review queue {q.name} was labelled with the classes {q.classes}, the champion now has "
                           f"{data.classes}")


def check_table_items(queue: str, items: list[dict[str, Any]]) -> None:
    """``InvalidInput`` naming the first labelled raw row with a number beyond the float32 range
    of prepared tables (the model clips it when serving; ingest refuses it): discard it."""
    limit = float(np.finfo(np.float32).max)
    for item in items:
        for name, v in item["row"].items():
            if isinstance(v, (int, float)) and abs(v) > limit:
                raise InvalidInput(f"review queue {queue}: item {item['input_sha256'][:16]}..., column {name!r} holds "
                                   f"{v:g}, beyond the float32 range of the champion's table; it cannot be trained on: "
                                   "mark it with 'mlsec review label ... --discard'")


def review_source(ws: Workspace, review: Review, data: DatasetVersion, X: np.ndarray, y: np.ndarray,
                  items: list[dict[str, Any]], *, run_id: str, declared: list[Any] | None,
                  label_column: str) -> tuple[str, list[str], dict]:
    """Write the champion's data plus the labelled rows as a new source and record which
    items enter run ``run_id``; return ``(source, overrides, record)``.

    Labels are written as class names, so the run's class list is the champion's
    (``flows.playbooks.data.write_source``; ``declared`` and ``label_column``: the run's
    ``data.classes`` and ``data.label_column`` settings). A table's items are their raw
    rows, written with the champion's rows under the same column names, each number past
    its column's range in the champion's table clipped to it: the row as the served model
    saw it (serving clips to the training range). Appended unclipped, one far-out row would
    stretch the range the retraining's preprocessing scales every row by; an item so clipped
    records the row it is trained as (``trained_row``) next to the row as sent.
    """
    renumbered = False
    if data.kind == "table" and items:
        columns = table_columns(data.meta, data.X.shape[1])
        X, grown = prepared_rows([it["row"] for it in items], columns)
        X = _clip_to_champion(X, data.X, columns, items)
        X = X.astype(np.float32)               # within its range: check_table_items
        renumbered = grown != columns          # a category the champion's rows lack: ingest sorts the codes anew
        data = replace(data, meta={**data.meta, "columns": grown})
    X_all = np.concatenate([data.X, X.reshape(len(X), *data.X.shape[1:]).astype(data.X.dtype)]) if len(X) else data.X
    positions = np.concatenate([data.y, y]) if len(y) else data.y
    source, overrides = write_source(ws, f"review-{review.queue.name}-{run_id}", data, X_all, positions,
                                     label_column=label_column, declared=declared)
    for item, row in zip(items, X):   # as the run's data will name it (unknown when ingest renumbers categories)
        item["sample_sha256"] = None if renumbered else sample_digest(row[None], int(item["position"]), 0)
    # checked again where the items are committed to the run: the policy in force now
    policy = check_labellers(ws, queue=review.queue.name, decisions=review.final.values()) if items else None
    record = record_training(ws, review.queue, items, run_id=run_id, source=source, source_sha256=sha256_file(source),
                             policy_sha256=policy.sha256 if policy else None)
    return source, overrides, {"queue": review.queue.name, "path": queue_path(ws, review.queue), "run_id": run_id,
                               "items": len(items), "champion_rows": int(len(data.y)), "source": source,
                               "source_sha256": record["source_sha256"]}


def _clip_to_champion(X: np.ndarray, champion: np.ndarray, columns: list[dict[str, Any]],
                      items: list[dict[str, Any]]) -> np.ndarray:
    """``X`` (prepared raw rows of ``items``) with each numeric column clipped to its range in
    the champion's prepared table; an item with a clipped cell gains ``trained_row``."""
    X = X.copy()
    for j, column in enumerate(columns):
        if column["type"] == CATEGORICAL or not np.isfinite(champion[:, j]).any():
            continue
        low, high = float(np.nanmin(champion[:, j])), float(np.nanmax(champion[:, j]))
        for i in np.flatnonzero((X[:, j] < low) | (X[:, j] > high)):      # NaN (missing) compares False: kept
            bound = low if X[i, j] < low else high
            X[i, j] = bound
            items[i]["trained_row"] = {**items[i].get("trained_row", items[i]["row"]), column["name"]: bound}
    return X


def check_run_data(ws: Workspace, run_id: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """After the run ingested the source: its verified data holds every review row with the
    reviewer's label (``IntegrityError`` otherwise: the source changed between write and ingest)."""
    ctx = RunContext(ws, run_id)
    if not ctx.manifest_path.exists():
        return {"checked": False, "reason": "the run stopped before ingest"}
    files, _ = ctx.dataset_bytes(where="evasion-response")
    X, y, _, meta = parse_prepared(files)
    if meta.get("kind") == "table":      # by column values and class name: category codes may be renumbered
        present = {table_row_key(row_values(X, meta, i)["values"], class_name(meta, int(y[i]))) for i in range(len(y))}
        missing = [it["input_sha256"] for it in items
                   if table_row_key(it.get("trained_row", it["row"]), it["label"]) not in present]
    else:
        present = {sample_digest(X, int(y[i]), i) for i in range(len(y))}
        missing = [it["input_sha256"] for it in items if it["sample_sha256"] not in present]
    if missing:
        raise IntegrityError(f"run {run_id}'s verified data lacks {len(missing)} of the {len(items)} review rows with "
                             f"their reviewers' labels (first: {missing[0][:16]}...): its source changed after it was written")
    return {"checked": True, "review_rows_in_run_data": len(items)}


def table_row_key(values: dict[str, Any], label: Any) -> bytes:
    """A table row and its class name as the prepared data holds them: numbers at float32
    precision (7 significant digits, as ``row_values`` gives them), category text stripped,
    None for a missing cell."""
    def cell(v: Any) -> Any:
        if isinstance(v, str):
            return v.strip() or None
        return None if v is None else float(f"{float(np.float32(v)):.7g}")

    return canonical_json({"values": {k: cell(v) for k, v in values.items()}, "label": str(label)})


def perturbation_inputs(data: DatasetVersion, queue: ReviewQueue, X_add: np.ndarray,
                        items: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(champion rows, queued rows) on one scale, for the L-inf distance that sets the
    retraining's epsilon: the labelled items (all queued items when none is labelled yet).

    Images as they are ([0, 1]). A table's raw rows and the champion's through one
    preprocessing fitted on the champion's rows (missing cells filled, unseen categories at
    zero): the scale the retrained network will see, up to the accepted rows it is refitted on.
    """
    if data.kind != "table" or queue.columns is None:
        return data.X, (X_add if len(X_add) else queue.X)
    rows = [it["row"] for it in items] or [it["row"] for it in queue.items]
    columns = table_columns(data.meta, data.X.shape[1])
    if not rows:
        return data.X, np.zeros((0, data.X.shape[1]), dtype=np.float32)
    spec = fit_table_preprocessing(data.X, columns, missing="impute", unknown_category="ignore")
    X, grown = prepared_rows(rows, columns)
    return (apply_table_preprocessing(column_values(data.X, columns), spec, unknown_category="ignore"),
            apply_table_preprocessing(column_values(X, grown), spec, unknown_category="ignore"))
