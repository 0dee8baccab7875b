"""The prediction service on the real pipeline's champion, played against as an attacker:
keys, budgets, bad input, schema fuzzing, adversarial, drifted and extraction traffic, a
locked telemetry database, and the champion alias moved through and outside the pipeline
while requests keep coming."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from stages.trust.ledger import Ledger
from tests.serving_support import add_client, running_service
from tests.support import run_cli

pytestmark = pytest.mark.slow

SETTINGS = ["serving.reload_poll_s=0.5", "serving.alerts.window=60", "serving.drift.window=120", "serving.drift.every=60",
            "serving.drift.min_interval_s=0",
            "serving.access.rate_limit=1000/second", "serving.extraction.action=throttle"]


@pytest.fixture(scope="module")
def served(two_versions, prefect_server):
    ws, runs = two_versions
    import os

    old = os.environ.get("MLSEC_ROOT")
    os.environ["MLSEC_ROOT"] = str(ws)
    keys = {"admin": add_client(ws, "admin", admin=True), "alice": add_client(ws, "alice"),
            "bob": add_client(ws, "bob", budget=30), "carol": add_client(ws, "carol", rate="5/second"),
            "eve": add_client(ws, "eve"), "mallory": add_client(ws, "mallory"), "dave": add_client(ws, "dave")}
    started = time.time()
    with running_service(ws, SETTINGS) as (url, service):
        yield {"ws": ws, "url": url, "service": service, "keys": keys, "runs": runs, "started": started}
    if old is None:
        os.environ.pop("MLSEC_ROOT", None)
    else:
        os.environ["MLSEC_ROOT"] = old


def _h(served, who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {served['keys'][who]}"}


def _digits(n: int | None = None, *, seed: int = 0):
    from stages.data.io import load_source

    d = load_source("sklearn:digits")
    order = np.random.default_rng(seed).permutation(len(d.y))[:n]
    return d.X[order].astype(np.float32), d.y[order].astype(np.int64)


def _post(served, who: str, X: np.ndarray, **kw) -> httpx.Response:
    return httpx.post(f"{served['url']}/v1/predict", json={"inputs": X.reshape(len(X), -1).tolist()},
                      headers=_h(served, who), timeout=60, **kw)


def _ledger_events(ws: Path, prefix: str) -> list[dict]:
    return [e for e in Ledger(ws / "audit" / "ledger.jsonl").entries() if e["event"].startswith(prefix)]


def _prefect_events(name: str, since: float) -> list[dict]:
    """Events the Prefect server received (the automations' view)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
    import datetime as dt

    f = EventFilter(event=EventNameFilter(name=[name]),
                    occurred=EventOccurredFilter(since=dt.datetime.fromtimestamp(since - 5, tz=dt.timezone.utc)))
    with get_client(sync_client=True) as client:
        r = client.request("POST", "/events/filter", json={"filter": f.model_dump(mode="json"), "limit": 50})
        return r.json().get("events", [])


def _wait(predicate, timeout: float = 60.0, step: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def test_refuses_to_start_when_the_alias_was_moved_outside_the_pipeline(two_versions, tmp_path):
    ws, runs = two_versions
    work = tmp_path / "copy"
    shutil.copytree(ws, work, symlinks=True)
    import mlflow

    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias("mlsec-digits", "champion", "1")
    proc = run_cli(["serve", "--port", "0"], cwd=work, env_extra={"MLFLOW_TRACKING_URI": uri}, timeout=300)
    assert proc.returncode == 4, proc.stderr
    assert "moved outside the pipeline" in proc.stderr and "Traceback" not in proc.stderr
    assert "serving" not in proc.stdout


def test_keys_are_required_and_act_only_as_their_client(served):
    X, _ = _digits(4)
    assert httpx.post(f"{served['url']}/v1/predict", json={"inputs": X.reshape(4, -1).tolist()}).status_code == 401
    wrong = {"Authorization": "Bearer " + served["keys"]["alice"][:-2] + "xx"}
    r = httpx.post(f"{served['url']}/v1/predict", json={"inputs": X.reshape(4, -1).tolist()}, headers=wrong)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    ok = _post(served, "alice", X)
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 4
    assert ok.json()["version"] == served["runs"]["v2"]["model"]["version"]
    for path in ("/v1/status", "/metrics", "/v1/admin/clients", "/v1/admin/predictions"):
        r = httpx.get(served["url"] + path, headers=_h(served, "alice"))
        assert r.status_code == 403 and r.json()["error"] == "forbidden", path
    # bob's budget is his own: spending it does not touch alice's, and alice's key never acts as bob
    assert _post(served, "bob", _digits(30)[0]).status_code == 200
    over = _post(served, "bob", X[:1])
    assert over.status_code == 429 and over.json()["error"] == "budget_exhausted"
    assert _post(served, "alice", X[:1]).status_code == 200
    clients = httpx.get(served["url"] + "/v1/admin/clients", headers=_h(served, "admin")).json()["clients"]
    assert clients["bob"]["budget_used"] == 30 and clients["alice"]["budget_used"] == 5
    # a removed key stops working at the next request
    proc = run_cli(["clients", "remove", "bob"], cwd=served["ws"])
    assert proc.returncode == 0
    assert _post(served, "bob", X[:1]).status_code == 401


def test_rate_limit_answers_429_with_retry_after(served):
    X, _ = _digits(1)
    codes = [_post(served, "carol", X) for _ in range(12)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited and limited[0].json()["error"] == "rate_limited" and int(limited[0].headers["Retry-After"]) >= 1
    assert all(r.status_code in (200, 429) for r in codes)


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "malformed_json"), (b"\xff\xfe", 400, "malformed_json"), (b"[]", 422, "invalid_input"),
    (b'{"inputs": [[0.5]]}', 422, "invalid_input"), (b'{"inputs": [[NaN' + b', 0.1' * 63 + b']]}', 422, "invalid_input"),
    (b'{"inputs": [[1e400' + b', 0.1' * 63 + b']]}', 422, "invalid_input"), (b'{"inputs": [[2' + b', 0.1' * 63 + b']]}', 422,
                                                                               "invalid_input"),
    (b'{"inputs": [["a"' + b', 0.1' * 63 + b']]}', 422, "invalid_input"), (b'{"inputs": []}', 422, "invalid_input"),
    (b'{"inputs": [' + b",".join([b"[" + b",".join([b"0.1"] * 64) + b"]"] * 257) + b"]}", 422, "invalid_input"),
    (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "malformed_json"),
    (b'{"inputs": ' + b"[" * 50 + b"]" * 50 + b"}", 422, "invalid_input"),
    (b'{"inputs": [[0.1]], "extra": 1}', 422, "invalid_input"), (b"x" * (5 * 1024 * 1024), 413, "body_too_large"),
])
def test_bad_input_is_a_clear_4xx(served, body, status, code):
    r = httpx.post(f"{served['url']}/v1/predict", content=body, timeout=60,
                   headers={**_h(served, "alice"), "content-type": "application/json"})
    assert r.status_code == status and r.json()["error"] == code, r.text[:300]
    assert "Traceback" not in r.text


