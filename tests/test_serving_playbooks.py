"""Each incident playbook end to end on the workspace the serving tests left (telemetry with
flagged, drifted and extraction traffic): every step in the ledger, retraining through the
same gate, and an automation that starts a playbook on its alert's event."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from stages.trust.ledger import Ledger
from tests.servers import stop
from tests.serving_support import QUICK
from tests.support import run_cli

pytestmark = pytest.mark.slow

SET = [arg for o in QUICK for arg in ("--set", o)]


@pytest.fixture(scope="module")
def ws(two_versions, prefect_server):
    path, _ = two_versions
    return path


def _steps(ws, playbook: str, since_seq: int) -> list[dict]:
    return [e for e in Ledger(ws / "audit" / "ledger.jsonl").entries()
            if e["seq"] > since_seq and e["event"].startswith("playbook.") and e["payload"].get("playbook") == playbook]


def _head(ws) -> int:
    return Ledger(ws / "audit" / "ledger.jsonl").head()["seq"]


def _champion(ws) -> str:
    from stages.core.workspace import Workspace
    from stages.models.store import mlflow_aliases

    return mlflow_aliases(Workspace(ws), "mlsec-digits")["champion"]


def test_degradation_response_rolls_back_then_tells_drift_from_attack(ws):
    before, seq = _champion(ws), _head(ws)
    proc = run_cli(["playbook", "degradation-response", "--model", "mlsec-digits", "--reason", "accuracy complaints",
                    "--since-hours", "2", "--json"], cwd=ws)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["rollback"]["previous"] == before and _champion(ws) == out["rollback"]["version"] != before
    report = out["report"]
    # the serving tests sent PGD traffic from one client, an extraction sweep and brightened digits
    assert report["verdict"] in ("attack", "attack and drift")
    assert report["attack_evidence"] and report["evidence"]["extraction_flagged_clients"]
    from stages.trust.signing import verify_document

    signed = verify_document(json.loads((ws / report["path"]).read_text()))
    assert signed["verdict"] == report["verdict"]
    steps = [e["payload"].get("step") for e in _steps(ws, "degradation-response", seq)]
    assert steps == [None, "rollback", "report", None]          # start, steps, finish


def test_evasion_response_queues_flagged_inputs_signed_and_measures_their_perturbation(ws):
    """The queue only: retraining with the reviewers' labelled items through the gate is
    test_serving_review.py's (one retraining run serves both)."""
    seq = _head(ws)
    proc = run_cli(["playbook", "evasion-response", "--model", "mlsec-digits", "--reason", "PGD seen", "--json"], cwd=ws)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    queue = ws / out["review_queue"]["path"]
    items = json.loads((queue / "queue.json").read_text())["payload"]["items"]     # signed when written
    assert out["review_queue"]["items"] == len(items) > 0
    assert {it["client"] for it in items} >= {"mallory"}                          # the serving tests' PGD client
    with np.load(queue / "inputs.npz") as f:
        assert len(f["X"]) == len(items)
    assert 0.1 <= out["perturbation"]["retrain_epsilon"] <= 0.3
    recorded = [e for e in Ledger(ws / "audit" / "ledger.jsonl").entries() if e["event"] == "review.queue"]
    assert recorded[-1]["payload"]["queue_sha256"] == out["review_queue"]["queue_sha256"]
    steps = [e["payload"].get("step") for e in _steps(ws, "evasion-response", seq)]
    assert steps == [None, "review-queue", "perturbation", None]


def test_poisoning_response_quarantines_everywhere_retrains_and_repromotes(ws, tmp_path):
    from stages.core.workspace import Workspace
    from stages.models.store import resolve
    from stages.data.prepared import row_digest as sample_digest
    from stages.trust.context import RunContext
    from stages.data.prepared import parse_prepared

    champion = resolve(Workspace(ws), "mlsec-digits@champion")
    files, _ = RunContext(Workspace(ws), champion.tags["mlsec.run_id"]).dataset_bytes(where="test")
    X, y, _, _ = parse_prepared(files)
    suspects = [sample_digest(X, int(y[i]), i) for i in (3, 50, 400, 900, 1500)]
    (tmp_path / "suspects.txt").write_text("\n".join(suspects) + "\n")
    mask = np.zeros(X[0].shape, dtype=bool)
    mask[..., :2, :2] = True
    np.savez(tmp_path / "trigger.npz", mask=mask, pattern=np.where(mask, 1.0, 0.0).astype(np.float32))
    seq = _head(ws)
    proc = run_cli(["playbook", "poisoning-response", "--model", "mlsec-digits", "--reason", "tip-off",
                    "--digests", str(tmp_path / "suspects.txt"), "--trigger", str(tmp_path / "trigger.npz"), "--json", *SET],
                   cwd=ws, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    versions = out["quarantine"]["versions"]
    assert len(versions) >= 2 and all(v["quarantined"] >= 1 for v in versions)
    assert out["clean_data"]["removed"] == 5
    assert out["retrain"]["status"] == "promoted"
    new = resolve(Workspace(ws), "mlsec-digits@champion")
    assert str(new.version) == out["retrain"]["model"]["version"]
    files, _ = RunContext(Workspace(ws), new.tags["mlsec.run_id"]).dataset_bytes(where="test")
    X2, y2, _, _ = parse_prepared(files)
    assert not set(suspects) & {sample_digest(X2, int(y2[i]), i) for i in range(len(y2))}
    steps = [e["payload"].get("step") for e in _steps(ws, "poisoning-response", seq)]
    assert steps == [None, "quarantine", "clean-data", "retrain", None]


def test_bad_playbook_input_is_one_line_and_exit_2(ws, tmp_path):
    (tmp_path / "bad.txt").write_text("not-a-digest\n")
    for args in (["poisoning-response", "--model", "mlsec-digits", "--reason", "x"],
                 ["poisoning-response", "--model", "mlsec-digits", "--reason", "x", "--digests", str(tmp_path / "bad.txt")],
                 ["evasion-response", "--model", "mlsec-digits", "--reason", "x", "--since-hours", "-1"],
                 ["degradation-response", "--model", "mlsec-digits"]):
        proc = run_cli(["playbook", *args], cwd=ws)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_an_alert_event_starts_its_playbook_through_an_automation(ws, tmp_path):
    from stages.core import events

    seq = _head(ws)
    env = {**os.environ, "MLSEC_ROOT": str(ws)}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "playbook", "serve", "--model", "mlsec-digits"], cwd=ws,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:      # the automation exists once the deployments are served
            deadline = time.time() + 180
            while time.time() < deadline and not any(a.name == "mlsec-degradation-response-mlsec-digits"
                                                     for a in client.read_automations()):
                time.sleep(1)
        time.sleep(2)
        events.emit(events.MONITOR_DEGRADED, {"model": "mlsec-digits", "version": _champion(ws),
                                              "statistic": "low_confidence_rate", "value": 0.6, "threshold": 0.25})
        events.flush()
        deadline = time.time() + 300
        while time.time() < deadline:
            done = [e for e in _steps(ws, "degradation-response", seq) if e["event"] == "playbook.finish"]
            if done:
                break
            time.sleep(2)
        started = [e for e in _steps(ws, "degradation-response", seq) if e["event"] == "playbook.start"]
        assert started and started[0]["payload"]["reason"].startswith("alert mlsec.monitor.degraded"), started
        assert done
    finally:
        stop(proc, timeout_s=30)  # and the flow runs it started, each in a session of its own
        log.close()
