"""Fast re-verification: a stat cache, and ``verify_files`` that re-hashes only what changed.

:class:`StatCache` trusts ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)`` as a proxy
for content. ``ctime`` cannot be set by a user, so ``touch -d`` with the old mtime, or
``os.utime`` after an edit, still changes the key. A file whose ctime is within
``racy_window_s`` of the moment it was read is not cached (the "racily clean" problem: an
edit in the same timestamp tick would keep the key). The cache is only as trustworthy as
the folder it is stored in (give it a ``key`` to MAC it); ``paranoid=True`` ignores it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core.errors import InvalidInput
from stages.trust.hashing.digests import (
    _OPEN_FLAGS,
    DEFAULT_CHUNK,
    _key,
    _parallel,
    _read,
)
from stages.trust.hashing.paths import _walk, check_relative_path

_HEX64 = re.compile(r"[0-9a-f]{64}")


class StatCache:
    """Maps a file's stat key to its SHA-256 so unchanged files need not be re-read.

    Key per absolute path: ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``. Stored as
    one JSON file written atomically (temporary file + ``os.replace``, mode 0600). A missing,
    unreadable, malformed or (with ``key``) wrongly MAC'd file loads as an empty cache:
    the cost is a re-hash, never a wrong verdict taken from a damaged file.

    Parameters
    ----------
    path : where the cache lives.
    key : optional secret; if given, the file carries an HMAC-SHA256 and is ignored when
        it does not match (protects against someone who can write the cache but not the key).
    racy_window_s : files whose ctime is less than this many seconds before they were read
        are not cached, because a write in the same timestamp tick would keep the stat key.
        2 s covers filesystems with 1 s timestamps.
    """

    FORMAT = "mlsec.statcache/v1"

    def __init__(self, path: str | os.PathLike[str], *, key: bytes | None = None, racy_window_s: float = 2.0) -> None:
        if not racy_window_s >= 0:
            raise InvalidInput(f"racy_window_s must be >= 0 seconds, got {racy_window_s}")
        self.path = Path(path)
        self._mac_key = key
        self.racy_ns = int(racy_window_s * 1e9)
        self._entries: dict[str, tuple[tuple[int, int, int, int, int], str]] = {}
        self._dirty = False
        self._load()

    def __len__(self) -> int:
        return len(self._entries)

    def _mac(self, entries: Any) -> str:
        assert self._mac_key is not None
        # the cache's own JSON, not RFC 8785: its nanosecond stat times exceed I-JSON's integer range,
        # and this MAC is checked only by this class, never as a record
        body = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self._mac_key, body, hashlib.sha256).hexdigest()

    def _read_file(self) -> bytes:
        """The cache file's bytes; refuses (OSError) a symlink, FIFO or device planted there."""
        fd = os.open(self.path, _OPEN_FLAGS)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{self.path} is not a regular file")
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read()
        finally:
            os.close(fd)

    def _load(self) -> None:
        try:
            doc = json.loads(self._read_file())
            if not isinstance(doc, dict) or doc.get("format") != self.FORMAT or not isinstance(doc.get("entries"), dict):
                return
            raw = doc["entries"]
            if self._mac_key is not None:
                mac = doc.get("mac")
                if not isinstance(mac, str) or not hmac.compare_digest(mac, self._mac(raw)):
                    return
            entries = {}
            for p, v in raw.items():
                if not (isinstance(v, list) and len(v) == 6 and isinstance(v[5], str) and _HEX64.fullmatch(v[5])
                        and all(type(x) is int for x in v[:5])):
                    return
                entries[p] = ((v[0], v[1], v[2], v[3], v[4]), v[5])
        except (OSError, ValueError, TypeError, RecursionError):
            return
        self._entries = entries

    def get(self, path: str | os.PathLike[str], st: os.stat_result) -> str | None:
        """The cached SHA-256 of ``path`` if its stat key still matches ``st``, else None."""
        return self._get_abs(os.path.abspath(path), st)

    def _get_abs(self, path: str, st: os.stat_result) -> str | None:
        hit = self._entries.get(path)
        if hit is not None and hit[0] == _key(st):
            return hit[1]
        return None

    def put(self, path: str | os.PathLike[str], st: os.stat_result, sha256: str, *, read_started_ns: int) -> bool:
        """Remember ``sha256`` for ``path`` with stat ``st`` taken before reading began at
        ``read_started_ns`` (wall clock). Returns False (and caches nothing) if the file is
        racily new: its ctime is within ``racy_window_s`` of ``read_started_ns``."""
        p = os.path.abspath(path)
        if st.st_ctime_ns > read_started_ns - self.racy_ns:
            if self._entries.pop(p, None) is not None:
                self._dirty = True
            return False
        entry = (_key(st), sha256)
        if self._entries.get(p) != entry:
            self._entries[p] = entry
            self._dirty = True
        return True

    def save(self) -> None:
        """Write the cache atomically if anything changed."""
        if not self._dirty:
            return
        raw = {p: [*k, s] for p, (k, s) in self._entries.items()}
        doc: dict[str, Any] = {"format": self.FORMAT, "entries": raw}
        if self._mac_key is not None:
            doc["mac"] = self._mac(raw)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._dirty = False


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_files`.

    ``mismatches``: ``(relpath, expected_sha256, actual)`` sorted by relpath, where ``actual``
    is the SHA-256 read, ``"missing"``, or ``"unexpected file"`` (then expected is
    ``"absent"``). ``checked``: files expected; ``rehashed``: files actually read.
    """

    mismatches: tuple[tuple[str, str, str], ...]
    checked: int
    rehashed: int

    @property
    def ok(self) -> bool:
        return not self.mismatches


def verify_files(root: str | os.PathLike[str], expected: Mapping[str, tuple[str, int]], *,
                 cache: StatCache | None = None, paranoid: bool = False, workers: int = 0,
                 allow_extra: bool = False) -> VerifyResult:
    """Check the files under ``root`` against ``expected = {relpath: (sha256, size)}``.

    Files whose stat key matches ``cache`` are not read (unless ``paranoid``); all others are
    re-hashed on ``workers`` threads and, when their stat key is stable and not racy, added
    to ``cache`` (call ``cache.save()`` to persist). Files under ``root`` that are not in
    ``expected`` are mismatches unless ``allow_extra``. Raises :class:`SecurityError` for a
    symlink, special file or unsafe path under ``root`` or in ``expected``.
    """
    root_s = os.path.abspath(root)  # walked paths are then absolute: the cache keys as-is
    present = dict(_walk(root_s, follow=False))
    mismatches: list[tuple[str, str, str]] = []
    todo: list[tuple[str, str, str]] = []  # (relpath, path, expected sha)
    use_cache = cache is not None and not paranoid
    for rel, (want, size) in expected.items():
        path = present.get(rel)  # a walked path was checked by _walk
        if path is None:
            check_relative_path(rel)
            mismatches.append((rel, want, "missing"))
            continue
        if use_cache and size is not None:
            st = os.lstat(path)
            if st.st_size == size:
                hit = cache._get_abs(path, st)  # type: ignore[union-attr]
                if hit is not None:
                    if hit != want:
                        mismatches.append((rel, want, hit))
                    continue
        todo.append((rel, path, want))

    def check(item: tuple[str, str, str]) -> tuple[str, str, str] | None:
        rel, path, want = item
        try:
            r = _read(path, DEFAULT_CHUNK)
        except FileNotFoundError:
            return (rel, want, "missing")
        if cache is not None and r.stable:
            cache.put(path, r.st, r.sha256, read_started_ns=r.started_ns)
        size = expected[rel][1]
        if r.sha256 != want or (size is not None and r.size != size):
            return (rel, want, r.sha256)
        return None

    mismatches.extend(m for m in _parallel(check, todo, workers) if m is not None)
    if not allow_extra:
        mismatches.extend((rel, "absent", "unexpected file") for rel in present.keys() - expected.keys())
    mismatches.sort()
    return VerifyResult(tuple(mismatches), len(expected), len(todo))
