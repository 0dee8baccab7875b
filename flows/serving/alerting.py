"""Where an alert goes: a ledger entry (the record), a telemetry row (the status page), a
Prefect event (what automations and playbooks listen to) and a Prometheus counter.

The ledger append happens before the call returns; the event is sent from a background
thread, since sending must never hold up a prediction and never fails one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from stages.core import events
from stages.core.workspace import Workspace
from stages.monitoring.alerts import Alert
from stages.monitoring.store import TelemetryStore
from stages.trust.ledger import Ledger


def event_for(model: str, version: str | None, alert: Alert) -> list[tuple[str, dict[str, Any]]]:
    """The catalogued events (``stages.core.events``) one alert sends."""
    p = alert.payload
    base = {"model": model, "version": version}
    if alert.kind == "drift":
        out = [(events.MONITOR_DRIFT, {**base, "statistic": p["statistic"], "value": p["value"], "threshold": p["threshold"],
                                       "window": p.get("window"), "features": p.get("features")})]
        if p.get("retrain"):
            out.append((events.RETRAIN_REQUESTED, {"model": model, "reason": alert.message, "alert": events.MONITOR_DRIFT}))
        return out
    if alert.kind == "evasion":
        return [(events.MONITOR_ATTACK, {**base, "detector": "input", "score": p["detector_rate"],
                                         "threshold": p["threshold"], "window": p["window"]})]
    if alert.kind == "extraction":
        return [(events.MONITOR_ATTACK, {**base, "detector": "extraction", "score": p["score"], "threshold": p["threshold"],
                                         "client": p["client"]})]
    if alert.kind == "low_confidence":
        return [(events.MONITOR_DEGRADED, {**base, "statistic": "low_confidence_rate", "value": p["low_confidence_rate"],
                                           "threshold": p["threshold"], "window": p["window"]})]
    if alert.kind in ("alias_drift", "reload_refused", "revoked"):
        return [(events.SERVING_REFUSED, {"model": model, "version": p.get("version"), "served_version": p.get("served_version"),
                                          "reason": alert.message})]
    if alert.kind == "telemetry":
        return [(events.SERVING_TELEMETRY, {"model": model, "healthy": bool(p.get("healthy")), "error": p.get("error")})]
    return []


class AlertSink:
    def __init__(self, ws: Workspace, model: str, store: TelemetryStore | None,
                 count: Callable[[str], None] | None = None):
        self.ledger = Ledger(ws.ledger_path)
        self.model = model
        self.store = store
        self.count = count
        self.recent: list[dict[str, Any]] = []       # for the status page when telemetry is off
        self._lock = threading.Lock()

    def __call__(self, alert: Alert, version: str | None) -> None:
        record = {"model": self.model, "version": version, **alert.to_dict()}
        self.ledger.append(f"serving.alert.{alert.kind}", record)
        with self._lock:
            self.recent = ([record] + self.recent)[:100]
        if self.store is not None:
            self.store.submit("alerts", [{"time": alert.time, "kind": alert.kind, "severity": alert.severity,
                                          "message": alert.message, "payload": json.dumps(alert.payload, default=str)}])
        if self.count is not None:
            self.count(alert.kind)
        sends = event_for(self.model, version, alert)
        if sends:
            threading.Thread(target=self._send, args=(sends,), name="alert-events", daemon=True).start()

    @staticmethod
    def _send(sends: list[tuple[str, dict[str, Any]]]) -> None:
        for name, payload in sends:
            try:
                events.emit(name, payload)
            except Exception:  # noqa: BLE001 - events are notifications; the ledger already holds the alert
                pass
