"""One prediction, from API key to response, without the web framework.

Order of checks: key (401), extraction block (403), rate limit (429), inputs (422), query
budget (429), then the model; the prediction's monitoring (detector, extraction, alerts,
drift, telemetry) is handed to the monitor (``flows.serving.monitor``) with room reserved for
its rows before it is answered, and a prediction that cannot be logged (telemetry queue full)
is refused (503). Bad input never reaches the model and never costs budget.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from stages.core.errors import InvalidInput
from stages.core.params import Params
from stages.core.workspace import Workspace
from stages.monitoring.access import Budgets, Client, KeyStore, keys_path
from stages.monitoring.alerts import Alert, RateRules
from stages.monitoring.detector import features_and_logits
from stages.monitoring.extraction import ExtractionDetector
from stages.monitoring.inputs import check_inputs, table_request
from stages.monitoring.store import TelemetryStore, default_url

from flows.serving.alerting import AlertSink
from flows.serving.host import ModelHost, Served
from flows.serving.metrics import Metrics
from flows.serving.monitor import Monitor, Observation


class _LimiterStorage(MemoryStorage):
    """`limits`' in-memory storage, expiring old entries inline at most once a second.

    The stock storage expires from a ``threading.Timer`` that lives 10 ms and is started again
    by the next hit: one new thread per request at any rate under 100 requests a second
    (measured: 5 ms of a 14 ms request on this machine). Expired moving-window entries are
    ignored when counted anyway; the sweep only frees memory.
    """

    _last_sweep = 0.0

    def _MemoryStorage__schedule_expiry(self) -> None:  # noqa: N802 - replaces the private hook of MemoryStorage
        now = time.monotonic()
        if now - self._last_sweep >= 1.0:
            self._last_sweep = now
            self._MemoryStorage__expire_events()


@dataclass
class Refusal(Exception):
    """A request the service will not answer: HTTP status, a stable code and one clear line."""

    status: int
    code: str
    message: str
    headers: dict[str, str] | None = None

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.message}


class PredictionService:
    def __init__(self, ws: Workspace, params: Params, *, ref: str | None = None):
        self.ws, self.params = ws, params
        sp = params.serving
        self.sp = sp
        self.metrics = Metrics()
        self.store: TelemetryStore | None = None
        if sp.telemetry.enabled:
            self.store = TelemetryStore(sp.telemetry.url or default_url(ws.root), queue_max=sp.telemetry.queue_max,
                                        retention_s=sp.telemetry.retention_days * 86_400, on_health=self._telemetry_health)
        ref = ref or sp.model or f"{params.project.name}@champion"
        self.sink = AlertSink(ws, ref.split("@")[0], self.store, count=self.metrics.alert)
        self.host = ModelHost(ws, sp, ref, on_alert=self.sink)
        self.keys = KeyStore(keys_path(ws))
        period = sp.access.budget_period_s
        used = {}
        if self.store is not None:
            used = self.store.usage_since(time.time() - time.time() % period)
        self.budgets = Budgets(default_budget=sp.access.budget, period_s=period, used=used)
        self._limiter = MovingWindowRateLimiter(_LimiterStorage())
        self._rate = parse(sp.access.rate_limit)
        self._throttled_rate = parse(sp.extraction.throttled_rate)
        self.extraction = ExtractionDetector(min_queries=sp.extraction.min_queries, delta=sp.extraction.prada_delta,
                                             ood_fraction=sp.extraction.ood_fraction) if sp.extraction.enabled else None
        self.rules = RateRules(window=sp.alerts.window, low_confidence=sp.alerts.low_confidence,
                               max_low_confidence_rate=sp.alerts.max_low_confidence_rate,
                               max_detector_rate=sp.alerts.max_detector_rate)
        self.monitor = Monitor(sp=sp, store=self.store, sink=self.sink, metrics=self.metrics, rules=self.rules,
                               extraction=self.extraction, queue_max=sp.telemetry.queue_max)
        self.started = time.time()

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        if self.store is not None:
            self.store.start()
        self.monitor.start()
        served = self.host.start()
        self.metrics.served(served.version)
        self.host.watch()

    def stop(self) -> None:
        self.host.stop()
        self.monitor.stop()
        if self.store is not None:
            self.store.close()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every prediction answered so far is monitored and written; False on timeout."""
        deadline = time.monotonic() + timeout
        if not self.monitor.flush(timeout):
            return False
        return self.store is None or self.store.flush(max(0.0, deadline - time.monotonic()))

    def _telemetry_health(self, healthy: bool, error: str | None) -> None:
        served = self.host.current
        message = ("telemetry store is writable again; the queued predictions were written" if healthy else
                   f"telemetry store refuses writes ({error}); predictions are queued in memory and retried")
        self.sink(Alert("telemetry", "info" if healthy else "critical", message, {"healthy": healthy, "error": error}),
                  served.version if served else None)

    # -- requests ---------------------------------------------------------------------
    def authenticate(self, token: str | None, *, admin: bool = False) -> Client:
        client = self.keys.authenticate(token)
        if client is None:
            raise Refusal(401, "unauthorized", "missing or unknown API key (send it as 'Authorization: Bearer <key>')",
                          {"WWW-Authenticate": "Bearer"})
        if admin and not client.is_admin:
            raise Refusal(403, "forbidden", f"client {client.name!r} is not an administrator")
        return client

    def _limit(self, client: Client) -> None:
        flagged = client.name in self.monitor.flagged_clients
        throttled = flagged and self.sp.extraction.action == "throttle"
        if flagged and self.sp.extraction.action == "block":
            raise Refusal(403, "blocked", "this key is blocked: its queries look like a model-extraction sweep")
        item = self._throttled_rate if throttled else (parse(client.rate) if client.rate else self._rate)
        if not self._limiter.hit(item, "rate", client.name):
            stats = self._limiter.get_window_stats(item, "rate", client.name)
            wait = max(1, int(stats.reset_time - time.time()) + 1)
            raise Refusal(429, "rate_limited", f"more than {item} requests for this key"
                          + (" (throttled: extraction suspected)" if throttled else ""), {"Retry-After": str(wait)})

    def predict(self, client: Client, body: Any) -> dict[str, Any]:
        started = time.perf_counter()
        self._limit(client)
        served: Served | None = self.host.current
        if served is None:
            raise Refusal(503, "no_verified_model", f"{self.host.ref} has no version that verifies (revoked or refused): "
                          "nothing is answered until the alias moves to one that does", {"Retry-After": "30"})
        if not isinstance(body, dict) or set(body) - {"inputs"} or "inputs" not in body:
            keys = sorted(body) if isinstance(body, dict) else type(body).__name__
            raise Refusal(422, "invalid_input", f"the body must be a JSON object with one key 'inputs', got {keys}")
        raw: list[dict[str, Any]] | None = None     # a table's rows as sent: what a review queue keeps of them
        try:
            if served.preprocessing is not None:  # a table: raw rows, checked and scaled by the signed spec
                X, raw = table_request(body["inputs"], spec=served.preprocessing, max_batch=self.sp.max_batch)
            else:
                X = check_inputs(body["inputs"], input_shape=served.input_shape, max_batch=self.sp.max_batch)
        except InvalidInput as err:
            self.metrics.request("invalid")
            raise Refusal(422, "invalid_input", str(err)) from None
        ok, left = self.budgets.try_spend(client, len(X))
        if not ok:
            self.metrics.request("budget")
            raise Refusal(429, "budget_exhausted", f"this key has {left} rows left in its query budget; the request has {len(X)}")
        reject = self.sp.detectors.action == "reject" and served.detector is not None
        with torch.no_grad():
            Xt = torch.from_numpy(X)
            if reject:      # the detector decides the answer: scored here
                logits, score_t, flagged_t = served.detector.score(served.model, Xt)
                feats, score, flagged = None, score_t.numpy(), flagged_t.numpy()
            elif served.detector is not None:   # scored by the monitor, in batches
                feats, logits = features_and_logits(served.model, Xt)
                score = flagged = None
            else:
                feats, logits, score, flagged = None, served.model(Xt), None, None
        probs = torch.softmax(logits.float(), dim=1).numpy()
        pred = probs.argmax(axis=1)
        conf = probs[np.arange(len(pred)), pred]
        rejected = reject and bool(flagged.any())
        latency_ms = (time.perf_counter() - started) * 1000
        obs = Observation(client=client.name, is_admin=client.is_admin, served=served, X=X, feats=feats, logits=logits,
                          pred=pred, conf=conf, score=score, flagged=flagged, rejected=rejected, latency_ms=latency_ms,
                          raw=raw, time=time.time(), request_id=secrets.token_hex(8))
        if not self.monitor.submit(obs):
            self.metrics.request("unlogged")
            raise Refusal(503, "telemetry_unavailable", "the telemetry store is unavailable and its queue is full: "
                          "a prediction that cannot be logged is not answered; retry later", {"Retry-After": "5"})
        self.metrics.observe(len(X), latency_ms / 1000, "rejected" if rejected else "answered")
        if rejected:
            rows = [int(i) for i in np.flatnonzero(flagged)]
            raise Refusal(422, "input_rejected", f"rows {rows[:20]} look adversarial or out of distribution; not answered")
        return self._response(served, probs, pred, conf)

    def _response(self, served: Served, probs: np.ndarray, pred: np.ndarray, conf: np.ndarray) -> dict[str, Any]:
        out = self.sp.output
        # rounded as the float64 the JSON carries: float32 0.9 prints as 0.8999999761581421
        probs, conf = probs.astype(np.float64), conf.astype(np.float64)
        if out.round_decimals is not None:
            probs, conf = np.round(probs, out.round_decimals), np.round(conf, out.round_decimals)
        labels, confidences = pred.tolist(), conf.tolist()
        if out.top1_only:
            rows = [{"label": lab, "confidence": c} for lab, c in zip(labels, confidences)]
        else:
            rows = [{"label": lab, "confidence": c, "probabilities": p}
                    for lab, c, p in zip(labels, confidences, probs.tolist())]
        return {"model": served.name, "version": served.version, "predictions": rows}
