"""Signed gate verdicts: the artifact registration and loading require.

A verdict (schema ``mlsec.verdict/v1``) is a signed document that blesses (``BLESSED``) or
refuses (``NOT_BLESSED``) exactly one set of weights, named by their SHA-256.
"""

from __future__ import annotations

import hashlib
from typing import Any

from stages.core.canonical import canonical_json
from stages.core.errors import IntegrityError
from stages.trust.signing import verify_document

VERDICT_SCHEMA = "mlsec.verdict/v1"


def verdict_digest(doc: dict[str, Any]) -> str:
    """SHA-256 of a signed verdict's canonical JSON: how approvals, the ledger and the registry
    name one verdict, whatever whitespace a copy of the file has."""
    return hashlib.sha256(canonical_json(doc)).hexdigest()


def load_verdict(doc: dict[str, Any], *, weights_sha256: str) -> dict[str, Any]:
    """Verify a signed verdict and that it is about exactly these weights; return its payload."""
    verdict = verify_document(doc)
    if verdict.get("schema") != VERDICT_SCHEMA:
        raise IntegrityError("verdict has an unknown schema")
    if verdict.get("weights_sha256") != weights_sha256:
        raise IntegrityError(f"verdict is for weights {str(verdict.get('weights_sha256'))[:16]}..., not {weights_sha256[:16]}...")
    return verdict
