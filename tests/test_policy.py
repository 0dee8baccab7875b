"""The governed policy and signed approvals, played as an attacker with write access to the
workspace: a weakened setting is always seen, a deleted or edited signed policy is refused
(no second first use), and an approval counts only when the right person signed it for
exactly this version."""

from __future__ import annotations

import json
import subprocess

import pytest

from stages.core.errors import GateRejected, IntegrityError, InvalidInput
from stages.core.params import load_params
from stages.core.policy import effective_policy, policy_differences
from stages.core.workspace import Workspace
from stages.trust.approvals import sign_approval, verify_approval
from stages.trust.identities import create_identity
from stages.trust.ledger import Ledger
from stages.trust.policy import committed_policy, load_signed_policy, policy_for_run, policy_path, sign_policy
from stages.trust.signing import sign_document
from tests.support import ROOT, run_cli


@pytest.fixture
def keys(tmp_path, monkeypatch):
    """A key folder of the test's own: identities and the policy owner key start absent."""
    monkeypatch.setenv("MLSEC_KEY_DIR", str(tmp_path / "keys"))
    return tmp_path / "keys"


def _params_text(**replace: str) -> str:
    text = (ROOT / "params.yaml").read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def _commit(ws) -> None:
    subprocess.run(["git", "-C", str(ws), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(ws), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"], check=True)


def test_weaker_and_stronger_settings_are_told_apart():
    base = load_params(ROOT / "params.yaml")
    signed = effective_policy(base)

    def diff(*overrides):
        return {d["setting"]: d["weaker"] for d in policy_differences(signed, effective_policy(load_params(ROOT / "params.yaml", list(overrides))))}

    assert diff() == {}
    assert diff("gate.min_clean_accuracy=0") == {"gate.min_clean_accuracy": True}
    assert diff("gate.min_clean_accuracy=0.99") == {"gate.min_clean_accuracy": False}
    assert diff("gate.min_robust_accuracy={}") == {"gate.min_robust_accuracy": True}
    assert diff("gate.min_robust_accuracy={0.1: 0.5, 0.05: 0.7}") == {"gate.min_robust_accuracy": False}
    assert diff("gate.max_mia_auc=null") == {"gate.max_mia_auc": True}
    assert diff("gate.max_mia_auc=0.6") == {"gate.max_mia_auc": False}
    assert diff("gate.require_integrity=false") == {"gate.require_integrity": True}
    assert diff("gate.no_regression=null") == {"gate.no_regression": True}
    assert diff("gate.no_regression.clean_accuracy=0.5") == {"gate.no_regression": True}
    assert diff("promotion.approval_timeout_s=5") == {"promotion.approval_timeout_s": False}
    assert diff("promotion.mode=manual") == {"promotion.mode": False}
    assert diff("promotion.approvers=[mallory]") == {"promotion.approvers": True}
    assert diff("promotion.reviewers=[mallory]") == {"promotion.reviewers": True}
    manual = effective_policy(load_params(ROOT / "params.yaml", ["promotion.mode=manual"]))
    assert policy_differences(manual, signed) == [{"setting": "promotion.mode", "signed": "manual", "effective": "auto",
                                                  "weaker": True}]


def test_table_thresholds_are_compared_as_they_apply_to_tables():
    signed = effective_policy(load_params(ROOT / "params.yaml"))

    def diff(*overrides):
        return {d["setting"]: d["weaker"] for d in policy_differences(signed, effective_policy(load_params(ROOT / "params.yaml", list(overrides))))}

    assert diff("gate.min_robust_accuracy={0.1: 0.6}") == {"gate.min_robust_accuracy": False}  # images only
    assert diff("gate.table.min_robust_accuracy={0.02: 0.5}") == {"gate.table": True}
    assert diff("gate.table.min_robust_accuracy={0.02: 0.9}") == {"gate.table": False}
    assert diff("gate.table.min_clean_accuracy=0.5") == {"gate.table": True}  # below the section's own 0.9
    assert diff("gate.table={}") == {"gate.table": True}  # tables fall back to eps 0.1, which they never measure


@pytest.mark.parametrize("overrides, message", [
    (["promotion.four_eyes=true"], "contradicts promotion.mode: auto"),
    (["promotion.mode=manual", "promotion.four_eyes=true", "promotion.approvers=[alice]"], "at least two"),
    (["promotion.approvers=[alice, alice]"], "twice"),
    (["promotion.approvers=['not a name']"], "invalid identity"),
    (["promotion.reviewers=[rita, rita]"], "promotion.reviewers lists a name twice"),
    (["promotion.reviewers=['../x']"], "promotion.reviewers holds invalid identity"),
])
def test_contradictory_promotion_settings_are_refused_at_load(overrides, message):
    with pytest.raises(InvalidInput, match=message):
        load_params(ROOT / "params.yaml", overrides)


def test_four_eyes_with_auto_exits_2_and_changes_nothing(workspace, keys):
    proc = run_cli(["run", "--set", "promotion.four_eyes=true"], cwd=workspace)
    assert proc.returncode == 2 and "contradicts" in proc.stderr and "Traceback" not in proc.stderr
    assert not (workspace / "audit").exists() and not (workspace / "runs").exists()


def test_first_use_signs_the_committed_policy_not_an_edited_copy(workspace, keys):
    ws = Workspace(workspace)
    _commit(workspace)
    (workspace / "params.yaml").write_text(_params_text(**{"  min_clean_accuracy: 0.9\n": "  min_clean_accuracy: 0.1\n"}))
    before = run_cli(["policy", "show", "--json"], cwd=workspace)
    assert before.returncode == 0, before.stderr
    pending = json.loads(before.stdout)
    assert pending["signed"] is None and "at commit" in pending["first_use_would_sign"]
    assert [d["setting"] for d in pending["params_differences"]] == ["gate.min_clean_accuracy"]
    signed = policy_for_run(ws)
    assert signed.payload["trust"] == "first-use" and signed.payload["gate"]["min_clean_accuracy"] == 0.9
    assert "at commit" in signed.payload["source"]
    entry = [e for e in Ledger(ws.ledger_path).entries() if e["event"] == "policy.sign"][-1]
    assert entry["payload"]["sha256"] == signed.sha256 and entry["payload"]["trust"] == "first-use"
    edited = effective_policy(load_params(workspace / "params.yaml"))
    assert [d["setting"] for d in policy_differences(signed.policy, edited) if d["weaker"]] == ["gate.min_clean_accuracy"]
    shown = run_cli(["policy", "show", "--json"], cwd=workspace)
    assert shown.returncode == 0, shown.stderr
    out = json.loads(shown.stdout)
    assert out["signed"]["sha256"] == signed.sha256 and out["ledger_seq"] == entry["seq"]
    assert out["params_differences"][0]["setting"] == "gate.min_clean_accuracy"


def test_a_deleted_signed_policy_is_not_trusted_on_first_use_again(workspace, keys):
    ws = Workspace(workspace)
    policy_for_run(ws)
    policy_path(ws).unlink()
    (workspace / "params.yaml").write_text(_params_text(**{"  min_clean_accuracy: 0.9\n": "  min_clean_accuracy: 0.1\n"}))
    with pytest.raises(IntegrityError, match="missing, but the ledger records policy"):
        policy_for_run(ws)
    assert not policy_path(ws).exists()


def test_an_edited_or_pipeline_signed_policy_is_refused(workspace, keys):
    ws = Workspace(workspace)
    policy_for_run(ws)
    doc = json.loads(policy_path(ws).read_text())
    doc["payload"]["gate"]["min_clean_accuracy"] = 0.0
    policy_path(ws).write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="bad signature"):
        load_signed_policy(ws)
    resigned = sign_document(doc["payload"])  # the pipeline's own key may not set the policy
    policy_path(ws).write_text(json.dumps(resigned))
    with pytest.raises(IntegrityError, match="unknown key"):
        load_signed_policy(ws)
    proc = run_cli(["policy", "show"], cwd=workspace)
    assert proc.returncode == 4 and "only the policy owner" in proc.stderr


def test_policy_sign_refuses_an_approver_without_a_key_and_a_malformed_policy(workspace, keys):
    ws = Workspace(workspace)
    policy_for_run(ws)
    before = policy_path(ws).read_bytes()
    (workspace / "params.yaml").write_text(_params_text(**{"  approvers: []": "  approvers: [carol]"}))
    proc = run_cli(["policy", "sign"], cwd=workspace)
    assert proc.returncode == 2 and "carol" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (workspace / "params.yaml").write_text(_params_text(**{"  min_clean_accuracy: 0.9\n": "  min_clean_accuracy: high\n"}))
    proc = run_cli(["policy", "sign"], cwd=workspace)
    assert proc.returncode == 2 and "min_clean_accuracy" in proc.stderr
    assert policy_path(ws).read_bytes() == before


def test_policy_sign_pins_each_reviewers_key_and_refuses_a_reviewer_without_one(workspace, keys):
    """Reviewers are pinned as approvers are: a key that is not here cannot be signed in, and
    the pinned key is the one the reviewer had when the owner signed."""
    ws = Workspace(workspace)
    policy_for_run(ws)
    rita_key, _ = create_identity("rita")
    (workspace / "params.yaml").write_text(_params_text(**{"  reviewers: []": "  reviewers: [rita, ursula]"}))
    before = policy_path(ws).read_bytes()
    proc = run_cli(["policy", "sign"], cwd=workspace)
    assert proc.returncode == 2 and "reviewer 'ursula' has no public key here" in proc.stderr
    assert policy_path(ws).read_bytes() == before
    (workspace / "params.yaml").write_text(_params_text(**{"  reviewers: []": "  reviewers: [rita]"}))
    assert run_cli(["policy", "sign"], cwd=workspace).returncode == 0
    signed = load_signed_policy(ws)
    assert signed.reviewers == ["rita"] and {n: k for n, (k, _) in signed.pinned_keys("reviewers").items()} == {"rita": rita_key}
    assert signed.pinned_keys("approvers") == {}
    entry = [e for e in Ledger(ws.ledger_path).entries() if e["event"] == "policy.sign"][-1]["payload"]
    assert entry["reviewers"] == {"rita": rita_key} and entry["unpinned_reviewers"] == []
    shown = json.loads(run_cli(["policy", "show", "--json"], cwd=workspace).stdout)
    assert shown["signed"]["reviewers"] == {"rita": rita_key} and shown["params_differences"] == []


def test_a_policy_signed_before_reviewers_existed_names_none_and_reads_as_unchanged(workspace, keys):
    """A document without ``promotion.reviewers`` (signed by an earlier release) still verifies,
    lets nobody label, and shows no difference from a params.yaml that names none."""
    from stages.trust.identities import policy_owner_signer
    from stages.trust.policy import SignedPolicy

    ws = Workspace(workspace)
    signed = policy_for_run(ws)
    payload = json.loads(json.dumps(signed.payload))
    for field in ("reviewer_keys", "unpinned_reviewers"):
        payload.pop(field)
    del payload["promotion"]["reviewers"]
    policy_path(ws).write_text(json.dumps(sign_document(payload, signer=policy_owner_signer(create=False))))
    old = load_signed_policy(ws)
    assert isinstance(old, SignedPolicy) and old.reviewers == [] and old.pinned_keys("reviewers") == {}
    assert policy_differences(old.policy, effective_policy(load_params(workspace / "params.yaml"))) == []


def test_identities_are_created_once(workspace, keys):
    assert run_cli(["keys", "create", "--identity", "alice"], cwd=workspace).returncode == 0
    again = run_cli(["keys", "create", "--identity", "alice"], cwd=workspace)
    assert again.returncode == 2 and "never replaced" in again.stderr
    bad = run_cli(["keys", "create", "--identity", "../x"], cwd=workspace)
    assert bad.returncode == 2


@pytest.fixture
def policy_with_approvers(workspace, keys):
    ws = Workspace(workspace)
    for name in ("alice", "bob", "mallory"):
        create_identity(name)
    (workspace / "params.yaml").write_text(_params_text(**{"  approvers: []": "  approvers: [alice, bob]"}))
    policy, _ = committed_policy(ws)
    return sign_policy(ws, policy, source="test")


V = {"model": "m", "version": "3", "verdict_sha256": "a" * 64}


def _approval(identity: str, **kw):
    fields = {**V, "weights_sha256": "b" * 64, **kw}
    return sign_approval(identity, model=fields["model"], version=fields["version"], verdict_sha256=fields["verdict_sha256"],
                         weights_sha256=fields["weights_sha256"], reason="reviewed")


def test_a_listed_approver_counts(policy_with_approvers):
    assert verify_approval(_approval("alice"), policy=policy_with_approvers, **V)["identity"] == "alice"


def test_approvals_that_must_not_count(policy_with_approvers, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from stages.trust.keys import Signer, _public_pem, key_id_of

    policy = policy_with_approvers
    with pytest.raises(GateRejected, match="'mallory' may not approve"):
        verify_approval(_approval("mallory"), policy=policy, **V)
    with pytest.raises(IntegrityError, match="not for m/3"):
        verify_approval(_approval("alice", version="2"), policy=policy, **V)
    with pytest.raises(IntegrityError, match="another gate verdict"):
        verify_approval(_approval("alice", verdict_sha256="c" * 64), policy=policy, **V)
    edited = _approval("alice")
    edited["payload"]["reason"] = "something else"
    with pytest.raises(IntegrityError, match="bad signature"):
        verify_approval(edited, policy=policy, **V)
    spoof = _approval("alice")
    spoof["payload"]["identity"] = "bob"  # alice's key, bob's name
    with pytest.raises(IntegrityError, match="claims identity 'bob'"):
        verify_approval(spoof, policy=policy, **V)
    key = ed25519.Ed25519PrivateKey.generate()  # a key nobody here knows, claiming to be alice
    stranger = Signer(key_id=key_id_of(key.public_key()), public_pem=_public_pem(key.public_key()).decode(), _private=key)
    forged = sign_document({**_approval("alice")["payload"]}, signer=stranger)
    with pytest.raises(IntegrityError, match="unknown key"):
        verify_approval(forged, policy=policy, **V)
    with pytest.raises(IntegrityError, match="malformed"):
        verify_approval({"identity": "alice"}, policy=policy, **V)