def test_schema_fuzzing_finds_no_server_error(served, tmp_path):
    """schemathesis generates valid and invalid requests from /openapi.json for every route."""
    exe = Path(sys.executable).parent / "st"
    proc = subprocess.run([str(exe), "run", f"{served['url']}/openapi.json", "--checks", "not_a_server_error",
                           "-H", f"Authorization: Bearer {served['keys']['admin']}", "-n", "60", "--seed", "1",
                           "--request-timeout", "30"], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path)                     # its cache folder stays out of the repository
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout.split("SUMMARY")[-1]
    assert served["service"].metrics.requests.labels("error")._value.get() == 0


def test_output_hardening_and_metrics(served):
    service = served["service"]
    X, _ = _digits(3, seed=2)
    full = _post(served, "alice", X).json()["predictions"]
    assert all(len(p["probabilities"]) == 10 for p in full)
    original = service.sp
    service.sp = original.model_copy(update={"output": original.output.model_copy(update={"top1_only": True,
                                                                                          "round_decimals": 1})})
    try:
        hard = _post(served, "alice", X).json()["predictions"]
    finally:
        service.sp = original
    assert all(set(p) == {"label", "confidence"} and p["confidence"] == round(p["confidence"], 1) for p in hard)
    assert [p["label"] for p in hard] == [p["label"] for p in full]
    metrics = httpx.get(f"{served['url']}/metrics", headers=_h(served, "admin"))
    assert metrics.status_code == 200 and 'mlsec_requests_total{outcome="answered"}' in metrics.text
    assert "mlsec_request_seconds_bucket" in metrics.text and "mlsec_served_version" in metrics.text


