"""What a prediction feeds once it is answered: the input detector's score (unless it must
decide the answer), the extraction detector, the alert rules, the drift window and the
telemetry rows. All of it runs on one monitor thread, in batches.

Measured on digits (one process, in-process calls): the monitoring work cost as much CPU as the
model's own forward pass, most of it a fixed cost per call (a dozen small tensor operations
for the detector, a lock and two matrix products per client for the extraction detector, one
queue item per request for telemetry). On the request path every request paid it once; here
one call covers every request that arrived since the last one, so under load its cost per
request falls with the batch, and an idle server answers without waiting for it.

The guarantees stay those of the request path:

* nothing is answered unlogged: the request reserves room for its rows in the telemetry queue
  before it is answered (503 when there is none), and the monitor fills that room;
* observations are handled in the order they were answered, so a client's stream reaches the
  extraction detector as it was sent; a client it flags is throttled or blocked from its next
  request on;
* ``flush`` waits until everything answered so far has been scored, checked and queued for
  writing; the administrator's routes call it, so what they show includes the last request.

With ``serving.detectors.action: reject`` the detector decides the answer and runs on the
request path; its scores ride along.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stages.monitoring.alerts import Alert, RateRules
from stages.monitoring.extraction import ExtractionDetector
from stages.monitoring.inputs import row_digests, row_summary
from stages.monitoring.store import TelemetryStore

from flows.serving.host import Served
from flows.serving.metrics import Metrics

MAX_BATCH_ROWS = 4096      # rows one monitoring pass takes at most
# after the first observation of a pass arrives, the monitor waits this long before it starts:
# the answer it came from is still being serialised and sent, and a pass that started at once
# would take the interpreter from it (measured at 20 requests/s: +20% latency when the pass
# started at once); under load the wait also gathers more requests into one pass
GATHER_S = 0.01
# when more answers arrived during that wait, the service is busy: the pass waits this long in
# all before it starts, so it takes more requests at once. Most of a pass's cost is fixed (a
# dozen small tensor operations, a distance search per client, a queue item), so under load
# the cost per request falls with the pass; measured on digits at saturation, 32-row requests:
# monitoring added +27% p50 latency with every pass started at GATHER_S, +20% at 0.04 s and at
# 0.1 s alike; single rows +16%, +6% and +4%. An idle server's passes start as before. What it
# costs: under load a client flagged for extraction is throttled up to this much later (at the
# default 50 requests/s a key, two or three requests more)
BUSY_GATHER_S = 0.05


@dataclass
class Observation:
    """One answered (or rejected) request, as the monitor needs it."""

    client: str
    is_admin: bool
    served: Served
    X: np.ndarray                       # N x input shape, the scale the network sees
    feats: torch.Tensor | None          # penultimate features, when the detector scores later
    logits: torch.Tensor
    pred: np.ndarray
    conf: np.ndarray
    score: np.ndarray | None            # detector scores made on the request path (action reject)
    flagged: np.ndarray | None
    rejected: bool
    latency_ms: float
    raw: list[dict[str, Any]] | None    # a table's rows as sent
    time: float
    request_id: str
    logged: bool = False                # its telemetry rows are queued
    held: int = 0                       # telemetry rows of room still held for it


class Monitor:
    def __init__(self, *, sp: Any, store: TelemetryStore | None, sink: Callable[[Alert, str | None], None],
                 metrics: Metrics, rules: RateRules, extraction: ExtractionDetector | None, queue_max: int):
        self.sp, self.store, self.sink, self.metrics = sp, store, sink, metrics
        self.rules, self.extraction = rules, extraction
        self.queue_max = queue_max
        self.flagged_clients: set[str] = set()
        self.failures = 0
        self._queue: queue.Queue[Observation] = queue.Queue()
        self._rows = 0                      # rows submitted and not yet handled
        self._submitted = 0                 # observations submitted, and handled (in order)
        self._handled = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every observation submitted before the call is handled (and its rows
        queued for the store), however busy the service stays; False on timeout."""
        with self._idle:
            target = self._submitted
            return self._idle.wait_for(lambda: self._handled >= target, timeout=timeout)

    def backlog(self) -> int:
        return self._rows

    # -- the request side -------------------------------------------------------------
    def submit(self, obs: Observation) -> bool:
        """Take one request's observation; False (nothing taken) when its rows cannot be logged.

        With the input detector on, room is held for twice its rows: any of them may be flagged,
        and a flagged row's input goes to the review queue (``flagged_inputs``) besides its
        prediction row; the room a pass does not use is given back when it ends."""
        n = len(obs.X)
        if self.store is not None:
            room = 2 * n if obs.served.detector is not None else n
            if not self.store.reserve(room):
                return False
            obs.held = room
        elif self._rows + n > self.queue_max:
            return False
        with self._lock:
            self._rows += n
            self._submitted += 1
            self._queue.put(obs)            # under the lock: queue order is submission order
        return True

    # -- the monitor thread -----------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            self._stop.wait(GATHER_S)
            if not self._queue.empty():
                self._stop.wait(BUSY_GATHER_S - GATHER_S)
            rows = len(batch[0].X)
            while rows < MAX_BATCH_ROWS:
                try:
                    obs = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(obs)
                rows += len(obs.X)
            try:
                self._handle(batch)
            except Exception as err:  # noqa: BLE001 - never lose the rows; say the monitoring failed
                try:
                    self._failed(batch, err)
                except Exception:  # noqa: BLE001 - the thread must live on
                    traceback.print_exc(file=sys.stderr)
            finally:
                unused = sum(o.held for o in batch)       # room for rows that did not come: given back
                if unused and self.store is not None:
                    self.store.release(unused)
                with self._idle:
                    self._rows -= rows
                    self._handled += len(batch)
                    self._idle.notify_all()

    def _handle(self, batch: list[Observation]) -> None:
        for group in _runs(batch, key=lambda o: id(o.served)):
            served = group[0].served
            X = np.concatenate([o.X for o in group])
            offsets = np.cumsum([0] + [len(o.X) for o in group]).tolist()   # where each observation's rows start
            pred = np.concatenate([o.pred for o in group])
            conf = np.concatenate([o.conf for o in group])
            score, flagged = self._scores(served, group, X)
            if flagged.any():
                self.metrics.flagged.inc(int(flagged.sum()))
            extraction = self._extraction(group, offsets, X, pred, flagged)
            self._log(group, offsets, X, pred, conf, score, flagged, extraction)
            self._rules(served, X, conf, flagged)

    def _scores(self, served: Served, group: list[Observation], X: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Detector scores and alarms of the group's rows (``X``, joined), scored in one pass
        where deferred."""
        n = len(X)
        if served.detector is None:
            return None, np.zeros(n, dtype=bool)
        score, flagged = np.empty(n, dtype=np.float32), np.zeros(n, dtype=bool)
        later = [o for o in group if o.score is None]
        if later:
            # the action is one setting, so the deferred rows are the whole group or none of it
            rows = X if len(later) == len(group) else np.concatenate([o.X for o in later])
            combined, alarm = served.detector.score_features(torch.cat([o.feats for o in later]),
                                                             torch.cat([o.logits for o in later]),
                                                             torch.from_numpy(rows))
            combined, alarm = combined.numpy(), alarm.numpy()
        start, used = 0, 0
        for o in group:
            m = len(o.X)
            if o.score is None:
                o.score, o.flagged = combined[used:used + m], alarm[used:used + m]
                used += m
            score[start:start + m], flagged[start:start + m] = o.score, o.flagged
            start += m
        return score, flagged

    def _extraction(self, group: list[Observation], offsets: list[int], X: np.ndarray, pred: np.ndarray,
                    flagged: np.ndarray) -> list[bool]:
        """Feed each client's queries in order; per observation, whether its client was flagged
        once its queries were seen."""
        out: list[bool] = []
        for run in _runs(list(range(len(group))), key=lambda i: group[i].client):
            first = group[run[0]]
            if self.extraction is None or first.is_admin:
                out += [first.client in self.flagged_clients] * len(run)
                continue
            lo, hi = offsets[run[0]], offsets[run[-1] + 1]
            hit = self.extraction.observe(first.client, X[lo:hi], pred[lo:hi], flagged[lo:hi])
            if hit and first.client not in self.flagged_clients:
                self.flagged_clients.add(first.client)
                self._extraction_alert(first)
            out += [hit or first.client in self.flagged_clients] * len(run)
        return out

    def _extraction_alert(self, obs: Observation) -> None:
        state = self.extraction.state(obs.client)
        prada = "Shapiro" in (state["reason"] or "") and state.get("w") is not None
        score = state["w"] if prada else state["ood_share"]
        threshold = self.sp.extraction.prada_delta if prada else self.sp.extraction.ood_fraction
        self.sink(Alert("extraction", "critical",
                        f"client {obs.client!r} looks like a model-extraction sweep after {state['flagged_at']} queries: "
                        f"{state['reason']}; action: {self.sp.extraction.action}",
                        {"client": obs.client, "score": score, "threshold": threshold, "queries": state["flagged_at"],
                         "action": self.sp.extraction.action}), obs.served.version)

    def _log(self, group: list[Observation], offsets: list[int], X: np.ndarray, pred: np.ndarray, conf: np.ndarray,
             score: np.ndarray | None, flagged: np.ndarray, extraction: list[bool]) -> None:
        if self.store is None:
            return
        counts = [hi - lo for lo, hi in zip(offsets[:-1], offsets[1:])]

        def each_row(values: list[Any]) -> list[Any]:      # one value per observation, repeated for its rows
            return [v for v, c in zip(values, counts) for _ in range(c)]

        summary = row_summary(X)
        digests = row_digests(X)
        scores = [None] * len(X) if score is None else score.astype(np.float64).tolist()
        # column by column, one conversion per column: a dict per row cost more than its insert
        self.store.submit_columns("predictions", {
            "time": each_row([o.time for o in group]), "client": each_row([o.client for o in group]),
            "model_version": each_row([o.served.version for o in group]),
            "request_id": each_row([o.request_id for o in group]),
            "latency_ms": each_row([o.latency_ms for o in group]), "extraction_flagged": each_row(extraction),
            "outcome": each_row(["rejected" if o.rejected else "answered" for o in group]),
            "input_sha256": digests, "prediction": pred.tolist(), "confidence": conf.astype(np.float64).tolist(),
            "detector_score": scores, "flagged": flagged.tolist(),
            **{f"input_{k}": summary[k].astype(np.float64).tolist() for k in ("mean", "std", "min", "max")},
        }, reserved=True)
        for o in group:
            o.logged, o.held = True, o.held - len(o.X)
        if flagged.any():
            owner = np.repeat(np.arange(len(group)), counts)
            kept = []
            for i in np.flatnonzero(flagged).tolist():
                o = group[int(owner[i])]
                o.held -= 1
                kept.append({"input_sha256": digests[i], "time": o.time, "client": o.client,
                             "model_version": o.served.version, "prediction": int(pred[i]),
                             "detector_score": scores[i] if scores[i] is not None else 0.0,
                             "shape": str(list(X.shape[1:])),
                             "data": np.ascontiguousarray(X[i], dtype=np.float32).tobytes(),
                             "raw_row": json.dumps(o.raw[i - offsets[owner[i]]]) if o.raw is not None else None})
            self.store.submit("flagged_inputs", kept, reserved=True)

    def _rules(self, served: Served, X: np.ndarray, conf: np.ndarray, flagged: np.ndarray) -> None:
        for alert in self.rules.observe(conf.tolist(), flagged.tolist()):
            alert.payload["threshold"] = (self.sp.alerts.max_detector_rate if alert.kind == "evasion"
                                          else self.sp.alerts.max_low_confidence_rate)
            self.sink(alert, served.version)
        window = served.drift.add(X)
        if window is not None:
            self._drift(served, window)

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

    def _failed(self, batch: list[Observation], err: Exception) -> None:
        """A monitoring pass that raised: log the predictions without the checks that did not
        run (the rows keep the room they reserved), and raise a critical alert that says so."""
        self.failures += 1
        traceback.print_exception(err, file=sys.stderr)
        rest = [o for o in batch if not o.logged]
        if rest:
            offsets = np.cumsum([0] + [len(o.X) for o in rest]).tolist()
            self._log(rest, offsets, np.concatenate([o.X for o in rest]), np.concatenate([o.pred for o in rest]),
                      np.concatenate([o.conf for o in rest]), None, np.zeros(offsets[-1], dtype=bool),
                      [o.client in self.flagged_clients for o in rest])
        if self.rules.allow("telemetry", "monitor-failed"):
            self.sink(Alert("telemetry", "critical",
                            f"monitoring failed on {len(batch)} requests ({type(err).__name__}: {err}); their predictions "
                            "were logged without detector scores, extraction or drift checks",
                            {"healthy": False, "error": f"{type(err).__name__}: {err}"}), batch[0].served.version)


def _runs(items: list, *, key: Callable[[Any], Any]) -> list[list]:
    """Consecutive items with equal ``key``, in order."""
    out: list[list] = []
    for item in items:
        if out and key(out[-1][0]) == key(item):
            out[-1].append(item)
        else:
            out.append([item])
    return out
