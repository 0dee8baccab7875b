"""Promotion is a fail-closed security decision: what should not pass cannot be promoted,
approvals follow policy, every alias move and refusal is in the ledger."""

from __future__ import annotations

import json
import threading
import time

import pytest

from flows.cli import main
from stages.core.errors import GateRejected
from stages.trust.ledger import Ledger
from tests.support import make_workspace

pytestmark = pytest.mark.slow

QUICK = ["train.epochs=4", "evaluate.pgd_steps=5", "evaluate.restarts=1", "screen.detectors=[label_issues]",
         "gate.min_robust_accuracy={0.1: 0.05}", "gate.no_regression=null"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, prefect_server):
    import os

    path = make_workspace(tmp_path_factory.mktemp("promo") / "ws")
    old = {k: os.environ.get(k) for k in ("MLSEC_ROOT",)}
    os.environ["MLSEC_ROOT"] = str(path)
    cwd = os.getcwd()
    os.chdir(path)
    yield path
    os.chdir(cwd)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _run(extra: list[str], triggered_by: str = "alice") -> dict:
    from flows.pipeline import secure_training

    return secure_training(overrides=QUICK + extra, triggered_by=triggered_by)


def _events(ws):
    return [e for e in Ledger(ws / "audit" / "ledger.jsonl").entries()]


def _resume_when_paused(answer: dict, box: dict) -> threading.Thread:
    """Play the approver: wait for the paused flow run, then resume it with ``answer``."""

    def approver() -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName
        from prefect.flow_runs import resume_flow_run

        deadline = time.time() + 300
        with get_client(sync_client=True) as client:
            while time.time() < deadline:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Paused", "Suspended"]))))
                if runs:
                    resume_flow_run(runs[0].id, run_input=answer)
                    box["resumed"] = str(runs[0].id)
                    return
                time.sleep(0.5)

    thread = threading.Thread(target=approver, daemon=True)
    thread.start()
    return thread


def test_auto_promotion_then_rejected_candidate_cannot_be_promoted(ws, capsys):
    first = _run([])
    assert first["status"] == "promoted" and first["model"]["version"] == "1"
    with pytest.raises(GateRejected) as info:
        _run(["gate.min_clean_accuracy=0.9999"])
    assert info.value.summary["status"] == "rejected" and info.value.summary["model"] is None
    # The rejected run is still inspectable in MLflow, but was never registered.
    code = main(["promote", "mlsec-digits/2", "--approver", "bob", "--reason", "try"])
    assert code == 2 and "no version 2" in capsys.readouterr().err
    assert _events(ws)[-1]["event"] == "promotion.refused"


def test_manual_four_eyes_pause_and_approval(ws, capsys):
    box: dict = {}
    thread = _resume_when_paused({"approve": False, "approver": "carol", "reason": "needs a look"}, box)
    declined = _run(["promotion.mode=manual", "promotion.four_eyes=true"], triggered_by="alice")
    thread.join(timeout=5)
    assert box.get("resumed") and declined["status"] == "declined"
    version = declined["model"]["version"]
    # The person who triggered the run may not approve it.
    code = main(["promote", f"mlsec-digits/{version}", "--approver", "alice", "--reason", "ship it"])
    assert code == 3 and "four-eyes" in capsys.readouterr().err
    assert _events(ws)[-1]["event"] == "promotion.refused"
    # Somebody else may; the move is recorded with approver and reason.
    assert main(["promote", f"mlsec-digits/{version}", "--approver", "bob", "--reason", "reviewed", "--json"]) == 0
    moved = json.loads(capsys.readouterr().out)
    assert moved["version"] == version and moved["previous"] == "1"
    last = _events(ws)[-1]
    assert last["event"] == "alias.move" and last["payload"]["approver"] == "bob" and last["payload"]["reason"] == "reviewed"


def test_rollback_returns_to_previous_champion(ws, capsys):
    from stages.models.store import mlflow_aliases
    from stages.core.workspace import Workspace

    before = mlflow_aliases(Workspace(ws), "mlsec-digits")["champion"]
    assert main(["rollback", "mlsec-digits", "--reason", "incident 42", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["previous"] == before and out["version"] == "1"
    assert mlflow_aliases(Workspace(ws), "mlsec-digits")["champion"] == "1"


def test_forged_verdict_is_refused(ws, capsys, tmp_path):
    """A verdict rewritten to BLESSED without the key fails its signature on promotion."""
    art_root = ws / "mlartifacts"
    verdicts = [p for p in art_root.rglob("verdict.json") if "artifacts" in p.parts]
    assert verdicts
    for path in verdicts:
        doc = json.loads(path.read_text())
        doc["payload"]["policy"] = {"forged": True}
        path.write_text(json.dumps(doc))
    code = main(["promote", "mlsec-digits/1", "--approver", "bob", "--reason", "forged"])
    assert code == 4 and "signature" in capsys.readouterr().err


def test_two_promotions_at_once_one_is_refused(ws, capsys):
    from filelock import FileLock

    lock = FileLock(str(ws / "audit" / "promotion-mlsec-digits.lock"))
    with lock:
        code = main(["promote", "mlsec-digits/3", "--approver", "bob", "--reason", "race"])
    assert code == 1 and "in progress" in capsys.readouterr().err