def test_every_prediction_is_logged_with_what_the_issue_lists(served):
    X, _ = _digits(8, seed=3)
    assert _post(served, "alice", X).status_code == 200
    served["service"].flush()
    rows = httpx.get(f"{served['url']}/v1/admin/predictions", params={"client": "alice", "limit": 8},
                     headers=_h(served, "admin")).json()["predictions"]
    from stages.monitoring.inputs import row_digest

    assert {r["input_sha256"] for r in rows} == {row_digest(x) for x in X}
    for r in rows:
        assert r["time"] > 0 and r["client"] == "alice" and 0 <= r["confidence"] <= 1 and r["latency_ms"] > 0
        assert r["detector_score"] is not None and r["prediction"] in range(10) and r["input_std"] >= 0


def test_adversarial_traffic_is_flagged_and_raises_an_attack_alert_and_event(served):
    from stages.ml.attacks import attack_pgd
    from stages.models.verify import load_verified_model

    model = load_verified_model("mlsec-digits@champion")
    X, y = _digits(80, seed=5)
    adv = attack_pgd(model, torch.from_numpy(X), torch.from_numpy(y), epsilon=0.3, alpha=0.03, steps=20, restarts=1).numpy()
    assert _post(served, "mallory", adv).status_code == 200
    served["service"].flush()
    rows = httpx.get(f"{served['url']}/v1/admin/predictions", params={"client": "mallory", "limit": 80},
                     headers=_h(served, "admin")).json()["predictions"]
    assert np.mean([r["flagged"] for r in rows]) >= 0.9
    alerts = _ledger_events(served["ws"], "serving.alert.evasion")
    assert alerts and alerts[-1]["payload"]["severity"] == "critical"
    # raised once per cooldown: the fuzzer's random rows may have raised it already
    events = _wait(lambda: [e for e in _prefect_events("mlsec.monitor.attack-suspected", served["started"])
                            if e["payload"]["detector"] == "input"])
    assert events and events[0]["payload"]["score"] > events[0]["payload"]["threshold"]


def test_drifted_traffic_raises_drift_and_the_retraining_event(served):
    started = served["started"]       # once per cooldown: the fuzzer's random rows may have drifted the window already
    X, y = _digits(None, seed=7)
    shifted = X[np.isin(y, [0, 1])][:240]            # the population changed: only 0s and 1s, each a real digit
    for i, start in enumerate(range(0, 240, 40)):    # from several clients, as a population change arrives
        assert _post(served, ["dave", "alice"][i % 2], shifted[start:start + 40]).status_code == 200
    served["service"].flush()
    rows = httpx.get(f"{served['url']}/v1/admin/predictions", params={"client": "dave", "limit": 120},
                     headers=_h(served, "admin")).json()["predictions"]
    assert np.mean([r["flagged"] for r in rows]) <= 0.15          # plausible inputs: the attack detector stays quiet
    drift = _wait(lambda: _ledger_events(served["ws"], "serving.alert.drift"))
    assert drift and drift[-1]["payload"]["payload"]["drifted"]
    assert _wait(lambda: _prefect_events("mlsec.monitor.drift", started))
    retrain = _wait(lambda: _prefect_events("mlsec.retrain.requested", started))
    assert retrain and retrain[0]["payload"]["alert"] == "mlsec.monitor.drift"


