"""Incident playbooks as Prefect flows; each step is a ledger entry (``flows.playbooks.steps``).

``evasion-response``: the inputs the detector flagged go to a signed review queue
(``serving/review/<id>/``, ``stages.monitoring.review``) that reviewers label with their
identity keys (``mlsec review label``); the perturbation size is estimated against the
champion's verified training rows; with ``retrain``, a run with adversarial training at that
budget goes through the normal gate. With ``queue``, an existing queue is used instead of a
new one, and its labelled, non-discarded items (with the reviewers' labels) are added to the
champion's verified data (``flows.playbooks.review``).

``degradation-response``: roll ``champion`` back to the previous champion through the
pipeline (the server follows), then a signed report that tells drift from attack.

``poisoning-response``: given suspect sample digests (a quarantine list's ``sha256``) or a
trigger pattern, quarantine the matching rows in every dataset version the workspace holds
(each read through its signed manifest), retrain from the champion's verified data without
them (screened again, gated again) and promote the result through the normal gate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from stages.core.telemetry import telemetry_off

telemetry_off()  # before Prefect reads its settings at import

from prefect import flow  # noqa: E402

from flows.playbooks.data import (  # noqa: E402
    DatasetVersion,
    champion_data,
    dataset_versions,
    find_suspects,
    load_trigger,
    read_digests,
    write_source,
)
from flows.playbooks.review import (  # noqa: E402
    check_joinable,
    check_run_data,
    labelled_rows,
    perturbation_inputs,
    review_source,
)
from flows.playbooks.steps import Steps  # noqa: E402
from stages.core.errors import InvalidInput, PipelineError  # noqa: E402
from stages.core.params import load_params  # noqa: E402
from stages.core.workspace import Workspace, new_run_id, write_json  # noqa: E402
from stages.models.promotion import rollback  # noqa: E402
from stages.monitoring.diagnosis import diagnose  # noqa: E402
from stages.monitoring.review import queue_path, write_queue  # noqa: E402
from stages.monitoring.review_labels import Review, training_rows  # noqa: E402
from stages.monitoring.store import TelemetryStore, default_url  # noqa: E402
from stages.data.prepared import class_name  # noqa: E402
from stages.data.preprocessing import table_columns  # noqa: E402
from stages.data.prepared import row_digest as sample_digest  # noqa: E402
from stages.trust.signing import sign_document  # noqa: E402


def _store(ws: Workspace) -> TelemetryStore:
    t = load_params(ws.params_path).serving.telemetry
    return TelemetryStore(t.url or default_url(ws.root), queue_max=1, retention_s=t.retention_days * 86_400)


def _retrain(data: str | None, overrides: list[str], playbook: str, run_id: str | None = None) -> dict[str, Any]:
    from flows.pipeline import secure_training  # the flow module imports every stage: only for a retrain

    try:
        return secure_training(run_id=run_id, data=data, overrides=overrides, triggered_by=f"playbook:{playbook}")
    except PipelineError as err:
        summary = getattr(err, "summary", None) or {"run_id": run_id, "status": "failed", "error": str(err)}
        return {**summary, "exit_code": err.exit_code}


def _new_queue(ws: Workspace, model: str, reason: str, since_hours: float,
               data: DatasetVersion) -> tuple[Review, dict[str, Any]]:
    """A new signed queue of the inputs flagged in the window, and its ledger step record."""
    store = _store(ws)
    rows = store.flagged_inputs(since=time.time() - since_hours * 3600)
    store.engine.dispose()
    table = data.kind == "table"
    columns = table_columns(data.meta, data.X.shape[1]) if table else None   # raw rows kept by name
    queue, skipped = write_queue(ws, model=model, reason=reason, rows=rows, classes=data.classes, data_kind=data.kind,
                                 columns=columns, preprocessing=_version_preprocessing(model) if table else None)
    clients: dict[str, int] = {}
    for item in queue.items:
        clients[item["client"]] = clients.get(item["client"], 0) + 1
    return Review(queue, [], {}, []), {"path": queue_path(ws, queue), "queue": queue.name, "queue_sha256": queue.sha256,
                                       "items": len(queue.items), "clients": clients, **skipped}


def _version_preprocessing(model: str) -> Callable[[str], dict[str, Any] | None]:
    """``version -> the signed preprocessing of that verified version`` (None when it no
    longer verifies: revoked, or its package changed), each version loaded once."""
    from stages.models.verify import verified_preprocessing

    specs: dict[str, dict[str, Any] | None] = {}

    def spec(version: str) -> dict[str, Any] | None:
        if version not in specs:
            try:
                specs[version] = verified_preprocessing(f"models:/{model}/{version}")
            except PipelineError:
                specs[version] = None
        return specs[version]

    return spec


@flow(name="evasion-response")
def evasion_response(model: str, reason: str, since_hours: float = 24.0, retrain: bool = False,
                     overrides: list[str] | None = None, queue: str | None = None) -> dict[str, Any]:
    """Review queue of flagged inputs (or an existing, labelled one); optional adversarial
    retraining, with the reviewers' labelled items, through the gate."""
    ws = Workspace.from_env()
    steps = Steps(ws, "evasion-response", model, reason=reason, since_hours=since_hours, retrain=retrain, queue=queue)
    data = champion_data(ws, model)
    if queue:
        review, X_add, y_add, items = labelled_rows(ws, queue, model=model, data=data, where="evasion-response")
        record = {"path": queue_path(ws, review.queue), "queue": queue, "queue_sha256": review.queue.sha256,
                  "items": len(review.queue.items), "labelled": len(items), "existing": True}
    else:
        review, record = _new_queue(ws, model, reason, since_hours, data)
        X_add, y_add, items = training_rows(review.queue, review.final)
    result: dict[str, Any] = {"playbook": "evasion-response", "model": model,
                              "review_queue": steps.record("review-queue", record)}
    params = load_params(ws.params_path, overrides or [])
    epsilon = params.train.adversarial.epsilon
    X_train, X = perturbation_inputs(data, review.queue, X_add, items)   # the confirmed attacks when labelled
    if len(X):
        flat_train = X_train.reshape(len(X_train), -1)
        flat = X.reshape(len(X), -1)[:, : flat_train.shape[1]]
        dist = np.array([np.abs(flat_train - x).max(axis=1).min() for x in flat])
        epsilon = float(np.clip(np.median(dist), params.train.adversarial.epsilon, 0.3))
        result["perturbation"] = steps.record("perturbation", {"linf_to_nearest_training_row_median": round(float(np.median(dist)), 4),
                                                               "linf_p90": round(float(np.quantile(dist, 0.9)), 4),
                                                               "measured_on": "labelled items" if len(X_add) else "queued items",
                                                               "retrain_epsilon": round(epsilon, 4)})
    if retrain:
        extra = ["train.mode=adversarial", f"train.adversarial.epsilon={epsilon:.4f}"]
        run_id = new_run_id()
        if items:
            check_joinable(review, data)
        source, class_overrides, added = review_source(ws, review, data, X_add, y_add, items, run_id=run_id,
                                                       declared=params.data.classes, label_column=params.data.label_column)
        result["review_items"] = steps.record("review-items", added)
        result["retrain"] = _retrain(source, list(overrides or []) + extra + class_overrides, "evasion-response", run_id)
        steps.record("retrain", {k: result["retrain"].get(k) for k in ("run_id", "status", "model", "error")})
        if items:   # the run's verified data must hold the review rows as labelled (exit 4 otherwise)
            result["review_items"]["run_data"] = steps.record("review-rows-in-run", check_run_data(ws, run_id, items))
    return steps.finish(result)


