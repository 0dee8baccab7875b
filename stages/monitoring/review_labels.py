"""Reviewers' labels on a review queue, signed by each reviewer's identity key.

A labelling is one signed document (``stages.trust.signing``) in the queue's ``labels/``,
signed with the reviewer's identity key (``mlsec keys create --identity NAME``; the same
keys that sign approvals, ``stages.trust.identities``) of a reviewer the signed policy names
with that key (``promotion.reviewers``, ``stages.monitoring.reviewers``)::

    {"schema": "mlsec.review-labels/v1", "queue": "20240501T120000Z",
     "queue_sha256": "...", "identity": "alice", "reason": "checked by eye",
     "labelled_at": "2024-05-01T12:30:00Z",
     "labels": [{"input_sha256": "...", "decision": "label", "label": 7, "position": 7},
                {"input_sha256": "...", "decision": "discard", "label": null, "position": null}]}

``label`` is a class of the queue's signed class list (the champion's); ``discard`` marks an
item as not an attack, never trained on. Each labelling is also a ``review.label`` ledger
entry carrying the document's SHA-256 and the reviewer's public key, so
:func:`label_history` refuses (``IntegrityError``) a label file that was edited, deleted,
added or swapped afterwards. A later labelling of the same item replaces the earlier one;
both stay in the ledger.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.canonical import canonical_json
from stages.core.errors import IntegrityError, InvalidInput
from stages.core.workspace import Workspace
from stages.data.labels import canonical_class, shown
from stages.monitoring.review import LABELS_DIR, ReviewQueue, load_queue, violation
from stages.monitoring.reviewers import authorise_labelling
from stages.trust.hashing import read_file
from stages.trust.identities import check_identity_name, identity_signer, public_key_from_pem
from stages.trust.ledger import Ledger
from stages.trust.signing import sign_document, verify_document

LABELS_SCHEMA = "mlsec.review-labels/v1"
DISCARD = "discard"        # the label text that marks an item as not an attack (null in JSON)
MIN_PREFIX = 8             # hex digits of an input digest a reviewer may give instead of all 64
MAX_LABEL_FILE = 8 * 1024 * 1024   # bytes


@dataclass(frozen=True)
class Decision:
    """A reviewer's final word on one item (the latest labelling of it)."""

    input_sha256: str
    decision: str          # "label" or "discard"
    label: Any             # the class name, None for a discard
    position: int | None   # the class's position in the queue's class list
    identity: str
    labelled_at: str
    document_sha256: str
    key_id: str            # the key that signed the document (the ledger's record)


@dataclass(frozen=True)
class Review:
    """A verified queue with its verified labellings and each item's final decision."""

    queue: ReviewQueue
    history: list[dict[str, Any]]       # label documents' payloads, in ledger order
    final: dict[str, Decision]          # input digest -> latest decision
    entries: list[dict[str, Any]]       # the (verified) ledger's entries


def open_review(ws: Workspace, name: str, *, where: str, entries: list[dict[str, Any]] | None = None) -> Review:
    """Queue ``name`` and its labels, each checked against its signature and the ledger.

    ``entries``: the ledger's entries, already read through :func:`verified_entries`
    (default: read and checked here). ``InvalidInput`` for an unknown queue;
    ``IntegrityError`` for anything changed since it was signed and recorded.
    """
    entries = verified_entries(ws) if entries is None else entries
    queue = load_queue(ws, name, where=where, ledger_entries=entries)
    history = label_history(ws, queue, entries, where=where)
    return Review(queue, history, decisions(history), entries)


def verified_entries(ws: Workspace) -> list[dict[str, Any]]:
    """The ledger's entries, after checking its chain and signed head (review records are
    read from it: a rewritten ledger could vouch for changed labels)."""
    ledger = Ledger(ws.ledger_path)
    ledger.require_intact()
    return ledger.entries()