def test_extraction_sweep_is_flagged_within_500_queries_and_throttled(served):
    normal, _ = _digits(400, seed=11)
    for start in range(0, 400, 20):
        assert _post(served, "alice", normal[start:start + 20]).status_code == 200
    proc = run_cli(["drill", "extraction", "--url", served["url"], "--queries", "600", "--json"], cwd=served["ws"],
                   env_extra={"MLSEC_API_KEY": served["keys"]["eve"], "MLSEC_ADMIN_KEY": served["keys"]["admin"]})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["flagged_after_queries"] is not None and report["flagged_after_queries"] <= 500, report
    assert report["block_rate"] > 0 and 0 <= report["surrogate_agreement"] <= 1
    clients = httpx.get(served["url"] + "/v1/admin/clients", headers=_h(served, "admin")).json()["clients"]
    assert clients["eve"]["flagged"] and not clients["alice"]["flagged"]
    assert any(e["payload"]["payload"]["client"] == "eve" for e in _ledger_events(served["ws"], "serving.alert.extraction"))


def test_evasion_drill_reports_detection_block_and_evasion_rates(served):
    proc = run_cli(["drill", "evasion", "--url", served["url"], "--rows", "60", "--json"], cwd=served["ws"],
                   env_extra={"MLSEC_API_KEY": add_client(served["ws"], "redteam"),
                              "MLSEC_ADMIN_KEY": served["keys"]["admin"]})
    assert proc.returncode == 0, proc.stderr[-2000:]
    groups = json.loads(proc.stdout)["groups"]
    assert groups["pgd_0.3"]["detection_rate"] >= 0.9 and groups["noise"]["detection_rate"] >= 0.9
    assert groups["clean"]["detection_rate"] <= 0.15
    assert all(0 <= g["block_rate"] <= 1 for g in groups.values())


