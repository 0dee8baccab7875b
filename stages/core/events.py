"""The Prefect events the project emits and listens to: names, resources and payloads, in
one place (``docs/events.md`` says the same for users; a test keeps the two in step).

Every event concerns one registered model: its resource is ``mlsec.model.<model>`` (with
``prefect.resource.name`` the model name), so an automation can listen to one project's
events only. Payloads are flat JSON objects; :func:`check_payload` refuses an unknown event
name, a missing required key or a key the catalogue does not list, so emitters and
listeners cannot drift apart silently.

Events are notifications, not records: the hash-chained ledger is the record. Emitting
never fails a run; with no Prefect API configured (no ``PREFECT_API_URL`` and no flow run
with its temporary server) nothing is sent and :func:`emit` returns ``None``.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from stages.core.errors import InvalidInput

DATA_INGESTED = "mlsec.data.ingested"
DATA_CHANGED = "mlsec.data.changed"
RUN_FINISHED = "mlsec.run.finished"
ALIAS_MOVED = "mlsec.model.alias-moved"
MONITOR_DRIFT = "mlsec.monitor.drift"
MONITOR_ATTACK = "mlsec.monitor.attack-suspected"
RETRAIN_REQUESTED = "mlsec.retrain.requested"
MONITOR_DEGRADED = "mlsec.monitor.degraded"
SERVING_REFUSED = "mlsec.serving.refused"
SERVING_TELEMETRY = "mlsec.serving.telemetry"

RESOURCE_PREFIX = "mlsec.model."


@dataclass(frozen=True)
class EventSpec:
    """One event of the catalogue: who emits it, who listens, and its payload keys."""

    name: str
    emitted_by: str
    listened_by: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    description: str = ""


CATALOGUE: dict[str, EventSpec] = {spec.name: spec for spec in (
    EventSpec(DATA_INGESTED, "the secure-training flow, after ingest", "dashboards; nothing starts a run on it",
              ("model", "run_id", "source", "data_sha256", "rows"), ("dvc_md5",),
              "A run ingested a source: data_sha256 is the Merkle root of the prepared files (the signed manifest's)."),
    EventSpec(DATA_CHANGED, "the data-watch flow (mlsec schedule create --on-change)",
              "automation 'mlsec-retrain-on-data-change' (starts secure-training on the source)",
              ("model", "source", "source_sha256"), ("previous_sha256",),
              "The source's bytes differ from the last digest the watcher saw (previous_sha256 null on first sight). "
              "An unchanged source emits nothing."),
    EventSpec(RUN_FINISHED, "the secure-training flow, at its end (also on rejection or failure)", "dashboards, notifications",
              ("model", "run_id", "status"), ("data_sha256", "version", "error", "cached"),
              "status: promoted, rejected, failed, awaiting_approval, declined or unchanged (a weakened run that reproduced the champion); version is the registered version or null."),
    EventSpec(ALIAS_MOVED, "promotion, rollback and registration (every alias move the pipeline makes)",
              "the model server (reloads and verifies the new version)",
              ("model", "alias", "version", "previous"), ("actor", "approver", "reason", "run_id"),
              "version null means the alias was removed."),
    EventSpec(MONITOR_DRIFT, "the model server's monitor", "playbooks; automation 'mlsec-retrain-on-alert' when it requests retraining",
              ("model", "version", "statistic", "value", "threshold"), ("window", "features"),
              "Input drift of the served model past its threshold over a window of requests."),
    EventSpec(MONITOR_ATTACK, "the model server's monitor", "the evasion-response playbook",
              ("model", "version", "detector", "score", "threshold"), ("client", "window"),
              "An adversarial, out-of-distribution or extraction detector fired."),
    EventSpec(RETRAIN_REQUESTED, "the monitor, playbooks or an operator", "automation 'mlsec-retrain-on-alert' (starts secure-training)",
              ("model", "reason"), ("data", "alert", "alert_id"),
              "Retrain model through the full gate; data empty or absent means params.yaml's data.source."),
    EventSpec(MONITOR_DEGRADED, "the model server's monitor",
              "the degradation-response playbook (automation 'mlsec-degradation-response-<model>', mlsec playbook serve)",
              ("model", "version", "statistic", "value", "threshold"), ("window",),
              "The share of low-confidence predictions over a window of requests is past its threshold."),
    EventSpec(SERVING_REFUSED, "the model server", "operators (an integrity incident: see docs/playbooks.md)",
              ("model", "version", "reason"), ("served_version",),
              "The server refused to serve a version: the alias was moved outside the pipeline, or the version failed "
              "verification or was revoked; served_version keeps serving."),
    EventSpec(SERVING_TELEMETRY, "the model server", "operators",
              ("model", "healthy"), ("error",),
              "The telemetry store stopped accepting writes (healthy false; predictions are queued and retried) or recovered."),
)}


def _json_scalar(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_json_scalar(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_scalar(v) for k, v in value.items())
    return False


def check_payload(name: str, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` unchanged when it matches the catalogue entry for ``name``; else InvalidInput."""
    spec = CATALOGUE.get(name)
    if spec is None:
        raise InvalidInput(f"unknown event {name!r}; known: {sorted(CATALOGUE)}")
    missing = [k for k in spec.required if k not in payload]
    if missing:
        raise InvalidInput(f"event {name} lacks payload key(s) {missing}")
    unknown = sorted(set(payload) - set(spec.required) - set(spec.optional))
    if unknown:
        raise InvalidInput(f"event {name} has payload key(s) {unknown} the catalogue does not list")
    if not isinstance(payload["model"], str) or not payload["model"]:
        raise InvalidInput(f"event {name}: model must be a non-empty string, got {payload['model']!r}")
    bad = [k for k, v in payload.items() if not _json_scalar(v)]
    if bad:
        raise InvalidInput(f"event {name}: payload key(s) {bad} are not plain JSON values")
    return payload


def resource_for(model: str) -> dict[str, str]:
    """The Prefect resource every event about ``model`` concerns."""
    return {"prefect.resource.id": f"{RESOURCE_PREFIX}{model}", "prefect.resource.name": model}


def _api_configured() -> bool:
    """A Prefect API to send to: ``PREFECT_API_URL``, or the temporary server of a flow run in
    this process. (Prefect itself would start a temporary server just to send one event.)"""
    if os.environ.get("PREFECT_API_URL"):
        return True
    if "prefect.settings" not in sys.modules:
        return False
    from prefect.settings import get_current_settings  # already imported: free

    return bool(get_current_settings().api.url)


def emit(name: str, payload: dict[str, Any], *, related: list[dict[str, str]] | None = None) -> Any:
    """Send ``name`` with ``payload`` to the configured Prefect API; the Event, or None when
    no API is configured or sending failed (events never fail a run; the ledger is the record)."""
    check_payload(name, payload)
    if not _api_configured():
        return None
    from prefect.events import (
        emit_event,  # Prefect: slow to import, only where an event is sent
    )

    return emit_event(event=name, resource=resource_for(payload["model"]), payload=dict(payload), related=related)


def flush(timeout: float = 10.0) -> None:
    """Wait (at most ``timeout`` s) until events emitted outside a flow run are sent; a
    short-lived command calls this before it exits."""
    if "prefect.events.worker" not in sys.modules:
        return  # nothing was ever queued
    from prefect.events.worker import (
        EventsWorker,  # Prefect: slow to import, only where an event is sent
    )

    EventsWorker.drain_all(timeout=timeout)
