"""Incident playbooks as Prefect flows; each step is a ledger entry (``flows.playbooks.steps``).

``evasion-response``: the inputs the detector flagged go to a review queue
(``serving/review/<id>/``: the inputs, their digests, clients and scores; reviewers may fill
in ``labels``); the perturbation size is estimated against the champion's verified training
rows; with ``retrain``, a run with adversarial training at that budget (and the labelled
review items added to the champion's verified data) goes through the normal gate.

``degradation-response``: roll ``champion`` back to the previous champion through the
pipeline (the server follows), then a signed report that tells drift from attack.

``poisoning-response``: given suspect sample digests (a quarantine list's ``sha256``) or a
trigger pattern, quarantine the matching rows in every dataset version the workspace holds
(each read through its signed manifest), retrain from the champion's verified data without
them (screened again, gated again) and promote the result through the normal gate.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from stages.core.telemetry import telemetry_off

telemetry_off()  # before Prefect reads its settings at import

from prefect import flow  # noqa: E402

from flows.playbooks.data import (  # noqa: E402
    champion_data,
    dataset_versions,
    find_suspects,
    load_trigger,
    read_digests,
    write_source,
)
from flows.playbooks.steps import Steps  # noqa: E402
from stages.core.errors import InvalidInput, PipelineError  # noqa: E402
from stages.core.params import load_params  # noqa: E402
from stages.core.workspace import Workspace, write_json  # noqa: E402
from stages.models.promotion import rollback  # noqa: E402
from stages.monitoring.diagnosis import diagnose  # noqa: E402
from stages.monitoring.store import TelemetryStore, default_url  # noqa: E402
from stages.data.prepared import row_digest as sample_digest  # noqa: E402
from stages.trust.signing import sign_document  # noqa: E402


def _store(ws: Workspace) -> TelemetryStore:
    t = load_params(ws.params_path).serving.telemetry
    return TelemetryStore(t.url or default_url(ws.root), queue_max=1, retention_s=t.retention_days * 86_400)


def _retrain(data: str | None, overrides: list[str], playbook: str) -> dict[str, Any]:
    from flows.pipeline import secure_training  # the flow module imports every stage: only for a retrain

    try:
        return secure_training(data=data, overrides=overrides, triggered_by=f"playbook:{playbook}")
    except PipelineError as err:
        return getattr(err, "summary", None) or {"status": "failed", "error": str(err)}


@flow(name="evasion-response")
def evasion_response(model: str, reason: str, since_hours: float = 24.0, retrain: bool = False,
                     overrides: list[str] | None = None) -> dict[str, Any]:
    """Review queue of flagged inputs; optional adversarial retraining through the gate."""
    ws = Workspace.from_env()
    steps = Steps(ws, "evasion-response", model, reason=reason, since_hours=since_hours, retrain=retrain)
    store = _store(ws)
    rows = store.flagged_inputs(since=time.time() - since_hours * 3600)
    store.engine.dispose()
    queue_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folder = ws.root / "serving" / "review" / queue_id
    X = np.stack([np.frombuffer(r["data"], dtype=np.float32) for r in rows]) if rows else np.zeros((0, 0), np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "inputs.npz", X=X, predictions=np.array([r["prediction"] for r in rows], dtype=np.int64))
    write_json(folder / "queue.json", {"queue": queue_id, "model": model, "reason": reason, "status": "awaiting review",
                                       "items": [{"input_sha256": r["input_sha256"], "client": r["client"], "time": r["time"],
                                                  "model_version": r["model_version"], "prediction": r["prediction"],
                                                  "detector_score": r["detector_score"], "label": None} for r in rows]})
    clients: dict[str, int] = {}
    for r in rows:
        clients[r["client"]] = clients.get(r["client"], 0) + 1
    result: dict[str, Any] = {"playbook": "evasion-response", "model": model,
                              "review_queue": steps.record("review-queue", {"path": str(folder.relative_to(ws.root)),
                                                                            "items": len(rows), "clients": clients})}
    data = champion_data(ws, model)
    params = load_params(ws.params_path, overrides or [])
    epsilon = params.train.adversarial.epsilon
    if len(X):
        flat_train = data.X.reshape(len(data.X), -1)
        dist = np.array([np.abs(flat_train - x).max(axis=1).min() for x in X[:, : flat_train.shape[1]]])
        epsilon = float(np.clip(np.median(dist), params.train.adversarial.epsilon, 0.3))
        result["perturbation"] = steps.record("perturbation", {"linf_to_nearest_training_row_median": round(float(np.median(dist)), 4),
                                                               "linf_p90": round(float(np.quantile(dist, 0.9)), 4),
                                                               "retrain_epsilon": round(epsilon, 4)})
    if retrain:
        extra = ["train.mode=adversarial", f"train.adversarial.epsilon={epsilon:.4f}"]
        source = write_source(ws, f"evasion-{queue_id}", data.X, data.y)
        result["retrain"] = _retrain(source, list(overrides or []) + extra, "evasion-response")
        steps.record("retrain", {k: result["retrain"].get(k) for k in ("run_id", "status", "model", "error")})
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
                               "label": int(version.y[i]), "reason": why} for i, why in hits]}
        write_json(qdir / f"{version.data_sha256[:16]}.json", sign_document(record))
        versions.append({"data_sha256": version.data_sha256, "run_id": version.run_id, "quarantined": len(hits)})
    result: dict[str, Any] = {"playbook": "poisoning-response", "model": model,
                              "quarantine": steps.record("quarantine", {"path": str(qdir.relative_to(ws.root)),
                                                                        "versions": versions})}
    data = champion_data(ws, model)
    hits = find_suspects(data.X, data.y, digests=digests, trigger=trigger)
    keep = np.setdiff1d(np.arange(len(data.y)), np.array([i for i, _ in hits], dtype=np.int64))
    source = write_source(ws, f"incident-{incident}", data.X[keep], data.y[keep])
    result["clean_data"] = steps.record("clean-data", {"source": source, "from_data_sha256": data.data_sha256,
                                                       "removed": len(hits), "kept": int(len(keep))})
    result["retrain"] = _retrain(source, list(overrides or []), "poisoning-response")
    steps.record("retrain", {k: result["retrain"].get(k) for k in ("run_id", "status", "model", "error")})
    return steps.finish(result)
