"""Signed approvals: a person's statement, signed with their identity key, that one model
version (named with the digest of its signed gate verdict) may become the champion.

An approval is a signed document (``stages.trust.signing``) whose payload is::

    {"schema": "mlsec.approval/v1", "model": "mlsec-digits", "version": "3",
     "verdict_sha256": "...", "weights_sha256": "...", "identity": "alice",
     "reason": "reviewed the card", "approved_at": "2024-05-01T12:00:00Z"}

It counts only when the signed policy lists the identity as an approver and the signature
was made with the key the policy pinned for them; it is about exactly one version and one
verdict, so it cannot be replayed onto another. What counts how (four-eyes, the run's
trigger) is decided in ``stages.models.promotion``.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from stages.core.canonical import canonical_json
from stages.core.errors import GateRejected, IntegrityError, InvalidInput
from stages.trust.identities import check_identity_name, identity_signer, local_identities
from stages.trust.policy import SignedPolicy
from stages.trust.signing import sign_document, verify_document

APPROVAL_SCHEMA = "mlsec.approval/v1"


def approval_digest(doc: dict[str, Any]) -> str:
    """SHA-256 of a signed approval's canonical JSON (how the ledger and attestation name it)."""
    return hashlib.sha256(canonical_json(doc)).hexdigest()


def sign_approval(identity: str, *, model: str, version: str, verdict_sha256: str, weights_sha256: str,
                  reason: str) -> dict[str, Any]:
    """An approval signed with ``identity``'s key on this machine."""
    check_identity_name(identity)
    if not reason or not reason.strip():
        raise InvalidInput("an approval needs --reason")
    payload = {"schema": APPROVAL_SCHEMA, "model": model, "version": str(version), "verdict_sha256": verdict_sha256,
               "weights_sha256": weights_sha256, "identity": identity, "reason": reason.strip(),
               "approved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return sign_document(payload, signer=identity_signer(identity))


def verify_approval(doc: Any, *, policy: SignedPolicy, model: str, version: str, verdict_sha256: str) -> dict[str, Any]:
    """The payload of an approval that counts for ``model``/``version``, or an error.

    ``IntegrityError`` (exit 4): malformed, signed by a key neither the policy nor this key
    folder knows, signed with another identity's key, or about another version or verdict.
    ``GateRejected`` (exit 3): a known identity that the signed policy does not let approve.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("payload"), dict) or not isinstance(doc.get("signature"), dict):
        raise IntegrityError("malformed approval: expected a signed document with 'payload' and 'signature'")
    payload, key_id = doc["payload"], str(doc["signature"].get("key_id", ""))
    claimed = payload.get("identity")
    if payload.get("schema") != APPROVAL_SCHEMA:
        raise IntegrityError(f"malformed approval: unknown schema {payload.get('schema')!r}")
    pinned = policy.approver_keys()
    owner = next((name for name, (kid, _) in pinned.items() if kid == key_id), None)
    if owner is None:
        known = {kid: name for name, kid in local_identities().items()}
        if key_id in known and known[key_id] == claimed:
            raise GateRejected(f"identity {claimed!r} may not approve under the signed policy "
                               f"(approvers: {', '.join(policy.approvers) or 'none'})")
        raise IntegrityError(f"approval for {claimed!r} is signed by unknown key {key_id[:16]}: neither the signed "
                             "policy nor this key folder holds it")
    if owner != claimed:
        raise IntegrityError(f"approval claims identity {claimed!r} but is signed with the key of {owner!r}")
    verify_document(doc, keys={pinned[owner][0]: pinned[owner][1]})
    if payload.get("model") != model or str(payload.get("version")) != str(version):
        raise IntegrityError(f"approval by {owner!r} is for {payload.get('model')}/{payload.get('version')}, "
                             f"not for {model}/{version}")
    if payload.get("verdict_sha256") != verdict_sha256:
        raise IntegrityError(f"approval by {owner!r} is for another gate verdict of {model}/{version} "
                             f"({str(payload.get('verdict_sha256'))[:16]}..., registered {verdict_sha256[:16]}...)")
    return payload
