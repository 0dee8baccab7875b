"""The served model: loaded only through ``load_verified_model``, calibrated on its run's
verified data, and switched when the alias moves through the pipeline.

At start the alias must resolve, the ledger must explain where MLflow says it points (no
alias drift), and the version must verify (signature, verdict, registry digest); otherwise
the service does not start. A watcher then checks the alias every ``reload_poll_s``:

* moved through the pipeline (the ledger records the move): the new version is loaded,
  verified and calibrated off the request path, then swapped in with one assignment, so
  requests in flight finish on the version they started with and none is dropped;
* moved outside the pipeline (alias drift), or the new version fails verification: it is
  refused, the verified version keeps serving, and an alert is raised once per version.

The pipeline moves an alias in MLflow and then records the move in the ledger
(``stages.models.aliases.move_alias``), so a tick can fall between the two. A mismatch is
therefore judged only when it has lasted ``ALIAS_SETTLE_S`` and been seen by two ticks; until
then the recorded version keeps serving and the new one is not loaded. A refusal for drift
is lifted when the ledger later records a move to that version (it then verifies as usual).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stages.core.errors import InvalidInput, PipelineError
from stages.core.params import ServingParams
from stages.core.workspace import Workspace
from stages.data.preprocessing import unknown_category_policy
from stages.ml.runtime import SMALL_INPUT
from stages.models.aliases import alias_drift, ledger_aliases
from stages.models.records import revocation
from stages.models.store import mlflow_aliases, parse_ref, resolve
from stages.models.verify import load_verified_model
from stages.monitoring.alerts import Alert
from stages.monitoring.detector import AdversarialDetector, calibrate_detector
from stages.monitoring.drift import DriftMonitor
from stages.monitoring.reference import served_reference
from stages.trust.ledger import Ledger

# seconds an alias may disagree with the ledger before it counts as moved outside the pipeline: the
# pipeline's own move sets MLflow first and appends its ledger entry milliseconds later
ALIAS_SETTLE_S = 2.0

@dataclass
class Served:
    """One verified, calibrated version; immutable once serving."""

    name: str
    version: str
    run_id: str
    weights_sha256: str
    model: torch.nn.Module
    input_shape: tuple[int, ...]
    num_classes: int
    detector: AdversarialDetector | None
    drift: DriftMonitor
    reference: dict[str, Any]
    preprocessing: dict[str, Any] | None = None   # a table model's signed spec: requests carry raw rows
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "version": self.version, "run_id": self.run_id, "weights_sha256": self.weights_sha256,
                "input_shape": list(self.input_shape), "kind": "table" if self.preprocessing else "image",
                "columns": [{"name": c["name"], "type": c["type"]} for c in self.preprocessing["columns"]]
                if self.preprocessing else None,
                "input_policy": {"missing": self.preprocessing.get("missing", "refuse"),
                                 "unknown_category": unknown_category_policy(self.preprocessing)}
                if self.preprocessing else None, "num_classes": self.num_classes, "loaded_at": self.loaded_at,
                "reference": self.reference, "detector": None if self.detector is None else self.detector.report}


class ModelHost:
    def __init__(self, ws: Workspace, params: ServingParams, ref: str, *, on_alert: Callable[[Alert, str | None], None]):
        name, alias, version = parse_ref(ref)
        if alias is None:
            raise InvalidInput(f"serve a model by alias (NAME@ALIAS, e.g. {name}@champion), got {ref!r}: "
                               "a fixed version could not follow promotions")
        self.ws, self.params, self.name, self.alias = ws, params, name, alias
        self.on_alert = on_alert
        self.current: Served | None = None
        self.refused: dict[str, str] = {}       # version -> why it was not served
        self._drift_refused: set[str] = set()   # versions refused only because the ledger did not explain them
        self._unexplained: dict[str, float] = {}  # version -> when a tick first saw the alias there, unrecorded
        self.switches = 0
        self._stop = threading.Event()
        self._check_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.alias}"

    def _assert_no_drift(self) -> None:
        for d in alias_drift(self.ws, self.name):
            if d["alias"] == self.alias:
                from stages.core.errors import IntegrityError

                raise IntegrityError(f"alias {self.ref} points to version {d['mlflow']} in MLflow but the ledger records "
                                     f"{d['ledger']}: it was moved outside the pipeline; refusing to serve it")

    def start(self) -> Served:
        """Verify and load the version the alias points to (raises: the service must not start)."""
        self._assert_no_drift()
        mv = resolve(self.ws, self.ref)
        self.current = self._build(str(mv.version))
        Ledger(self.ws.ledger_path).append("serving.start", {"model": self.name, "alias": self.alias,
                                                              "version": self.current.version,
                                                              "weights_sha256": self.current.weights_sha256,
                                                              "statistics_source": self.current.reference["statistics_source"]})
        return self.current

    def _build(self, version: str) -> Served:
        """Load, verify and calibrate one version (seconds; never on the request path)."""
        uri = f"models:/{self.name}/{version}"
        model = load_verified_model(uri)          # signature, verdict, registry digest, no pickle
        kind = getattr(model, "kind", None)
        preprocessing = dict(model.spec) if kind == "table" else None
        if kind in ("image", "table"):
            # inputs are checked at the boundary and brought to the network's own input (images as float32 on
            # [0, 1]; table rows through the signed spec, stages.monitoring.inputs): serve the network, so the
            # detector, drift and telemetry read the scaled features the network sees
            model = model.net
        mv = resolve(self.ws, f"{self.name}/{version}")
        tags = dict(mv.tags or {})
        config = getattr(model, "mlsec_config", {})
        input_shape = tuple(int(s) for s in config.get("input_shape", ()))
        num_classes = int(config.get("num_classes", 0))
        if not input_shape or num_classes < 2:
            raise InvalidInput(f"{uri} does not say its input shape and classes: cannot serve it")
        if np.prod(input_shape) <= SMALL_INPUT:
            torch.set_num_threads(1)  # tiny models: intra-op threads only add spin-waits
        ref = served_reference(self.ws, model=self.name, run_id=tags.get("mlsec.run_id", ""),
                               weights_sha256=tags.get("mlsec.weights_sha256", ""), input_shape=input_shape,
                               most_rows=self.params.detectors.calibration_rows, preprocessing=preprocessing)
        detector = None
        if self.params.detectors.enabled:
            detector = calibrate_detector(model, X_train=ref.X_train, y_train=ref.y_train, X_held=ref.X_held,
                                          y_held=ref.y_held, num_classes=num_classes,
                                          epsilons=list(self.params.detectors.calibration_epsilons),
                                          target_fpr=self.params.detectors.target_fpr)
        d = self.params.drift
        drift = DriftMonitor(reference_sample=ref.X_train, statistics=ref.statistics, window=d.window, every=d.every,
                             p_value=d.p_value, max_mean_z=d.max_mean_z, min_interval_s=d.min_interval_s)
        return Served(name=self.name, version=str(version), run_id=ref.run_id, weights_sha256=tags["mlsec.weights_sha256"],
                      model=model, input_shape=input_shape, num_classes=num_classes, detector=detector, drift=drift,
                      preprocessing=preprocessing,
                      reference={"data_sha256": ref.data_sha256, "statistics_source": ref.statistics_source,
                                 "train_rows": len(ref.X_train), "held_out_rows": len(ref.X_held)})

    def check(self) -> dict[str, Any]:
        """One watcher tick: follow a pipeline move, refuse anything else. Returns what it did."""
        with self._check_lock:
            served = self.current
            recorded = ledger_aliases(self.ws, self.name)[0].get(self.alias)
            # one read of the alias: the version checked against the ledger is the version loaded (a second
            # read could see a move made outside the pipeline just after the check)
            target = mlflow_aliases(self.ws, self.name).get(self.alias)
            if target != recorded:
                first_seen = self._unexplained.setdefault(str(target), time.monotonic())
                if time.monotonic() - first_seen < ALIAS_SETTLE_S:   # perhaps a pipeline move between its two writes
                    return {"action": "pending", "version": str(target), "recorded": recorded}
                why = (f"alias {self.ref} points to version {target} in MLflow but the ledger records {recorded}: "
                       "moved outside the pipeline")
                self._drift_refused.add(str(target))
                return self._refuse(str(target), why, kind="alias_drift")
            self._unexplained.clear()
            if target in self._drift_refused:         # the ledger now records a move to it: judge it afresh
                self._drift_refused.discard(target)
                self.refused.pop(target, None)
            if served is not None:
                hit = revocation(self.ws, name=self.name, version=served.version, weights_sha256=served.weights_sha256)
                if hit:  # fail closed: a revoked version stops answering at once, whatever the alias says
                    self.current = None
                    return self._refuse(served.version, f"version {served.version} was revoked by {hit['actor']} "
                                        f"(ledger seq {hit['seq']}): {hit['reason']}", kind="revoked")
            if target is None or (served is not None and target == served.version):
                return {"action": "none", "version": served.version if served else None}
            if target in self.refused:
                return {"action": "refused", "version": target, "reason": self.refused[target]}
            try:
                new = self._build(target)
            except PipelineError as err:
                return self._refuse(target, f"version {target} failed verification: {err}", kind="reload_refused")
            self.current = new                      # one assignment: in-flight requests keep their version
            self.switches += 1
            Ledger(self.ws.ledger_path).append("serving.switch", {"model": self.name, "alias": self.alias,
                                                                   "version": new.version,
                                                                   "previous": served.version if served else None,
                                                                   "weights_sha256": new.weights_sha256,
                                                                   "statistics_source": new.reference["statistics_source"]})
            return {"action": "switched", "version": new.version, "previous": served.version if served else None}

    def _refuse(self, version: str, why: str, *, kind: str) -> dict[str, Any]:
        first = version not in self.refused
        self.refused[version] = why
        serving = self.current.version if self.current else None
        if first:
            Ledger(self.ws.ledger_path).append("serving.refused", {"model": self.name, "alias": self.alias, "version": version,
                                                                    "served_version": serving, "reason": why})
            now = f"still serving version {serving}" if serving else "no version is served until the alias moves to one that verifies"
            self.on_alert(Alert(kind, "critical", f"{why}; {now}",
                                {"version": version, "served_version": serving}), serving)
        return {"action": "refused", "version": version, "reason": why}

    def watch(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="alias-watcher", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.params.reload_poll_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a failed tick (MLflow busy) is retried at the next one
                time.sleep(0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
