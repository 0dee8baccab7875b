"""Review queues: the inputs the serving detector flagged, kept for people to label.

A queue is a folder ``serving/review/<queue>/``::

    inputs.npz   X: the flagged inputs, N x input shape, float32 on the model's input scale
                 ([0, 1] for images, the scaled features for a table), as the network saw
                 them; predictions: N int64
    queue.json   signed with the pipeline's key: the queue's name, model, reason, the
                 champion's class list, the input shape, the SHA-256 of inputs.npz and one
                 item per row (input digest, client, time, model version, prediction,
                 detector score); for a table model also the columns (name, type) and each
                 item's ``row``: the raw row as the client sent it, by column name
                 (numbers, categories as text, null for a missing cell), which is what a
                 reviewer reads and a retraining appends to the champion's table
    labels/      the reviewers' signed label documents (``stages.monitoring.review_labels``)

Each item's ``input_sha256`` is the digest the service logged
(``stages.monitoring.inputs.row_digest``: SHA-256 of the row as float32, C order). A row
whose bytes no longer hash to its digest in the telemetry store is left out of the queue
(counted), as is a table row the service logged without its raw row (flagged before raw
rows were kept), with other columns than the champion's, or whose raw row the answering
version's signed preprocessing does not turn into the logged features (the telemetry store
is not signed: an edited raw row would otherwise reach a retraining); once written, the queue is read only through :func:`load_queue`, which checks the
signature, the file digest, every row's digest and the ``review.queue`` ledger entry that
recorded it, and refuses (``IntegrityError``, exit 4, with an ``integrity.violation`` ledger
entry) on any difference.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.canonical import canonical_json
from stages.core.errors import IntegrityError, InvalidInput
from stages.core.workspace import Workspace, write_json
from stages.data.prepared import load_npz_bytes
from stages.monitoring.inputs import row_digest, table_request
from stages.trust.hashing import read_file
from stages.trust.ledger import Ledger
from stages.trust.signing import sign_document, verify_document

QUEUE_SCHEMA = "mlsec.review-queue/v1"
QUEUE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
QUEUE_FILE, INPUTS_FILE, LABELS_DIR = "queue.json", "inputs.npz", "labels"


def review_dir(ws: Workspace) -> Path:
    """Where the review queues live: ``serving/review/``."""
    return ws.root / "serving" / "review"


@dataclass(frozen=True)
class ReviewQueue:
    """A verified queue: its signed payload, the payload's digest and the verified rows."""

    name: str
    folder: Path
    payload: dict[str, Any]
    sha256: str           # SHA-256 of the payload's canonical JSON (what labels and the ledger name)
    X: np.ndarray         # (N, *input_shape) float32, row i hashes to items[i]["input_sha256"]

    @property
    def model(self) -> str:
        return self.payload["model"]

    @property
    def items(self) -> list[dict[str, Any]]:
        return self.payload["items"]

    @property
    def classes(self) -> list[Any]:
        return self.payload["classes"]

    @property
    def columns(self) -> list[dict[str, Any]] | None:
        """A table queue's columns (name, type), in the order of each item's ``row``; None for images."""
        return self.payload.get("columns")

    def class_name(self, position: int) -> Any:
        return self.classes[position] if 0 <= position < len(self.classes) else position


def queue_folder(ws: Workspace, name: str, *, where: str, ledger_entries: list[dict[str, Any]] | None = None) -> Path:
    """The folder of queue ``name``.

    ``InvalidInput`` for a malformed name or a queue nobody made; ``IntegrityError`` when the
    ledger records the queue (or its folder exists) but its ``queue.json`` is gone.
    """
    if not isinstance(name, str) or not QUEUE_RE.match(name):
        raise InvalidInput(f"invalid review queue name {name!r}: letters, digits, '.', '_' and '-' only")
    folder = review_dir(ws) / name
    if (folder / QUEUE_FILE).is_file():
        return folder
    entries = Ledger(ws.ledger_path).entries() if ledger_entries is None else ledger_entries
    if folder.exists() or _recorded(entries, name):
        raise violation(ws, file=folder / QUEUE_FILE, reason="missing, but the ledger records the queue", where=where)
    known = queue_names(ws)
    raise InvalidInput(f"unknown review queue {name!r} (known: {', '.join(known[-5:]) or 'none'}; "
                       "'mlsec review list' lists them)")


def _recorded(entries: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("event") == "review.queue" and e["payload"].get("queue") == name]


def queue_names(ws: Workspace) -> list[str]:
    """Every queue folder that holds a ``queue.json``, oldest first."""
    root = review_dir(ws)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if QUEUE_RE.match(p.name) and (p / QUEUE_FILE).is_file())


def violation(ws: Workspace, *, file: Path, reason: str, where: str) -> IntegrityError:
    """Record an ``integrity.violation`` ledger entry and return the error to raise."""
    rel = str(file.relative_to(ws.root)) if file.is_relative_to(ws.root) else str(file)
    Ledger(ws.ledger_path).append("integrity.violation", {"file": rel, "reason": reason, "stage": where})
    return IntegrityError(f"integrity violation in {where}: {rel}: {reason}")