@flow(name="degradation-response")
def degradation_response(model: str, reason: str, since_hours: float = 1.0) -> dict[str, Any]:
    """Roll back to the previous champion, then report whether drift or an attack explains it."""
    ws = Workspace.from_env()
    steps = Steps(ws, "degradation-response", model, reason=reason, since_hours=since_hours)
    result: dict[str, Any] = {"playbook": "degradation-response", "model": model}
    try:
        result["rollback"] = steps.record("rollback", rollback(ws, model, reason=f"degradation-response: {reason}"))
    except PipelineError as err:
        result["rollback"] = steps.record("rollback", {"skipped": str(err)})
    sp = load_params(ws.params_path).serving
    store = _store(ws)
    since = time.time() - since_hours * 3600
    report = diagnose(store.predictions(since=since, limit=100_000), store.alerts(since=since, limit=10_000),
                      max_detector_rate=sp.alerts.max_detector_rate, low_confidence=sp.alerts.low_confidence)
    store.engine.dispose()
    path = ws.root / "serving" / "reports" / f"degradation-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    write_json(path, sign_document({"model": model, "reason": reason, "since": since, **report}))
    result["report"] = steps.record("report", {"path": str(path.relative_to(ws.root)), **report})
    return steps.finish(result)


@flow(name="poisoning-response")
def poisoning_response(model: str, reason: str, digests_file: str | None = None, trigger_file: str | None = None,
                       overrides: list[str] | None = None) -> dict[str, Any]:
    """Quarantine suspects in every dataset version, retrain from the verified clean data, re-gate, re-promote."""
    if not digests_file and not trigger_file:
        raise InvalidInput("poisoning-response needs suspect digests (--digests FILE) or a trigger (--trigger FILE.npz)")
    digests = read_digests(digests_file) if digests_file else set()
    trigger = load_trigger(trigger_file) if trigger_file else None
    ws = Workspace.from_env()
    steps = Steps(ws, "poisoning-response", model, reason=reason, digests=len(digests), trigger=bool(trigger))
    incident = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    qdir = ws.quarantine_dir / f"incident-{incident}"
    versions = []
    for version in dataset_versions(ws):
        hits = find_suspects(version.X, version.y, digests=digests, trigger=trigger)
        record = {"incident": incident, "reason": reason, "data_sha256": version.data_sha256, "run_id": version.run_id,
                  "source": version.source, "count": len(hits), "indices_refer_to": "rows of the input as given",
                  "samples": [{"index": int(i), "sha256": sample_digest(version.X, int(version.y[i]), int(i)),
                               "label": class_name(version.meta, int(version.y[i])), "label_index": int(version.y[i]),
                               "reason": why} for i, why in hits]}
        write_json(qdir / f"{version.data_sha256[:16]}.json", sign_document(record))
        versions.append({"data_sha256": version.data_sha256, "run_id": version.run_id, "quarantined": len(hits)})
    result: dict[str, Any] = {"playbook": "poisoning-response", "model": model,
                              "quarantine": steps.record("quarantine", {"path": str(qdir.relative_to(ws.root)),
                                                                        "versions": versions})}
    data = champion_data(ws, model)
    hits = find_suspects(data.X, data.y, digests=digests, trigger=trigger)
    keep = np.setdiff1d(np.arange(len(data.y)), np.array([i for i, _ in hits], dtype=np.int64))
    dp = load_params(ws.params_path, overrides or []).data
    source, class_overrides = write_source(ws, f"incident-{incident}", data, data.X[keep], data.y[keep],
                                           label_column=dp.label_column, declared=dp.classes)
    result["clean_data"] = steps.record("clean-data", {"source": source, "from_data_sha256": data.data_sha256,
                                                       "removed": len(hits), "kept": int(len(keep)),
                                                       "classes": list(data.classes)})
    result["retrain"] = _retrain(source, list(overrides or []) + class_overrides, "poisoning-response")
    steps.record("retrain", {k: result["retrain"].get(k) for k in ("run_id", "status", "model", "error")})
    return steps.finish(result)
