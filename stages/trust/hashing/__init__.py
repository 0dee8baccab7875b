"""The hashing core of the provenance chain: file digests, a Merkle root, a safe folder walk,
and a stat cache for fast re-verification. Pure standard library; no torch, no numpy.

    digests.py    SHA-256 of a file (streamed) and of many files (threads)
    paths.py      manifest paths that cannot escape; a walk that refuses symlinks
    merkle.py     the Merkle root over (path, size, SHA-256) entries
    statcache.py  the stat cache and ``verify_files``
"""

from stages.trust.hashing.digests import FileDigest, hash_files, read_file, sha256_file
from stages.trust.hashing.merkle import merkle_leaf, merkle_root
from stages.trust.hashing.paths import check_relative_path, safe_files
from stages.trust.hashing.statcache import StatCache, VerifyResult, verify_files

__all__ = [
    "FileDigest",
    "StatCache",
    "VerifyResult",
    "check_relative_path",
    "hash_files",
    "merkle_leaf",
    "merkle_root",
    "read_file",
    "safe_files",
    "sha256_file",
    "verify_files",
]