def _new_folder(ws: Workspace) -> tuple[str, Path]:
    """A new, empty queue folder named by the UTC time (``-2``, ``-3`` ... when taken)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    review_dir(ws).mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        name = stamp if n == 1 else f"{stamp}-{n}"
        try:
            (review_dir(ws) / name).mkdir()
        except FileExistsError:
            continue
        return name, review_dir(ws) / name
    raise InvalidInput(f"too many review queues named {stamp}")


def write_queue(ws: Workspace, *, model: str, reason: str, rows: list[dict[str, Any]], classes: list[Any],
                data_kind: str, columns: list[dict[str, Any]] | None = None,
                preprocessing: Callable[[str], dict[str, Any] | None] | None = None) -> tuple[ReviewQueue, dict[str, int]]:
    """Write a signed queue of flagged telemetry rows; return it and what was left out.

    Parameters
    ----------
    rows : list of dict
        ``flagged_inputs`` rows of the telemetry store: ``data`` (float32 bytes),
        ``shape`` (JSON list), ``input_sha256``, ``client``, ``time``, ``model_version``,
        ``prediction``, ``detector_score``; for a table model ``raw_row`` (JSON object).
    classes : list
        The champion's class list (from its signed manifest): what reviewers label with.
    data_kind : str
        ``image`` or ``table`` (the champion's data).
    columns : list of dict, optional
        A table champion's column schema (``name``, ``type``): each queued item keeps its
        raw row by these names.
    preprocessing : callable, optional (required for a table)
        ``model_version -> spec``: the signed preprocessing of the verified model version
        that answered a row, or None when that version no longer verifies. The telemetry
        store is not signed, so a raw row is kept only when that version's preprocessing
        turns it into exactly the features the service logged (the same digest): a raw row
        edited in the store, which a retraining would append to the champion's table, is
        left out, counted.

    Returns the queue and ``{"digest_mismatch": n, "other_shape": m, "no_raw_row": k,
    "raw_row_mismatch": j, "unverified_version": i}``: rows whose bytes do not hash to their
    logged digest, rows of another input shape than the first row's, and (tables) rows
    without a raw row of the champion's columns, rows whose raw row does not prepare to
    their features, and rows of a version whose package no longer verifies.
    """
    table = data_kind == "table"
    if table and not columns:
        raise InvalidInput("a table model's review queue needs the champion's columns")
    if table and preprocessing is None:
        raise InvalidInput("a table model's review queue needs each version's signed preprocessing")
    schema = [{"name": str(c["name"]), "type": str(c["type"])} for c in columns or []]
    kept: list[tuple[dict[str, Any], np.ndarray]] = []
    skipped = {"digest_mismatch": 0, "other_shape": 0,
               **({"no_raw_row": 0, "raw_row_mismatch": 0, "unverified_version": 0} if table else {})}
    shape: list[int] | None = None
    for r in rows:
        row_shape = [int(d) for d in json.loads(r["shape"])]
        x = np.frombuffer(r["data"], dtype=np.float32)
        if x.size != math.prod(row_shape) or row_digest(x) != r["input_sha256"]:
            skipped["digest_mismatch"] += 1
            continue
        if shape is None:
            shape = row_shape
        if row_shape != shape:
            skipped["other_shape"] += 1
            continue
        if table:
            raw = raw_row(r.get("raw_row"), schema)
            if raw is None:
                skipped["no_raw_row"] += 1
                continue
            spec = preprocessing(str(r["model_version"]))
            if spec is None:
                skipped["unverified_version"] += 1
                continue
            if not _prepares_to(raw, spec, r["input_sha256"]):
                skipped["raw_row_mismatch"] += 1
                continue
            r = {**r, "row": raw}
        kept.append((r, x.reshape(row_shape)))
    shape = shape or []
    X = np.stack([x for _, x in kept]) if kept else np.zeros((0, *shape), dtype=np.float32)
    name, folder = _new_folder(ws)
    np.savez(folder / INPUTS_FILE, X=X, predictions=np.array([int(r["prediction"]) for r, _ in kept], dtype=np.int64))
    _, inputs_sha256 = read_file(folder / INPUTS_FILE)
    payload = {"schema": QUEUE_SCHEMA, "queue": name, "model": model, "reason": reason,
               "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "classes": list(classes),
               "input_shape": shape, "data_kind": data_kind, **({"columns": schema} if table else {}),
               "inputs": {"file": INPUTS_FILE, "sha256": inputs_sha256, "rows": len(kept)},
               "items": [{"input_sha256": r["input_sha256"], "client": r["client"], "time": float(r["time"]),
                          "model_version": str(r["model_version"]), "prediction": int(r["prediction"]),
                          "detector_score": float(r["detector_score"]), **({"row": r["row"]} if table else {})}
                         for r, _ in kept]}
    write_json(folder / QUEUE_FILE, sign_document(payload))
    digest = hashlib.sha256(canonical_json(payload)).hexdigest()
    Ledger(ws.ledger_path).append("review.queue", {"queue": name, "model": model, "queue_sha256": digest,
                                                   "inputs_sha256": inputs_sha256, "items": len(kept), **skipped})
    return ReviewQueue(name, folder, payload, digest, X), skipped


def _prepares_to(raw: dict[str, Any], spec: dict[str, Any], digest: str) -> bool:
    """Whether the signed preprocessing ``spec`` turns the raw row into the features whose
    digest the service logged (the path serving takes: ``table_request``)."""
    try:
        X, _ = table_request([raw], spec=spec, max_batch=1)
    except InvalidInput:
        return False
    return row_digest(X[0]) == digest


def raw_row(text: Any, columns: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A logged raw row (JSON text) as ``{column name: value}`` in the order of ``columns``,
    or None when it is absent, not JSON, or not exactly those columns with a finite number
    or null (numeric) or text or null (categorical) in each."""
    try:
        row = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    if not isinstance(row, dict) or set(row) != {c["name"] for c in columns}:
        return None
    for c in columns:
        v = row[c["name"]]
        ok = v is None or (isinstance(v, str) if c["type"] == "categorical" else
                           isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        if not ok:
            return None
    return {c["name"]: row[c["name"]] for c in columns}


def load_queue(ws: Workspace, name: str, *, where: str, ledger_entries: list[dict[str, Any]] | None = None) -> ReviewQueue:
    """Queue ``name`` read through its signature, its file digest, each row's digest and the
    ledger entry that recorded it.

    ``InvalidInput`` (exit 2) for an unknown queue; ``IntegrityError`` (exit 4, recorded as an
    ``integrity.violation``) for anything that differs from what was signed and recorded.
    ``ledger_entries``: the ledger's entries when the caller already read them.
    """
    entries = Ledger(ws.ledger_path).entries() if ledger_entries is None else ledger_entries
    folder = queue_folder(ws, name, where=where, ledger_entries=entries)
    qpath = folder / QUEUE_FILE
    try:
        raw, _ = read_file(qpath)
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise violation(ws, file=qpath, reason="not valid JSON", where=where) from None
    try:
        payload = verify_document(doc)
    except IntegrityError as err:
        raise violation(ws, file=qpath, reason=f"{err} (a queue is signed with the pipeline's key when written)",
                        where=where) from None
    if payload.get("schema") != QUEUE_SCHEMA or payload.get("queue") != name:
        raise violation(ws, file=qpath, reason=f"a signed queue of schema {payload.get('schema')!r} named "
                        f"{payload.get('queue')!r}, not queue {name!r}", where=where)
    digest = hashlib.sha256(canonical_json(payload)).hexdigest()
    recorded = _recorded(entries, name)
    if not recorded or recorded[-1]["payload"].get("queue_sha256") != digest:
        raise violation(ws, file=qpath, reason="the ledger records " + (
            f"queue digest {str(recorded[-1]['payload'].get('queue_sha256'))[:16]}..., this file's is {digest[:16]}..."
            if recorded else "no such queue"), where=where)
    ipath = folder / payload["inputs"]["file"]
    try:
        data, inputs_sha256 = read_file(ipath)
    except FileNotFoundError:
        raise violation(ws, file=ipath, reason="missing", where=where) from None
    if inputs_sha256 != payload["inputs"]["sha256"]:
        raise violation(ws, file=ipath, reason=f"SHA-256 {inputs_sha256[:16]}..., the signed queue says "
                        f"{payload['inputs']['sha256'][:16]}...", where=where)
    try:
        X = np.ascontiguousarray(load_npz_bytes(data)["X"], dtype=np.float32)
    except (KeyError, ValueError, OSError) as err:
        raise violation(ws, file=ipath, reason=f"unreadable ({err})", where=where) from None
    items = payload["items"]
    if len(X) != len(items) or list(X.shape[1:]) != list(payload["input_shape"]):
        raise violation(ws, file=ipath, reason=f"holds {len(X)} rows of shape {list(X.shape[1:])}, the signed queue "
                        f"{len(items)} of shape {payload['input_shape']}", where=where)
    for i, item in enumerate(items):
        if row_digest(X[i]) != item["input_sha256"]:
            raise violation(ws, file=ipath, reason=f"row {i} does not hash to its input_sha256 "
                            f"{item['input_sha256'][:16]}...", where=where)
        if payload.get("data_kind") == "table" and raw_row(json.dumps(item.get("row")), payload.get("columns") or []) is None:
            raise violation(ws, file=qpath, reason=f"item {i} holds no raw row of the queue's columns", where=where)
    return ReviewQueue(name, folder, payload, digest, X)


def queue_path(ws: Workspace, queue: ReviewQueue) -> str:
    """The queue's folder relative to the workspace (what results and the ledger show)."""
    return str(queue.folder.relative_to(ws.root)) if queue.folder.is_relative_to(ws.root) else os.fspath(queue.folder)
