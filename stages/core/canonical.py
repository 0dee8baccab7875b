"""One canonical JSON for everything that is hashed or signed: RFC 8785 (JSON
Canonicalization Scheme, the ``rfc8785`` package).

Ledger entries, signed documents, DSSE payloads and statement digests all use these bytes,
so one record always hashes the same way wherever it is checked.
"""

from __future__ import annotations

import json
import math
from typing import Any

import rfc8785

from stages.core.errors import InvalidInput


def canonical_json(obj: Any) -> bytes:
    """RFC 8785 bytes of a JSON value (sorted keys, no spaces, UTF-8, ECMAScript numbers).

    Raises ``InvalidInput`` for what JSON cannot carry exactly: NaN, infinities, integers
    beyond 2**53, non-string keys and non-JSON types.
    """
    try:
        return rfc8785.dumps(obj)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise InvalidInput(f"value cannot be written as canonical JSON: {exc}") from None


def jsonable(obj: Any) -> Any:
    """A plain JSON value for a record: paths and other objects as text, NaN/inf as text.

    Used where a record takes what a caller hands it (ledger payloads); signed documents
    are built from plain values and go to :func:`canonical_json` directly.
    """
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(json.loads(json.dumps(obj, default=str)))