# ---------------------------------------------------------------- what a reviewer gives
def read_label_file(path: str) -> list[tuple[str, Any]]:
    """``(digest or prefix, label)`` pairs from a CSV or JSON label file.

    CSV: rows ``input_sha256,label`` (a header row with those names is optional). JSON: an
    object ``{digest: label}`` or a list of ``{"input_sha256": ..., "label": ...}``. A label
    of ``discard`` (or JSON ``null``) marks the item as not an attack. ``InvalidInput`` for
    a missing, unreadable or empty file.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidInput(f"label file not found: {path}")
    if p.stat().st_size > MAX_LABEL_FILE:
        raise InvalidInput(f"label file {path} is {p.stat().st_size} bytes, more than the limit of {MAX_LABEL_FILE}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidInput(f"label file {path} is not UTF-8 text") from None
    pairs = _json_pairs(text, path) if p.suffix.lower() == ".json" else _csv_pairs(text, path)
    if not pairs:
        raise InvalidInput(f"label file {path} holds no labels")
    return pairs


def _json_pairs(text: str, path: str) -> list[tuple[str, Any]]:
    try:
        doc = json.loads(text) if text.strip() else {}
    except ValueError as err:
        raise InvalidInput(f"label file {path} is not JSON: {err}") from None
    if isinstance(doc, dict):
        return [(str(k), v) for k, v in doc.items()]
    if isinstance(doc, list) and all(isinstance(e, dict) and "input_sha256" in e and "label" in e for e in doc):
        return [(str(e["input_sha256"]), e["label"]) for e in doc]
    raise InvalidInput(f"label file {path}: expected {{digest: label}} or a list of {{input_sha256, label}}")


def _csv_pairs(text: str, path: str) -> list[tuple[str, Any]]:
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r) and not r[0].startswith("#")]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["input_sha256", "label"]:
        rows = rows[1:]
    bad = [i + 1 for i, r in enumerate(rows) if len(r) != 2]
    if bad:
        raise InvalidInput(f"label file {path}: expected two columns (input_sha256,label), rows {shown(bad)} differ")
    return [(r[0].strip(), r[1].strip()) for r in rows]


def resolve_labels(queue: ReviewQueue, pairs: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """The reviewer's pairs checked against the queue: each digest (or a unique prefix of at
    least 8 hex digits) names one item, each label a class of the queue's signed class list
    (by name; by position 0..K-1 too where the class names are text) or a discard.

    Returns ``[{"input_sha256", "decision", "label", "position"}]``; ``InvalidInput`` names
    the first unknown digest, repeated item or label outside the classes.
    """
    digests = [item["input_sha256"] for item in queue.items]
    out: dict[str, dict[str, Any]] = {}
    for given, label in pairs:
        digest = _item_digest(digests, given, queue.name)
        if digest in out:
            raise InvalidInput(f"item {digest[:16]}... of queue {queue.name} is labelled twice in one labelling")
        out[digest] = {"input_sha256": digest, **_class_of(label, queue.classes)}
    return list(out.values())


def _item_digest(digests: list[str], given: str, queue: str) -> str:
    text = str(given).strip().lower()
    if len(text) < MIN_PREFIX or any(c not in "0123456789abcdef" for c in text) or len(text) > 64:
        raise InvalidInput(f"{given!r} is not an input digest (SHA-256 hex, at least {MIN_PREFIX} digits)")
    hits = [d for d in digests if d.startswith(text)]
    if not hits:
        raise InvalidInput(f"queue {queue} holds no item with input digest {text[:16]}{'...' if len(text) > 16 else ''}")
    if len(hits) > 1:
        raise InvalidInput(f"input digest prefix {text} names {len(hits)} items of queue {queue}: give more digits")
    return hits[0]


def _class_of(label: Any, classes: list[Any]) -> dict[str, Any]:
    """``{"decision", "label", "position"}`` of a label given by a reviewer."""
    names = [str(c) for c in classes]
    if label is None or (isinstance(label, str) and label.strip() == DISCARD):
        if label is not None and DISCARD in names:
            raise InvalidInput(f"'{DISCARD}' is one of the classes: mark an item as not an attack with --discard or "
                               "null in a JSON label file")
        return {"decision": "discard", "label": None, "position": None}
    try:
        name = canonical_class(label)
    except ValueError:
        name = None
    if name is not None and str(name) in names:
        position = names.index(str(name))
        return {"decision": "label", "label": classes[position], "position": position}
    text_classes = all(isinstance(c, str) for c in classes)
    if text_classes and isinstance(name, int) and not isinstance(label, bool) and 0 <= name < len(classes):
        return {"decision": "label", "label": classes[name], "position": name}
    listed = ", ".join(map(repr, classes)) if len(classes) <= 20 else shown(classes)
    raise InvalidInput(f"label {label!r} is not one of the champion's classes {listed}"
                       + (f" (or a position 0..{len(classes) - 1})" if text_classes else "")
                       + f", nor '{DISCARD}'")


# ---------------------------------------------------------------- signing and recording
def record_labels(ws: Workspace, queue: ReviewQueue, labels: list[dict[str, Any]], *, identity: str,
                  reason: str) -> dict[str, Any]:
    """Sign ``labels`` (from :func:`resolve_labels`) with ``identity``'s key, store the
    document in the queue's ``labels/`` and record it in the ledger (``review.label``).

    ``InvalidInput`` (nothing written) when this machine holds no key for ``identity`` or
    there is nothing to record; ``GateRejected`` (nothing written but a
    ``review.label.refused`` ledger entry) when the signed policy does not let ``identity``
    label with that key (``stages.monitoring.reviewers``).
    """
    check_identity_name(identity)
    if not labels:
        raise InvalidInput(f"no labels given for queue {queue.name}")
    signer = identity_signer(identity)          # InvalidInput: no identity key on this machine
    authorise_labelling(ws, queue=queue.name, identity=identity, key_id=signer.key_id)
    payload = {"schema": LABELS_SCHEMA, "queue": queue.name, "queue_sha256": queue.sha256, "identity": identity,
               "reason": (reason or "").strip(), "labelled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "labels": labels}
    doc = sign_document(payload, signer=signer)
    digest = hashlib.sha256(canonical_json(payload)).hexdigest()
    folder = queue.folder / LABELS_DIR
    folder.mkdir(exist_ok=True)
    name = f"{payload['labelled_at'].replace(':', '').replace('-', '')}-{identity}-{secrets.token_hex(3)}.json"
    tmp = folder / f".{name}.tmp"
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    try:
        entry = Ledger(ws.ledger_path).append("review.label", {
            "queue": queue.name, "queue_sha256": queue.sha256, "identity": identity, "key_id": signer.key_id,
            "public_key": signer.public_pem, "file": name, "document_sha256": digest, "reason": payload["reason"],
            "labels": [{"input_sha256": lab["input_sha256"], "decision": lab["decision"], "label": lab["label"]}
                       for lab in labels]})
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, folder / name)
    counts = {d: sum(lab["decision"] == d for lab in labels) for d in ("label", "discard")}
    return {"queue": queue.name, "identity": identity, "key_id": signer.key_id, "file": name, "document_sha256": digest,
            "labelled": counts["label"], "discarded": counts["discard"], "ledger_seq": entry["seq"]}


def label_history(ws: Workspace, queue: ReviewQueue, entries: list[dict[str, Any]], *, where: str) -> list[dict[str, Any]]:
    """The queue's verified label documents' payloads, in ledger order.

    Every file in ``labels/`` must be named by exactly one ``review.label`` ledger entry of
    this queue and every entry's file must be there; each document must be signed by the key
    the ledger pinned for its reviewer, hash to the recorded digest, name this queue and its
    digest, and hold only items and classes of the queue. Anything else raises
    ``IntegrityError`` (recorded as an ``integrity.violation``).
    """
    folder = queue.folder / LABELS_DIR
    recorded = [e for e in entries if e.get("event") == "review.label" and e["payload"].get("queue") == queue.name]
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    named = [e["payload"].get("file") for e in recorded]
    extra = sorted(set(files) - set(named))
    if extra:
        raise violation(ws, file=folder / extra[0], reason="a label file no review.label ledger entry records", where=where)
    digests = {item["input_sha256"] for item in queue.items}
    history = []
    for entry in recorded:
        rec = entry["payload"]
        path = folder / str(rec.get("file"))
        if not path.is_file():
            raise violation(ws, file=path, reason=f"missing; the ledger records it at seq {entry['seq']}", where=where)
        try:
            doc = json.loads(read_file(path)[0])
            key = public_key_from_pem(str(rec.get("public_key")), what=f"the key of reviewer {rec.get('identity')!r}")
            payload = verify_document(doc, keys={str(rec.get("key_id")): key})
        except (ValueError, UnicodeDecodeError, IntegrityError) as err:
            raise violation(ws, file=path, reason=f"{err}; it is not the label document {rec.get('identity')!r} signed "
                            f"(ledger seq {entry['seq']})", where=where) from None
        problem = _label_problem(payload, rec, queue, digests)
        if problem:
            raise violation(ws, file=path, reason=problem, where=where)
        history.append({**payload, "document_sha256": rec["document_sha256"], "ledger_seq": entry["seq"],
                        "key_id": str(rec.get("key_id"))})
    return history


def _label_problem(payload: dict[str, Any], rec: dict[str, Any], queue: ReviewQueue, digests: set[str]) -> str | None:
    if hashlib.sha256(canonical_json(payload)).hexdigest() != rec.get("document_sha256"):
        return "its SHA-256 differs from the one the ledger records"
    if payload.get("schema") != LABELS_SCHEMA or payload.get("identity") != rec.get("identity"):
        return f"schema {payload.get('schema')!r} by {payload.get('identity')!r}, the ledger records {rec.get('identity')!r}"
    if payload.get("queue") != queue.name or payload.get("queue_sha256") != queue.sha256:
        return f"labels for queue {payload.get('queue')!r} ({str(payload.get('queue_sha256'))[:16]}...), not this queue"
    labels = payload.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(lab, dict) for lab in labels):
        return "its labels are not a list of items"
    for lab in labels:
        if lab.get("input_sha256") not in digests:
            return f"labels item {str(lab.get('input_sha256'))[:16]}..., which the queue does not hold"
        if lab.get("decision") == "discard":
            ok = lab.get("label") is None and lab.get("position") is None
        elif lab.get("decision") == "label":
            try:
                want = _class_of(lab.get("label"), queue.classes)
            except InvalidInput:
                want = None
            ok = want is not None and want["decision"] == "label" and want["position"] == lab.get("position")
        else:
            ok = False
        if not ok:
            return f"label {lab.get('label')!r} of item {lab['input_sha256'][:16]}... is not a class of the queue"
    return None


def decisions(history: list[dict[str, Any]]) -> dict[str, Decision]:
    """Each labelled item's latest decision (later labellings replace earlier ones)."""
    out: dict[str, Decision] = {}
    for doc in history:
        for lab in doc["labels"]:
            out[lab["input_sha256"]] = Decision(lab["input_sha256"], lab["decision"], lab["label"], lab["position"],
                                                doc["identity"], doc["labelled_at"], doc["document_sha256"], doc["key_id"])
    return out


