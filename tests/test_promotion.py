"""Promotion is a fail-closed security decision, played as an attacker with write access to
the workspace: a weakened gate is never promoted automatically, approvals must be signed by
the approvers the signed policy names (two, neither the trigger, under four-eyes), and the
decisions read signed records only (the champion's signed verdict, not MLflow metrics; an
alias the ledger did not move is refused; a revoked version is refused everywhere)."""

from __future__ import annotations

import itertools
import json
import threading
import time

import pytest

from flows.cli import main
from stages.core.errors import GateRejected, IntegrityError, ModelRevoked
from stages.core.workspace import Workspace
from stages.trust.ledger import Ledger
from tests.support import APPROVERS, QUICK_RUN, copy_workspace, inside

pytestmark = pytest.mark.slow

NAME = "mlsec-digits"
QUICK = QUICK_RUN


@pytest.fixture(scope="module")
def ws(tmp_path_factory, quick_champion):
    """A copy of the session's ``quick_champion``: its version 1 promoted under the signed
    policy (a robustness floor these short runs reach, approvers alice, bob and carol)."""
    from stages.trust.identities import create_identity, identity_public

    if identity_public("mallory") is None:
        create_identity("mallory")
    path = copy_workspace(quick_champion[0], tmp_path_factory.mktemp("promo") / "ws")
    with inside(path):
        yield path


_SEEDS = itertools.count(2)  # seed 1 trained version 1


def _run(extra: list[str], triggered_by: str = "alice") -> dict:
    """One run with its own training seed: new weights each time, so no run reuses another's
    training or registered version (each test here is about a new candidate)."""
    from flows.pipeline import secure_training

    return secure_training(overrides=QUICK + [f"train.seed={next(_SEEDS)}"] + extra, triggered_by=triggered_by)


def _events(ws):
    return Ledger(ws / "audit" / "ledger.jsonl").entries()


def _champion(ws) -> str | None:
    from stages.models.store import mlflow_aliases

    return mlflow_aliases(Workspace(ws), NAME).get("champion")


def _registered(ws, version: str) -> dict:
    return [e["payload"] for e in _events(ws) if e["event"] == "register.version" and e["payload"]["version"] == version][-1]


def _approval(ws, identity: str, version: str) -> dict:
    from stages.trust.approvals import sign_approval

    rec = _registered(ws, version)
    return sign_approval(identity, model=NAME, version=version, verdict_sha256=rec["verdict_sha256"],
                         weights_sha256=rec["weights_sha256"], reason=f"{identity} reviewed v{version}")


def test_auto_promotion_then_rejected_candidate_cannot_be_promoted(ws, quick_champion, capsys):
    first = quick_champion[1]  # the first run in this workspace, _run([]) by alice
    assert first["status"] == "promoted" and first["model"]["version"] == "1" and not first["policy"]["overridden"]
    signed = [e for e in _events(ws) if e["event"] == "policy.sign"]
    assert len(signed) == 1 and signed[0]["payload"]["trust"] == "first-use"
    assert sorted(signed[0]["payload"]["approvers"]) == list(APPROVERS)
    with pytest.raises(GateRejected) as info:
        _run(["gate.min_clean_accuracy=0.9999"])  # stricter than signed: allowed, and it rejects
    assert info.value.summary["status"] == "rejected" and info.value.summary["model"] is None
    code = main(["promote", f"{NAME}/2", "--reason", "try"])
    assert code == 2 and "no version 2" in capsys.readouterr().err
    assert _events(ws)[-1]["event"] == "promotion.refused"


def _assert_overridden(ws, summary: dict, setting: str) -> None:
    assert summary["status"] == "awaiting_approval" and summary["policy"]["weakened"], summary
    assert setting in summary["policy"]["summary"]
    card = (ws / "runs" / summary["run_id"] / "card" / "model_card.md").read_text()
    assert "**Policy overridden**" in card and setting in card and "(weaker)" in card
    from stages.models.lineage import lineage

    chain = lineage(Workspace(ws), f"{NAME}/{summary['model']['version']}")["chain"]
    assert chain["policy"]["status"].startswith("policy overridden") and chain["policy"]["weakened"]
    waiting = [e for e in _events(ws) if e["event"] == "promotion.awaiting"][-1]["payload"]
    assert waiting["version"] == summary["model"]["version"] and "policy overridden" in waiting["why"]


def test_a_gate_weakened_with_set_is_never_promoted_automatically(ws, capsys):
    champion = _champion(ws)
    weakened = _run(["gate.min_clean_accuracy=0.5", "gate.max_mia_auc=null", "promotion.approval_timeout_s=1"])
    _assert_overridden(ws, weakened, "gate.min_clean_accuracy")
    assert _champion(ws) == champion
    code = main(["promote", f"{NAME}/{weakened['model']['version']}", "--reason", "ship it"])
    assert code == 3 and "needs a signed approval" in capsys.readouterr().err
    assert _champion(ws) == champion


