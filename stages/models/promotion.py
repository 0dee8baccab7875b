"""Promotion and rollback of ``champion``: only verified, gated, unrevoked versions; approvals
signed by the approvers the signed policy names; one promotion per model at a time; every
move, approval and refusal in the ledger; the champion's data becomes the drift reference.

Who must approve (:func:`approvals_needed`): nobody when the run's verdict was decided under
the signed policy unchanged (or only tightened) and both say ``mode: auto``; otherwise one
signed approval, or two from distinct approvers neither of whom triggered the run when
four-eyes is on. A run whose policy was weakened by ``--set`` or an edited ``params.yaml``
therefore always waits for people, as in manual mode.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from filelock import FileLock, Timeout

from stages.core.errors import GateRejected, IntegrityError, InvalidInput, PipelineError
from stages.core.workspace import Workspace, actor
from stages.data.reference import save_reference
from stages.models.aliases import assert_no_drift, ledger_aliases, move_alias
from stages.models.attestation import log_promotion_attestation
from stages.models.records import assert_not_revoked, registration, revocation
from stages.models.store import CHAMPION, download_run_file, mlflow_aliases, parse_ref, resolve
from stages.models.verify import verify_registered_version
from stages.trust.approvals import approval_digest, sign_approval, verify_approval
from stages.trust.ledger import Ledger
from stages.trust.policy import SignedPolicy, load_signed_policy
from stages.trust.verdict import load_verdict, verdict_digest


def champion_summary(ws: Workspace, name: str) -> dict[str, Any] | None:
    """The current champion's version and figures, read from its signed verdict (for the
    no-regression check); MLflow's run metrics and tags are never consulted."""
    assert_no_drift(ws, name)
    version = ledger_aliases(ws, name)[0].get(CHAMPION)
    if version is None:
        return None
    if revocation(ws, name=name, version=version):
        return {"version": version, "revoked": True, "metrics": None}
    record = registration(ws, name, version)
    doc = json.loads(download_run_file(ws, record["mlflow_run_id"], "model/artifacts/verdict.json"))
    if verdict_digest(doc) != record.get("verdict_sha256"):
        raise IntegrityError(f"the verdict of champion {name}/{version} in MLflow is not the one the ledger registered")
    verdict = load_verdict(doc, weights_sha256=record["weights_sha256"])
    return {"version": version, "metrics": verdict.get("metrics"), "verdict_sha256": record["verdict_sha256"]}