def training_rows(queue: ReviewQueue, final: dict[str, Decision]) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """The labelled, non-discarded items as training rows: ``(X, y, items)``.

    ``X`` (M, *input_shape) float32, ``y`` (M,) int64 class positions from the reviewers'
    labels (never the model's prediction); ``items`` names each row's input digest, label
    and reviewer, in queue order, and for a table queue holds its raw ``row`` by column name
    (what a retraining appends to the champion's table).
    """
    rows, y, items = [], [], []
    for i, item in enumerate(queue.items):
        d = final.get(item["input_sha256"])
        if d is None or d.decision != "label":
            continue
        rows.append(i)
        y.append(d.position)
        items.append({"input_sha256": d.input_sha256, "label": d.label, "position": d.position,
                      "labelled_by": d.identity, "labelled_key_id": d.key_id, "label_document_sha256": d.document_sha256,
                      "prediction": item["prediction"], **({"row": item["row"]} if "row" in item else {})})
    X = queue.X[rows] if rows else np.zeros((0, *queue.X.shape[1:]), dtype=np.float32)
    return X, np.asarray(y, dtype=np.int64), items


def queue_status(queue: ReviewQueue, final: dict[str, Decision], entries: list[dict[str, Any]],
                 not_counted: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Counts and state of a verified queue: items, labelled, discarded, pending, the runs
    its items entered (``review.train`` ledger entries) and a short status. ``not_counted``:
    the decisions the signed policy in force no longer accepts (by input digest,
    ``stages.monitoring.reviewers.decisions_not_counted``); a queue holding any needs
    relabelling before a retraining may use it."""
    n = len(queue.items)
    labelled = sum(d.decision == "label" for d in final.values())
    discarded = sum(d.decision == "discard" for d in final.values())
    stale = sorted({final[k].identity for k in (not_counted or {}) if k in final})
    runs = [{"run_id": e["run_id"], "items": len(e["payload"].get("items") or [])} for e in entries
            if e.get("event") == "review.train" and e["payload"].get("queue") == queue.name]
    status = ("empty" if n == 0 else "awaiting review" if not final else "needs relabelling" if stale else
              "in review" if labelled + discarded < n else "reviewed")
    return {"queue": queue.name, "model": queue.model, "created_at": queue.payload["created_at"],
            "reason": queue.payload["reason"], "items": n, "labelled": labelled, "discarded": discarded,
            "pending": n - labelled - discarded, "not_counted": sum(k in final for k in (not_counted or {})),
            "not_counted_labellers": stale, "status": status, "trained_in": runs}


def record_training(ws: Workspace, queue: ReviewQueue, items: list[dict[str, Any]], *, run_id: str, source: str,
                    source_sha256: str, policy_sha256: str | None) -> dict[str, Any]:
    """Record which labelled items enter run ``run_id`` (a ``review.train`` ledger entry
    under that run id, which ``mlsec lineage`` shows), and the signed policy under which
    their reviewers were allowed to label (``policy_sha256``); return its payload."""
    payload = {"queue": queue.name, "queue_sha256": queue.sha256, "source": source, "source_sha256": source_sha256,
               "reviewers_policy_sha256": policy_sha256, "items": items}
    Ledger(ws.ledger_path).append("review.train", payload, run_id=run_id)
    return payload
