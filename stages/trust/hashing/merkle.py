"""The Merkle root over a set of files (scheme ``mlsec.merkle/v1``)."""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any

from stages.core.errors import InvalidInput
from stages.trust.hashing.digests import FileDigest
from stages.trust.hashing.paths import check_relative_path

_HEX64 = re.compile(r"[0-9a-f]{64}")


def _entry(e: Any) -> tuple[str, str, int]:
    if isinstance(e, Mapping):
        path, size, sha = e.get("path"), e.get("size"), e.get("sha256")
    elif isinstance(e, FileDigest):
        path, size, sha = e.path, e.size, e.sha256
    elif isinstance(e, (tuple, list)) and len(e) == 3:
        path, sha, size = e
    else:
        raise InvalidInput(f"Merkle entry must be a mapping, FileDigest or (path, sha256, size), got {e!r}")
    check_relative_path(path)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidInput(f"Merkle entry {path!r}: size must be a non-negative int, got {size!r}")
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        raise InvalidInput(f"Merkle entry {path!r}: sha256 must be 64 lowercase hex digits, got {sha!r}")
    return path, sha, size


def merkle_leaf(path: str, sha256: str, size: int) -> bytes:
    """The 32-byte leaf hash of one entry (see :func:`merkle_root`)."""
    p = path.encode("utf-8")
    return hashlib.sha256(b"\x00" + struct.pack(">Q", len(p)) + p + struct.pack(">Q", size)
                          + bytes.fromhex(sha256)).digest()


def merkle_root(entries: Iterable[Mapping[str, Any] | FileDigest | tuple[str, str, int]]) -> str:
    """Merkle root (lowercase hex SHA-256) of a set of files.

    Each entry is ``{"path": relpath, "sha256": hex, "size": int}`` (or a :class:`FileDigest`
    with a relative ``path``, or a ``(path, sha256, size)`` tuple).

    Scheme (``mlsec.merkle/v1``):

    * entries are sorted by the UTF-8 bytes of their relative path; duplicate paths and
      paths refused by :func:`check_relative_path` raise;
    * leaf = SHA-256(``0x00`` || u64be(len(path)) || path UTF-8 || u64be(size) || 32-byte digest);
      the length prefix makes the encoding injective (no two entries share leaf bytes);
    * node = SHA-256(``0x01`` || left || right), pairing neighbours level by level; the last
      node of an odd-sized level is promoted unchanged to the next level;
    * one entry: the root is its leaf; no entries: SHA-256(``0x02``).

    The distinct prefixes separate domains: a leaf can never be reinterpreted as an inner
    node (or the empty root), which blocks second-preimage tricks that pass off an inner
    node's 64 bytes as a file. Any edit, rename, addition or removal changes the root.
    """
    items = sorted((_entry(e) for e in entries), key=lambda t: t[0].encode("utf-8"))
    for a, b in zip(items, items[1:]):
        if a[0] == b[0]:
            raise InvalidInput(f"Merkle entries list path {a[0]!r} twice")
    if not items:
        return hashlib.sha256(b"\x02").hexdigest()
    level = [merkle_leaf(*t) for t in items]
    while len(level) > 1:
        nxt = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0].hex()
