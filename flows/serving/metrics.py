"""Prometheus metrics of the service, in a registry of its own (``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from stages.monitoring.drift import DriftResult


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mlsec_requests", "Prediction requests by outcome", ["outcome"], registry=r)
        self.rows = Counter("mlsec_predicted_rows", "Rows predicted", registry=r)
        self.flagged = Counter("mlsec_flagged_rows", "Rows the input detector flagged", registry=r)
        self.latency = Histogram("mlsec_request_seconds", "Prediction request latency (service side)", registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.alerts = Counter("mlsec_alerts", "Alerts raised by kind", ["kind"], registry=r)
        self.version = Gauge("mlsec_served_version", "Registered version being served", registry=r)
        self.drift_z = Gauge("mlsec_drift_max_mean_z", "Largest feature mean shift of the last drift window (standard errors)",
                             registry=r)
        self.drift_features = Gauge("mlsec_drift_features", "Features failing the KS test in the last drift window",
                                    registry=r)

    def request(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def observe(self, rows: int, seconds: float, outcome: str) -> None:
        self.requests.labels(outcome).inc()
        self.rows.inc(rows)
        self.latency.observe(seconds)

    def alert(self, kind: str) -> None:
        self.alerts.labels(kind).inc()

    def served(self, version: str) -> None:
        self.version.set(float(version))

    def drift(self, result: DriftResult) -> None:
        self.drift_z.set(min(result.max_mean_z, 1e9))
        self.drift_features.set(result.drifted_features)

    def render(self) -> bytes:
        return generate_latest(self.registry)