@contextmanager
def promotion_lock(ws: Workspace, name: str) -> Iterator[None]:
    ws.audit_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(ws.audit_dir / f"promotion-{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise PipelineError(f"another promotion or rollback of {name} is in progress; try again when it has finished") from None
    try:
        yield
    finally:
        lock.release()


def _signed_policy(ws: Workspace) -> SignedPolicy:
    policy = load_signed_policy(ws)
    if policy is None:
        raise IntegrityError("there is no signed policy to promote under (audit/policy.json): run the pipeline once, "
                             "or have the policy owner run 'mlsec policy sign'")
    return policy


def approvals_needed(policy: SignedPolicy, verdict: dict[str, Any]) -> tuple[int, str | None]:
    """(signed approvals needed, why it may not be promoted without them, or None)."""
    record = verdict.get("policy") or {}
    effective = (record.get("effective") or {}).get("promotion") or {}
    signed = policy.payload["promotion"]
    needed = 2 if signed["four_eyes"] or effective.get("four_eyes") else 1
    why = []
    if not record.get("signed_sha256"):
        why.append("its verdict records no signed policy")
    elif record.get("weakened"):
        why.append(f"policy overridden: {record.get('summary')}")
    elif record["signed_sha256"] != policy.sha256:
        why.append("the signed policy changed after the gate decided")
    if signed["mode"] != "auto" or effective.get("mode") != "auto":
        why.append("promotion.mode is manual")
    return needed, "; ".join(why) or None


def requirement(ws: Workspace, verdict: dict[str, Any]) -> tuple[int, str | None]:
    """:func:`approvals_needed` under the workspace's signed policy."""
    return approvals_needed(_signed_policy(ws), verdict)


def _approvals(ws: Workspace, policy: SignedPolicy, name: str, version: str, evidence: dict[str, Any],
               given: Sequence[dict[str, Any]], needed: int) -> list[dict[str, Any]]:
    """The approvals that count, from the ledger and ``given``; ``GateRejected`` when too few."""
    trigger = evidence["verdict"].get("triggered_by")
    counted: dict[str, dict[str, Any]] = {}
    excluded: list[str] = []
    recorded = [e["payload"]["approval"] for e in Ledger(ws.ledger_path).entries()
                if e.get("event") == "approval.add" and e["payload"].get("model") == name
                and str(e["payload"].get("version")) == version]
    for origin, doc in [("ledger", d) for d in recorded] + [("given", d) for d in given]:
        try:
            payload = verify_approval(doc, policy=policy, model=name, version=version, verdict_sha256=evidence["verdict_sha256"])
        except PipelineError:
            if origin == "given":
                raise  # an approval handed in must count or be refused, never silently dropped
            continue  # recorded under an earlier policy or verdict: it no longer counts
        if needed > 1 and payload["identity"] == trigger:
            excluded.append(payload["identity"])
            continue
        if origin == "given" and payload["identity"] not in counted:
            Ledger(ws.ledger_path).append("approval.add", {"model": name, "version": version, "identity": payload["identity"],
                                                           "key_id": doc["signature"]["key_id"],
                                                           "approval_sha256": approval_digest(doc), "approval": doc})
        counted.setdefault(payload["identity"], {"identity": payload["identity"], "key_id": doc["signature"]["key_id"],
                                                 "reason": payload["reason"], "approval_sha256": approval_digest(doc),
                                                 "approval": doc})
    if len(counted) < needed:
        rule = f"{needed} signed approvals from distinct approvers" if needed > 1 else "a signed approval"
        extra = f"; four-eyes: {', '.join(sorted(set(excluded)))} triggered the run" if excluded else ""
        raise GateRejected(f"{name}/{version} needs {rule}{' other than ' + str(trigger) if needed > 1 else ''} "
                           f"(approvers: {', '.join(policy.approvers) or 'none in the signed policy'}); "
                           f"has {len(counted)}{': ' + ', '.join(counted) if counted else ''}{extra}")
    return list(counted.values())


def promote(ws: Workspace, ref: str, *, reason: str, approvals: Sequence[dict[str, Any]] = (), auto: bool = False) -> dict[str, Any]:
    """Make a gated version the champion: automatically (``auto``, only where the policy lets
    it) or with the signed approvals it needs (recorded ones plus ``approvals``)."""
    name, _, _ = parse_ref(ref)
    try:
        if not reason or not reason.strip():
            raise InvalidInput("a promotion needs --reason")
        with promotion_lock(ws, name):
            mv = resolve(ws, ref)
            version = str(mv.version)
            assert_no_drift(ws, name)
            assert_not_revoked(ws, name=name, version=version)
            evidence = verify_registered_version(ws, mv)
            verdict = evidence["verdict"]
            if not verdict["passed"]:
                raise GateRejected(f"{name}/{version} failed its gate ({', '.join(verdict['failed'])}): it cannot be promoted")
            policy = _signed_policy(ws)
            needed, why_not_auto = approvals_needed(policy, verdict)
            current = mlflow_aliases(ws, name).get(CHAMPION)
            if current == version:
                raise InvalidInput(f"{name}/{version} is already the champion")
            if auto and why_not_auto:
                raise GateRejected(f"{name}/{version} is not promoted automatically ({why_not_auto}); it needs "
                                   f"{needed} signed approval{'s' if needed > 1 else ''} ('mlsec approve')")
            counted = [] if auto else _approvals(ws, policy, name, version, evidence, approvals, needed)
            statistics = _reference_statistics(ws, mv, verdict)
            entry = move_alias(ws, name, CHAMPION, version, reason=reason,
                               approver="policy:auto" if auto else ", ".join(a["identity"] for a in counted),
                               run_id=verdict.get("run_id"), approvals=[{k: a[k] for k in ("identity", "key_id", "approval_sha256")}
                                                                       for a in counted])
            save_reference(ws, name, statistics, data_sha256=verdict["data_sha256"])
            log_promotion_attestation(ws, mv, evidence, policy_sha256=policy.sha256, approvals=[a["approval"] for a in counted],
                                      reason=reason, ledger_seq=entry["seq"], previous=current)
            return {"model": name, "version": version, "alias": CHAMPION, "previous": current,
                    "approvers": [a["identity"] for a in counted] or ["policy:auto"], "ledger_seq": entry["seq"]}
    except PipelineError as err:
        raise Ledger(ws.ledger_path).refusal("promotion.refused", err, model=name, ref=ref, reason=reason, auto=auto) from None


def approve(ws: Workspace, ref: str, *, identity: str, reason: str) -> dict[str, Any]:
    """Sign an approval of a version as ``identity`` (their key on this machine) and record it."""
    name, _, _ = parse_ref(ref)
    try:
        mv = resolve(ws, ref)
        version = str(mv.version)
        evidence = verify_registered_version(ws, mv)
        verdict = evidence["verdict"]
        if not verdict["passed"]:
            raise GateRejected(f"{name}/{version} failed its gate: there is nothing to approve")
        policy = _signed_policy(ws)
        doc = sign_approval(identity, model=name, version=version, verdict_sha256=evidence["verdict_sha256"],
                            weights_sha256=evidence["weights_sha256"], reason=reason)
        verify_approval(doc, policy=policy, model=name, version=version, verdict_sha256=evidence["verdict_sha256"])
        needed, _ = approvals_needed(policy, verdict)
        if needed > 1 and identity == verdict.get("triggered_by"):
            raise GateRejected(f"four-eyes: {identity!r} triggered the run of {name}/{version}; another approver must approve")
        entry = Ledger(ws.ledger_path).append("approval.add", {"model": name, "version": version, "identity": identity,
                                                               "key_id": doc["signature"]["key_id"],
                                                               "approval_sha256": approval_digest(doc), "approval": doc})
        return {"model": name, "version": version, "identity": identity, "needed": needed, "ledger_seq": entry["seq"],
                "approval": doc}
    except PipelineError as err:
        raise Ledger(ws.ledger_path).refusal("approval.refused", err, model=name, ref=ref, identity=identity, reason=reason) from None


def _reference_statistics(ws: Workspace, mv, verdict: dict[str, Any]) -> dict[str, Any]:
    """The data statistics of the version's run, from the validation report whose digest the
    signed verdict names (never an unchecked MLflow artifact)."""
    want = (verdict.get("evidence_sha256") or {}).get("validation")
    if not want:
        raise IntegrityError(f"{mv.name}/{mv.version}: its verdict names no validation report, so its data statistics "
                             "cannot be taken from a signed record")
    raw = download_run_file(ws, mv.run_id, "reports/validation.json")
    if hashlib.sha256(raw).hexdigest() != want:
        raise IntegrityError(f"{mv.name}/{mv.version}: the validation report in MLflow is not the one its verdict names")
    stats = json.loads(raw).get("statistics")
    if not stats:
        raise IntegrityError(f"{mv.name}/{mv.version}: its signed validation report holds no statistics")
    return stats


def rollback(ws: Workspace, name: str, *, reason: str) -> dict[str, Any]:
    """Point ``champion`` back at the version it held before the current one."""
    try:
        if not reason or not reason.strip():
            raise InvalidInput("a rollback needs --reason")
        with promotion_lock(ws, name):
            assert_no_drift(ws, name)
            state, history = ledger_aliases(ws, name)
            current = state.get(CHAMPION)
            if current is None:
                raise InvalidInput(f"{name} has no champion to roll back")
            previous = None
            for move in reversed([h for h in history if h["alias"] == CHAMPION]):
                if move["version"] == current and move.get("previous") and move["previous"] != current:
                    previous = move["previous"]
                    break
            if previous is None:
                raise InvalidInput(f"{name}@champion (version {current}) has no previous champion to roll back to")
            mv = resolve(ws, f"{name}/{previous}")
            verify_registered_version(ws, mv)
            entry = move_alias(ws, name, CHAMPION, previous, reason=f"rollback: {reason}", approver=actor(),
                               run_id=(mv.tags or {}).get("mlsec.run_id"))
            return {"model": name, "alias": CHAMPION, "version": previous, "previous": current, "ledger_seq": entry["seq"]}
    except PipelineError as err:
        raise Ledger(ws.ledger_path).refusal("rollback.refused", err, model=name, reason=reason) from None