def test_a_locked_telemetry_database_loses_nothing(served):
    store = served["service"].store
    served["service"].flush()
    before = store.rows_since(0)
    db = served["ws"] / "serving" / "telemetry.db"
    blocker = sqlite3.connect(db, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        X, _ = _digits(20, seed=13)
        for start in range(0, 20, 5):
            assert _post(served, "alice", X[start:start + 5]).status_code == 200
        assert _wait(lambda: not store.healthy, timeout=30)
    finally:
        blocker.rollback()
        blocker.close()
    assert served["service"].flush(timeout=60)
    assert store.rows_since(0) == before + 20
    kinds = [e["payload"]["payload"].get("healthy") for e in _ledger_events(served["ws"], "serving.alert.telemetry")]
    assert False in kinds and True in kinds


def _flags(service, X: np.ndarray) -> np.ndarray:
    """The detector's alarms for rows ``X``, as the served version gives them."""
    current = service.host.current
    with torch.no_grad():
        _, _, flagged = current.detector.score(current.model, torch.from_numpy(X.reshape(-1, *current.input_shape)))
    return flagged.numpy()


def _flagged_count(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT COUNT(*) FROM flagged_inputs").fetchone()[0]


def test_nothing_is_answered_that_cannot_be_logged(served):
    """The monitor logs a request after it is answered, so the room for its rows is taken
    before: twice its rows with the detector on (any row may be flagged, and a flagged row's
    input is kept for review besides its prediction). With the database locked, requests past
    the room are refused (503), and every answered row is written once the lock goes."""
    db = served["ws"] / "serving" / "telemetry.db"
    served["service"].flush()
    with running_service(served["ws"], SETTINGS + ["serving.telemetry.queue_max=16"]) as (url, service):
        before = service.store.rows_since(0)
        X, _ = _digits(24, seed=19)
        flags = _flags(service, X)
        blocker = sqlite3.connect(db, timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")
        codes, expected, used = [], [], 0
        try:
            for start in range(0, 24, 4):
                r = httpx.post(f"{url}/v1/predict", json={"inputs": X[start:start + 4].tolist()},
                               headers=_h(served, "alice"), timeout=60)
                codes.append(r.status_code)
                if r.status_code == 503:
                    assert r.json()["error"] == "telemetry_unavailable"
                assert service.monitor.flush()       # the pass has ended: its unused room is back
                fits = used + 8 <= 16
                expected.append(200 if fits else 503)
                used += (4 + int(flags[start:start + 4].sum())) if fits else 0
        finally:
            blocker.rollback()
            blocker.close()
        assert service.flush(timeout=60)
        assert codes == expected and codes[:2] == [200, 200] and codes[-1] == 503, codes
        assert service.store.rows_since(0) == before + 4 * codes.count(200)


def test_a_flood_of_flagged_inputs_keeps_every_answered_ones_review_copy(served):
    """An attacker sends noise at once, every row of it flagged, while the database is locked:
    what is answered has both its prediction rows and its inputs in the review queue once the
    lock goes; what could not be kept was refused, not answered and dropped from review."""
    db = served["ws"] / "serving" / "telemetry.db"
    served["service"].flush()
    served["keys"]["flooder"] = add_client(served["ws"], "flooder")
    with running_service(served["ws"], SETTINGS + ["serving.telemetry.queue_max=20"]) as (url, service):
        noise = np.random.default_rng(31).random((24, 64), dtype=np.float32)
        assert _flags(service, noise).all()
        before, flagged_before = service.store.rows_since(0), _flagged_count(db)
        blocker = sqlite3.connect(db, timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")
        codes: list[int] = []
        try:
            def send(k: int) -> None:
                r = httpx.post(f"{url}/v1/predict", json={"inputs": noise[4 * k:4 * k + 4].tolist()},
                               headers=_h(served, "flooder"), timeout=60)
                codes.append(r.status_code)

            threads = [threading.Thread(target=send, args=(k,)) for k in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            blocker.rollback()
            blocker.close()
        assert service.flush(timeout=60)
        answered = codes.count(200)
        assert answered == 20 // 8 and set(codes) == {200, 503}, codes    # 8 rows of room each: 4 + 4 copies
        assert service.store.rows_since(0) == before + 4 * answered
        assert _flagged_count(db) == flagged_before + 4 * answered


def test_scores_made_after_the_answer_are_the_detectors_own(served):
    """Requests arriving together are scored in one pass of the monitor: the logged score and
    alarm of every row are those the detector gives the row on its own."""
    service = served["service"]
    X, _ = _digits(12, seed=23)
    rows = np.concatenate([X.reshape(12, -1), np.random.default_rng(23).random((4, 64), dtype=np.float32)])
    threads = [threading.Thread(target=_post, args=(served, "alice", rows[k::4])) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert service.flush()
    logged = httpx.get(f"{served['url']}/v1/admin/predictions", params={"client": "alice", "limit": 16},
                       headers=_h(served, "admin")).json()["predictions"]
    from stages.monitoring.inputs import row_digests

    current = service.host.current
    with torch.no_grad():
        _, score, flagged = current.detector.score(current.model, torch.from_numpy(rows.reshape(-1, *current.input_shape)))
    by_digest = {r["input_sha256"]: r for r in logged}
    for digest, s, f in zip(row_digests(rows), score.tolist(), flagged.tolist()):
        assert abs(by_digest[digest]["detector_score"] - s) < 1e-4 and by_digest[digest]["flagged"] == f
    assert any(flagged.tolist())                                   # the noise rows raised the alarm


def test_a_monitoring_pass_that_fails_loses_no_row_and_says_so(served, monkeypatch):
    service = served["service"]
    service.flush()
    before, failures = service.store.rows_since(0), service.monitor.failures

    def broken(*_a, **_k):
        raise RuntimeError("detector state corrupted")

    monkeypatch.setattr(service.host.current.detector, "score_features", broken)
    r = _post(served, "alice", _digits(3, seed=29)[0])
    assert r.status_code == 200
    assert service.flush()
    monkeypatch.undo()
    assert service.monitor.failures == failures + 1
    assert service.store.rows_since(0) == before + 3
    rows = httpx.get(f"{served['url']}/v1/admin/predictions", params={"client": "alice", "limit": 3},
                     headers=_h(served, "admin")).json()["predictions"]
    assert all(row["detector_score"] is None and not row["flagged"] for row in rows)
    alerts = [e["payload"] for e in _ledger_events(served["ws"], "serving.alert.telemetry")]
    assert any("monitoring failed" in a["message"] and a["severity"] == "critical" for a in alerts)
    assert _post(served, "alice", _digits(2, seed=31)[0]).status_code == 200       # still serving


def test_alias_moved_through_the_pipeline_is_followed_without_dropped_requests(served):
    ws, service = served["ws"], served["service"]
    X, _ = _digits(4, seed=17)
    seen, codes, stop = set(), [], threading.Event()

    def traffic():
        while not stop.is_set():
            r = _post(served, "alice", X)
            codes.append(r.status_code)
            if r.status_code == 200:
                seen.add(r.json()["version"])

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        time.sleep(1)
        assert run_cli(["rollback", "mlsec-digits", "--reason", "serving test"], cwd=ws).returncode == 0
        assert _wait(lambda: service.host.current.version == "1", timeout=120)
        time.sleep(1)
    finally:
        stop.set()
        thread.join()
    assert codes and set(codes) == {200}, set(codes)
    assert seen == {"1", "2"}
    assert _ledger_events(ws, "serving.switch")[-1]["payload"]["version"] == "1"


def test_alias_moved_outside_the_pipeline_is_refused_while_serving(served):
    ws, service = served["ws"], served["service"]
    from stages.models.store import client
    from stages.core.workspace import Workspace

    c = client(Workspace(ws))
    c.set_registered_model_alias("mlsec-digits", "champion", "2")    # behind the pipeline's back
    try:
        refused = _wait(lambda: service.host.refused.get("2"), timeout=30)
        assert refused and "outside the pipeline" in refused
        assert service.host.current.version == "1"
        assert _post(served, "alice", _digits(2)[0]).json()["version"] == "1"
        assert _ledger_events(ws, "serving.alert.alias_drift")
    finally:
        c.set_registered_model_alias("mlsec-digits", "champion", "1")  # back to what the ledger records


def test_a_pipeline_move_seen_between_its_two_writes_is_not_refused(served):
    """The pipeline sets the alias in MLflow, then appends its ledger entry. A check between
    the two must neither serve the unrecorded version nor refuse it for good: once the entry
    lands, the version is followed (here played step by step, the ledger write delayed)."""
    ws, service = served["ws"], served["service"]
    from stages.core.workspace import Workspace
    from stages.models.aliases import move_alias
    from stages.models.store import client

    w = Workspace(ws)
    assert service.host.check()["action"] in ("none", "refused")         # aligned: no stale first sighting
    client(w).set_registered_model_alias("mlsec-digits", "champion", "2")  # the move's first write
    try:
        between = service.host.check()
        assert between["action"] == "pending", between
        assert service.host.current.version == "1"                        # not served before it is recorded
        move_alias(w, "mlsec-digits", "champion", "2", reason="serving test: the move's ledger write lands")
        service.host.check()
        assert service.host.current.version == "2" and "2" not in service.host.refused
    finally:
        move_alias(w, "mlsec-digits", "champion", "1", reason="serving test: back to version 1")
        service.host.check()
    assert service.host.current.version == "1"


def test_a_version_that_fails_verification_at_reload_is_refused(served):
    ws, service = served["ws"], served["service"]
    from stages.models.store import client
    from stages.core.workspace import Workspace

    c = client(Workspace(ws))
    service.host.refused.pop("2", None)
    good = c.get_model_version("mlsec-digits", "2").tags["mlsec.weights_sha256"]
    service.host.params = service.host.params.model_copy(update={"reload_poll_s": 3600.0})
    time.sleep(1.5)                                    # the watcher's last short wait ends; reloads now come from /reload
    approval = ws / "bob-approves-v2.json"
    signed = run_cli(["approve", "mlsec-digits/2", "--identity", "bob", "--reason", "test", "--out", str(approval)], cwd=ws)
    assert signed.returncode == 0, signed.stderr
    promote = ["promote", "mlsec-digits/2", "--approval", str(approval), "--reason", "test"]
    try:
        done = run_cli(promote, cwd=ws)      # promotion reads the ledger's signed registration, not MLflow tags
        assert done.returncode == 0, done.stderr
        c.set_model_version_tag("mlsec-digits", "2", "mlsec.weights_sha256", "0" * 64)  # changed after promotion
        r = httpx.post(f"{served['url']}/v1/admin/reload", headers=_h(served, "admin"), timeout=120).json()
        assert r["action"] == "refused" and "failed verification" in r["reason"]
        assert service.host.current.version == "1"
        assert _post(served, "alice", _digits(2)[0]).json()["version"] == "1"
    finally:
        c.set_model_version_tag("mlsec-digits", "2", "mlsec.weights_sha256", good)


def test_a_champion_revoked_while_served_stops_answering_at_once(served, tmp_path):
    """Revocation is a load refusal, also for the version already in memory: the next check
    stops answering with it (503, one line saying why), records it and raises a critical alert.
    Played on a copy of the workspace, so the shared one keeps its champion."""
    copy = tmp_path / "ws"
    shutil.copytree(served["ws"], copy, ignore=shutil.ignore_patterns("serving"))
    admin, alice = add_client(copy, "admin", admin=True), add_client(copy, "alice")
    X = _digits(3, seed=5)[0].reshape(3, -1).tolist()
    with running_service(copy, SETTINGS + ["serving.reload_poll_s=3600"]) as (url, service):
        version = service.host.current.version
        ok = httpx.post(f"{url}/v1/predict", json={"inputs": X}, headers={"Authorization": f"Bearer {alice}"}, timeout=60)
        assert ok.status_code == 200 and ok.json()["version"] == version
        done = run_cli(["revoke", f"mlsec-digits/{version}", "--reason", "weights leaked"], cwd=copy)
        assert done.returncode == 0, done.stderr
        r = httpx.post(f"{url}/v1/admin/reload", headers={"Authorization": f"Bearer {admin}"}, timeout=120).json()
        assert r["action"] == "refused" and "revoked" in r["reason"] and "weights leaked" in r["reason"]
        assert service.host.current is None
        after = httpx.post(f"{url}/v1/predict", json={"inputs": X}, headers={"Authorization": f"Bearer {alice}"}, timeout=60)
        assert after.status_code == 503 and "revoked" in after.text
        again = httpx.post(f"{url}/v1/admin/reload", headers={"Authorization": f"Bearer {admin}"}, timeout=120).json()
        assert again["action"] in ("none", "refused") and service.host.current is None   # not reloaded behind the refusal
    alerts = _ledger_events(copy, "serving.alert.revoked")
    assert alerts and alerts[-1]["payload"]["severity"] == "critical"
    assert _ledger_events(copy, "serving.refused")[-1]["payload"]["version"] == version
