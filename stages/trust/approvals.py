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
from stages.core.errors import IntegrityError, InvalidInput
from stages.trust.identities import check_identity_name, identity_signer, local_identities
from stages.trust.policy import SignedPolicy, authorised_key
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
    ``GateRejected`` (exit 3): a known identity that the signed policy does not let approve
    (not listed, or with another key than the pinned one): ``stages.trust.policy.authorised_key``.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("payload"), dict) or not isinstance(doc.get("signature"), dict):
        raise IntegrityError("malformed approval: expected a signed document with 'payload' and 'signature'")
    payload, key_id = doc["payload"], str(doc["signature"].get("key_id", ""))
    claimed = payload.get("identity")
    if payload.get("schema") != APPROVAL_SCHEMA:
        raise IntegrityError(f"malformed approval: unknown schema {payload.get('schema')!r}")
    vouched = local_identities().get(str(claimed)) == key_id     # this key folder ties the key to the name
    key = authorised_key(policy, "approvers", claimed=str(claimed), key_id=key_id, vouched=vouched, what="approval")
    verify_document(doc, keys={key_id: key})
    if payload.get("model") != model or str(payload.get("version")) != str(version):
        raise IntegrityError(f"approval by {claimed!r} is for {payload.get('model')}/{payload.get('version')}, "
                             f"not for {model}/{version}")
    if payload.get("verdict_sha256") != verdict_sha256:
        raise IntegrityError(f"approval by {claimed!r} is for another gate verdict of {model}/{version} "
                             f"({str(payload.get('verdict_sha256'))[:16]}..., registered {verdict_sha256[:16]}...)")
    return payload
