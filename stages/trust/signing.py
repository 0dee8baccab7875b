"""Signatures over records: signed JSON documents and DSSE envelopes, with the keys of
``stages.trust.keys``.

A signed document is ``{"payload": obj, "signature": {"alg": "ed25519", "key_id", "sig"}}``;
the signature covers the RFC 8785 canonical JSON of the payload. A DSSE envelope
(``securesystemslib.dsse``: the envelope format and its pre-authentication encoding) carries
in-toto statements. Verification accepts the current key and every key in ``trusted/``;
anything else is refused with ``IntegrityError`` (exit 4).
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from securesystemslib.dsse import Envelope, Signature

from stages.core.canonical import canonical_json
from stages.core.errors import IntegrityError, InvalidInput
from stages.trust.keys import PublicKey, Signer, load_signer, short_id, trusted_keys

MAX_ENVELOPE_PAYLOAD = 16 * 1024 * 1024  # bytes of a DSSE payload


def verify_signature(data: bytes, sig_b64: str, *, key_id: str, keys: Mapping[str, PublicKey] | None = None) -> None:
    """Check an Ed25519 signature by a trusted key; raise ``IntegrityError`` otherwise.

    ``keys`` (key id -> public key) narrows or widens who may have signed; the default is
    the pipeline's keys (``trusted_keys()``).
    """
    if not isinstance(key_id, str) or not key_id:
        raise IntegrityError("signature names no key id")
    key = (trusted_keys() if keys is None else keys).get(key_id)
    if key is None:
        raise IntegrityError(f"signed by unknown key {short_id(key_id)}")
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise IntegrityError(f"key {short_id(key_id)} is not an Ed25519 document key")
    try:
        sig = base64.b64decode(sig_b64, validate=True)
        key.verify(sig, bytes(data))
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        raise IntegrityError(f"bad signature by key {short_id(key_id)}") from None


def sign_document(obj: dict, *, signer: Signer | None = None) -> dict:
    """Wrap ``obj`` as ``{"payload": obj, "signature": {alg, key_id, sig}}``.

    ``signer``: the pipeline's document key by default; an identity or the policy owner's key
    for approvals and policies (``stages.trust.identities``).
    """
    if not isinstance(obj, dict):
        raise InvalidInput(f"only a dict can be signed as a document, got {type(obj).__name__}")
    signer = signer or load_signer()
    sig = signer.sign(canonical_json(obj))
    return {"payload": obj, "signature": {"alg": "ed25519", "key_id": signer.key_id, "sig": sig}}


def verify_document(doc: dict, *, keys: Mapping[str, PublicKey] | None = None) -> dict:
    """Return the payload of a signed document, or raise ``IntegrityError``.

    ``keys``: who may have signed it (default: the pipeline's keys, ``trusted_keys()``).
    """
    if not isinstance(doc, dict) or set(doc) != {"payload", "signature"}:
        raise IntegrityError("malformed signed document: expected exactly 'payload' and 'signature'")
    sig, payload = doc["signature"], doc["payload"]
    if not isinstance(sig, dict) or not isinstance(payload, dict):
        raise IntegrityError("malformed signed document: payload and signature must be objects")
    if sig.get("alg") != "ed25519":
        raise IntegrityError(f"signed document uses unsupported algorithm {sig.get('alg')!r}")
    if not isinstance(sig.get("key_id"), str) or not isinstance(sig.get("sig"), str):
        raise IntegrityError("malformed signed document: key_id and sig must be strings")
    try:
        data = canonical_json(payload)
    except InvalidInput as exc:
        raise IntegrityError(f"signed document payload is not canonical JSON: {exc}") from None
    verify_signature(data, sig["sig"], key_id=sig["key_id"], keys=keys)
    return payload


def derive_secret(label: bytes) -> bytes:
    """A 32-byte secret for ``label`` derived from the pipeline's signing key (Ed25519
    signatures are deterministic): whoever cannot use the key cannot compute it. Seals the
    stat cache and training checkpoints; never stored or logged."""
    return hashlib.sha256(load_signer().sign(label).encode()).digest()


def sign_envelope(payload: bytes, *, payload_type: str) -> dict[str, Any]:
    """A DSSE envelope over ``payload``, signed with the pipeline's Ed25519 key."""
    signer = load_signer()
    envelope = Envelope(payload=payload, payload_type=payload_type, signatures={})
    signature = Signature(keyid=signer.key_id, sig=base64.b64decode(signer.sign(envelope.pae())).hex())
    envelope.signatures[signature.keyid] = signature
    return envelope.to_dict()


def verify_envelope(envelope: Any, *, payload_type: str, what: str = "envelope") -> bytes:
    """The payload of a DSSE envelope, or ``IntegrityError``.

    At least one signature must be by a trusted key, and every signature by a trusted key
    must be valid (one bad signature is a forgery attempt, not noise).
    """

    if not isinstance(envelope, dict):
        raise IntegrityError(f"malformed {what}: not a DSSE envelope")
    if envelope.get("payloadType") != payload_type:
        raise IntegrityError(f"{what} payloadType {envelope.get('payloadType')!r} is not {payload_type}")
    if not isinstance(envelope.get("payload"), str) or len(envelope["payload"]) > MAX_ENVELOPE_PAYLOAD * 4 // 3 + 4:
        raise IntegrityError(f"malformed {what}: payload missing or too large")
    sigs = envelope.get("signatures")
    if not isinstance(sigs, list) or not sigs or not all(isinstance(s, dict) for s in sigs):
        raise IntegrityError(f"{what} carries no signatures")
    try:
        parsed = Envelope.from_dict(copy.deepcopy(envelope))  # from_dict consumes its input
    except Exception:  # noqa: BLE001 - KeyError, FormatError, binascii.Error, ...
        raise IntegrityError(f"malformed {what}: fields missing or not base64") from None
    trusted = trusted_keys()
    pae = parsed.pae()
    verified, unknown = 0, []
    for s in sigs:
        kid = s.get("keyid")
        if not isinstance(kid, str) or kid not in trusted:
            unknown.append(short_id(str(kid)))
            continue
        verify_signature(pae, s.get("sig", ""), key_id=kid)  # raises on a bad signature
        verified += 1
    if not verified:
        raise IntegrityError(f"{what} signed by unknown key {', '.join(unknown)}")
    return parsed.payload