def test_a_gate_weakened_in_params_yaml_is_never_promoted_automatically(ws):
    path = ws / "params.yaml"
    original = path.read_text()
    try:
        path.write_text(original.replace("  min_clean_accuracy: 0.9\n", "  min_clean_accuracy: 0.0\n"))
        weakened = _run(["promotion.approval_timeout_s=1"])
    finally:
        path.write_text(original)
    _assert_overridden(ws, weakened, "gate.min_clean_accuracy")
    assert _champion(ws) == "1"


def test_forged_and_misdirected_approvals_are_refused(ws, tmp_path, capsys):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from stages.trust.keys import Signer, _public_pem, key_id_of
    from stages.trust.signing import sign_document

    target, other = "2", "3"
    key = ed25519.Ed25519PrivateKey.generate()
    stranger = Signer(key_id=key_id_of(key.public_key()), public_pem=_public_pem(key.public_key()).decode(), _private=key)
    cases = {
        "unknown_key": (sign_document(_approval(ws, "alice", target)["payload"], signer=stranger), 4, "unknown key"),
        "other_version": (_approval(ws, "alice", other), 4, f"not for {NAME}/{target}"),
        "not_an_approver": (_approval(ws, "mallory", target), 3, "may not approve"),
    }
    for case, (doc, code, message) in cases.items():
        path = tmp_path / f"{case}.json"
        path.write_text(json.dumps(doc))
        before = _champion(ws)
        assert main(["promote", f"{NAME}/{target}", "--reason", case, "--approval", str(path)]) == code, case
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert _champion(ws) == before and _events(ws)[-1]["event"] == "promotion.refused"
    assert main(["approve", f"{NAME}/{target}", "--identity", "mallory", "--reason", "me"]) == 3
    assert _events(ws)[-1]["event"] == "approval.refused"


def test_one_signed_approval_promotes_a_weakened_run(ws, capsys):
    assert main(["approve", f"{NAME}/2", "--identity", "alice", "--reason", "reviewed the card"]) == 0
    assert main(["promote", f"{NAME}/2", "--reason", "approved", "--json"]) == 0
    capsys.readouterr()
    assert _champion(ws) == "2"
    move = _events(ws)[-2]  # the reference.accept entry follows the move
    assert move["event"] == "alias.move" and [a["identity"] for a in move["payload"]["approvals"]] == ["alice"]
    from stages.models.lineage import lineage

    result = lineage(Workspace(ws), f"{NAME}@champion", verify=True)
    assert result["verified"], [c for c in result["checks"] if not c["ok"]]


def _resume_when_paused(answer_for, box: dict) -> threading.Thread:
    """Play the approvers: wait for the paused flow run, then resume it with signed approvals."""

    def approver() -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName
        from prefect.flow_runs import resume_flow_run

        deadline = time.time() + 600
        with get_client(sync_client=True) as client:
            while time.time() < deadline:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Paused", "Suspended"]))))
                if runs:
                    resume_flow_run(runs[0].id, run_input=answer_for())
                    box["resumed"] = str(runs[0].id)
                    return
                time.sleep(0.5)

    thread = threading.Thread(target=approver, daemon=True)
    thread.start()
    return thread


