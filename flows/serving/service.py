"""One prediction, from API key to response, without the web framework.

Order of checks: key (401), extraction block (403), rate limit (429), inputs (422), query
budget (429), then the model with the detectors; the prediction is logged before it is
answered, and a prediction that cannot be logged (telemetry queue full) is refused (503).
Bad input never reaches the model and never costs budget.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
from stages.monitoring.extraction import ExtractionDetector
from stages.monitoring.inputs import check_inputs, row_digests, row_summary, table_request
from stages.monitoring.store import TelemetryStore, default_url

from flows.serving.alerting import AlertSink
from flows.serving.host import ModelHost, Served
from flows.serving.metrics import Metrics


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
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="monitor")
        self._flagged_clients: set[str] = set()
        self._lock = threading.Lock()
        self.started = time.time()

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        if self.store is not None:
            self.store.start()
        served = self.host.start()
        self.metrics.served(served.version)
        self.host.watch()

    def stop(self) -> None:
        self.host.stop()
        self._background.shutdown(wait=True, cancel_futures=False)
        if self.store is not None:
            self.store.close()

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
        throttled = client.name in self._flagged_clients and self.sp.extraction.action == "throttle"
        if client.name in self._flagged_clients and self.sp.extraction.action == "block":
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
        logits, score, flagged = self._run(served, X)
        probs = torch.softmax(logits.float(), dim=1).numpy()
        pred = probs.argmax(axis=1)
        conf = probs[np.arange(len(pred)), pred]
        was_flagged = client.name in self._flagged_clients
        now_flagged = self._extraction(client, X, pred, flagged, served)
        rejected = self.sp.detectors.action == "reject" and bool(flagged.any())
        latency_ms = (time.perf_counter() - started) * 1000
        self._log(client, served, X, pred, conf, score, flagged, now_flagged or was_flagged, latency_ms, rejected, raw)
        self._monitor(served, X, conf, flagged)
        self.metrics.observe(len(X), int(flagged.sum()), latency_ms / 1000, "rejected" if rejected else "answered")
        if rejected:
            rows = [int(i) for i in np.flatnonzero(flagged)]
            raise Refusal(422, "input_rejected", f"rows {rows[:20]} look adversarial or out of distribution; not answered")
        return self._response(served, probs, pred, conf)

    def _run(self, served: Served, X: np.ndarray) -> tuple[torch.Tensor, np.ndarray | None, np.ndarray]:
        Xt = torch.from_numpy(X)
        with torch.no_grad():
            if served.detector is not None:
                logits, score, flagged = served.detector.score(served.model, Xt)
                return logits, score.numpy(), flagged.numpy()
            return served.model(Xt), None, np.zeros(len(X), dtype=bool)

    def _extraction(self, client: Client, X: np.ndarray, pred: np.ndarray, flagged: np.ndarray, served: Served) -> bool:
        if self.extraction is None or client.is_admin:
            return False
        hit = self.extraction.observe(client.name, X, pred, flagged)
        if hit and client.name not in self._flagged_clients:
            with self._lock:
                self._flagged_clients.add(client.name)
            state = self.extraction.state(client.name)
            prada = "Shapiro" in (state["reason"] or "") and state.get("w") is not None
            score = state["w"] if prada else state["ood_share"]
            threshold = self.sp.extraction.prada_delta if prada else self.sp.extraction.ood_fraction
            self.sink(Alert("extraction", "critical",
                            f"client {client.name!r} looks like a model-extraction sweep after {state['flagged_at']} queries: "
                            f"{state['reason']}; action: {self.sp.extraction.action}",
                            {"client": client.name, "score": score, "threshold": threshold, "queries": state["flagged_at"],
                             "action": self.sp.extraction.action}), served.version)
        return hit

    def _log(self, client: Client, served: Served, X: np.ndarray, pred: np.ndarray, conf: np.ndarray,
             score: np.ndarray | None, flagged: np.ndarray, extraction_flagged: bool, latency_ms: float,
             rejected: bool, raw: list[dict[str, Any]] | None = None) -> None:
        if self.store is None:
            return
        now, request_id = time.time(), secrets.token_hex(8)
        summary = row_summary(X)
        digests = row_digests(X)
        # one conversion per column, not per cell (float(array[i]) per cell cost more than the insert)
        scores = [None] * len(X) if score is None else score.astype(np.float64).tolist()
        outcome = "rejected" if rejected else "answered"
        rows = [{"time": now, "client": client.name, "model_version": served.version, "request_id": request_id,
                 "input_sha256": digest, "input_mean": mean, "input_std": std, "input_min": low, "input_max": high,
                 "prediction": label, "confidence": c, "latency_ms": latency_ms, "detector_score": s, "flagged": f,
                 "extraction_flagged": extraction_flagged, "outcome": outcome}
                for digest, mean, std, low, high, label, c, s, f in zip(
                    digests, *(summary[k].astype(np.float64).tolist() for k in ("mean", "std", "min", "max")),
                    pred.tolist(), conf.astype(np.float64).tolist(), scores, flagged.tolist())]
        if not self.store.submit("predictions", rows):
            self.metrics.request("unlogged")
            raise Refusal(503, "telemetry_unavailable", "the telemetry store is unavailable and its queue is full: "
                          "a prediction that cannot be logged is not answered; retry later", {"Retry-After": "5"})
        if flagged.any():
            self.store.submit("flagged_inputs", [
                {"input_sha256": digests[i], "time": now, "client": client.name, "model_version": served.version,
                 "prediction": int(pred[i]), "detector_score": float(score[i]) if score is not None else 0.0,
                 "shape": str(list(X.shape[1:])), "data": np.ascontiguousarray(X[i], dtype=np.float32).tobytes(),
                 "raw_row": json.dumps(raw[i]) if raw is not None else None}
                for i in np.flatnonzero(flagged)])

    def _monitor(self, served: Served, X: np.ndarray, conf: np.ndarray, flagged: np.ndarray) -> None:
        for alert in self.rules.observe(conf.tolist(), flagged.tolist()):
            alert.payload["threshold"] = (self.sp.alerts.max_detector_rate if alert.kind == "evasion"
                                          else self.sp.alerts.max_low_confidence_rate)
            self.sink(alert, served.version)
        window = served.drift.add(X)
        if window is not None:
            self._background.submit(self._drift, served, window)

    def _drift(self, served: Served, window: np.ndarray) -> None:
        try:
            result = served.drift.evaluate(window)
        except Exception as err:  # noqa: BLE001 - a check that cannot run counts as failed: say so
            if self.rules.allow("drift", f"error:{served.version}"):
                self.sink(Alert("drift", "critical", f"the drift test could not run on version {served.version}: {err}",
                                {"statistic": "error", "value": 0.0, "threshold": 0.0, "window": len(window)}),
                          served.version)
            return
        self.metrics.drift(result)
        if result.drifted and self.rules.allow("drift", served.version):
            d = self.sp.drift
            statistic, value, threshold = (("mean_z", result.max_mean_z, d.max_mean_z) if result.mean_z_features
                                           else ("ks_drifted_features", float(result.drifted_features), 0.0))
            self.sink(Alert("drift", "warning",
                            f"inputs drifted from the training data of version {served.version}: {result.mean_z_features} "
                            f"features past {d.max_mean_z} standard errors, {result.drifted_features} failing KS at "
                            f"p < {d.p_value} (corrected), over the last {result.n} inputs",
                            {"statistic": statistic, "value": value if np.isfinite(value) else 1e9, "threshold": threshold,
                             "window": result.n, "features": result.mean_z_features + result.drifted_features,
                             "retrain": d.retrain, **result.to_dict()}), served.version)

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