def test_four_eyes_needs_two_signed_approvals_neither_by_the_trigger(ws, capsys):
    box: dict = {}

    def answer() -> dict:
        version = [e for e in _events(ws) if e["event"] == "register.version"][-1]["payload"]["version"]
        box["version"] = version
        return {"approve": True, "reason": "paused run approved",
                "approvals": [_approval(ws, "alice", version), _approval(ws, "bob", version)]}

    thread = _resume_when_paused(answer, box)
    with pytest.raises(GateRejected, match="four-eyes: alice triggered the run"):
        _run(["promotion.mode=manual", "promotion.four_eyes=true"], triggered_by="alice")
    thread.join(timeout=5)
    version = box["version"]
    assert box.get("resumed") and _champion(ws) == "2"
    assert main(["approve", f"{NAME}/{version}", "--identity", "alice", "--reason", "mine"]) == 3
    assert "four-eyes" in capsys.readouterr().err
    assert main(["promote", f"{NAME}/{version}", "--reason", "one is not enough"]) == 3
    assert "has 1: bob" in capsys.readouterr().err
    assert main(["approve", f"{NAME}/{version}", "--identity", "carol", "--reason", "second pair of eyes"]) == 0
    assert main(["promote", f"{NAME}/{version}", "--reason", "two approvals", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(out["approvers"]) == ["bob", "carol"] and _champion(ws) == version


def test_rollback_returns_to_previous_champion(ws, capsys):
    before = _champion(ws)
    assert main(["rollback", NAME, "--reason", "incident 42", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["previous"] == before and out["version"] == "2" and _champion(ws) == "2"


def test_champion_metrics_edited_in_mlflow_do_not_reach_the_gate(ws):
    """The no-regression check compares with the champion's signed verdict."""
    from stages.models.store import client, resolve

    c = client(Workspace(ws))
    champion = resolve(Workspace(ws), f"{NAME}@champion")
    c.log_metric(champion.run_id, "clean_accuracy", 0.0)
    c.log_metric(champion.run_id, "robust_accuracy", 0.0)
    with pytest.raises(GateRejected):  # an impossible tolerance: the champion's real figures must be used
        _run(["gate.no_regression={clean_accuracy: 0.0, robust_accuracy: 0.0}", "gate.min_clean_accuracy=0.9999"])
    verdict = [e for e in _events(ws) if e["event"] == "gate.verdict"][-1]
    doc = json.loads((ws / verdict["payload"]["verdict_path"]).read_text())["payload"]
    assert doc["champion"]["version"] == "2" and doc["champion"]["metrics"]["clean_accuracy"] > 0.5
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["no_regression.clean_accuracy"]["threshold"] > 0.5


def test_an_alias_moved_in_mlflow_is_refused_at_load(ws):
    from stages.models.store import client
    from stages.models.verify import load_verified_model

    c = client(Workspace(ws))
    c.set_registered_model_alias(NAME, "champion", "1")
    try:
        with pytest.raises(IntegrityError, match="moved outside the pipeline"):
            load_verified_model(f"{NAME}@champion")
    finally:
        c.set_registered_model_alias(NAME, "champion", "2")
    assert load_verified_model(f"{NAME}@champion") is not None


def test_a_revoked_version_is_refused_everywhere(ws, capsys):
    from stages.models.verify import load_verified_model

    assert main(["revoke", f"{NAME}/3", "--reason", "trained on leaked rows"]) == 0
    with pytest.raises(ModelRevoked, match="trained on leaked rows"):
        load_verified_model(f"{NAME}/3")
    capsys.readouterr()
    assert main(["promote", f"{NAME}/3", "--reason", "anyway"]) == 4
    assert "revoked" in capsys.readouterr().err
    assert main(["revoke", f"{NAME}/3", "--reason", "twice"]) == 2
    assert main(["lineage", f"{NAME}/3", "--verify", "--json"]) == 4


def test_a_deleted_drift_reference_fails_closed(ws):
    path = ws / "data" / "reference" / f"{NAME}.json"
    saved = path.read_bytes()
    path.unlink()
    try:
        with pytest.raises(IntegrityError, match="drift reference .* is missing"):
            _run([])
    finally:
        path.write_bytes(saved)


def test_a_rewritten_ledger_entry_stops_the_next_run(ws, capsys):
    import hashlib

    from stages.core.canonical import canonical_json
    from stages.trust.ledger import entry_hash

    ledger = ws / "audit" / "ledger.jsonl"
    saved = ledger.read_bytes()
    lines = saved.decode().splitlines()
    last = json.loads(lines[-1])
    last["payload"]["reason"] = "rewritten"
    last.pop("sig")
    last["payload_sha256"] = hashlib.sha256(canonical_json(last["payload"])).hexdigest()
    last["hash"] = entry_hash(last)
    ledger.write_text("\n".join(lines[:-1] + [json.dumps(last)]) + "\n")
    try:
        assert main(["run", *[a for q in QUICK for a in ("--set", q)]]) == 4
        err = capsys.readouterr().err
        assert "was rewritten" in err and "removed" not in err
        assert ledger.read_text().splitlines()[-1] == json.dumps(last)  # nothing appended
    finally:
        ledger.write_bytes(saved)


def test_forged_verdict_is_refused(ws, capsys):
    """A verdict rewritten to BLESSED without the key fails the model folder's signature."""
    verdicts = [p for p in (ws / "mlartifacts").rglob("verdict.json") if "artifacts" in p.parts]
    assert verdicts
    for path in verdicts:
        doc = json.loads(path.read_text())
        doc["payload"]["policy"] = {"forged": True}
        path.write_text(json.dumps(doc))
    code = main(["promote", f"{NAME}/1", "--reason", "forged"])
    assert code == 4 and "signature" in capsys.readouterr().err


def test_two_promotions_at_once_one_is_refused(ws, capsys):
    from filelock import FileLock

    lock = FileLock(str(ws / "audit" / f"promotion-{NAME}.lock"))
    with lock:
        code = main(["promote", f"{NAME}/3", "--reason", "race"])
    assert code == 1 and "in progress" in capsys.readouterr().err

