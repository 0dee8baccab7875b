"""The hashing core of the provenance chain: file digests, a Merkle root, a safe folder walk,
and a stat cache for fast re-verification.

Pure standard library (``hashlib``, ``os``, threads); no torch, no numpy.

Trust model
-----------
* Every file is opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat``: a symlink,
  FIFO, socket or device in place of a data file raises :class:`SecurityError` instead of
  being followed, read forever or blocked on.
* :func:`safe_files` refuses symlinks and special files anywhere under a data folder, and
  :func:`check_relative_path` refuses manifest paths that could leave their folder.
* :class:`StatCache` trusts ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)`` as a proxy
  for content. ``ctime`` cannot be set by a user, so ``touch -d`` with the old mtime, or
  ``os.utime`` after an edit, still changes the key. A file whose ctime is within
  ``racy_window_s`` of the moment it was read is not cached (the "racily clean" problem: an
  edit in the same timestamp tick would keep the key). The cache is only as trustworthy as
  the folder it is stored in (give it a ``key`` to MAC it); ``paranoid=True`` ignores it.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import re
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from stages.errors import InvalidInput, SecurityError

__all__ = [
    "FileDigest",
    "StatCache",
    "VerifyResult",
    "check_relative_path",
    "hash_files",
    "merkle_root",
    "safe_files",
    "sha256_file",
    "verify_files",
]

DEFAULT_CHUNK = 1 << 20  # bytes per read; large enough that syscalls and copies are noise
_HEX64 = re.compile(r"[0-9a-f]{64}")
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_FADV_SEQUENTIAL = getattr(os, "POSIX_FADV_SEQUENTIAL", None)

T = TypeVar("T")
R = TypeVar("R")


# -- single files -------------------------------------------------------------------------
@dataclass(frozen=True)
class FileDigest:
    """A file's SHA-256 (lowercase hex) and its size in bytes, as read."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class _Read:
    sha256: str
    size: int
    st: os.stat_result  # fstat of the open file before reading
    started_ns: int  # wall clock just before open
    stable: bool  # the fstat key did not change while reading


_local = threading.local()


def _buffer(chunk_size: int) -> memoryview:
    """A per-thread reusable read buffer of ``chunk_size`` bytes."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) != chunk_size:
        buf = memoryview(bytearray(chunk_size))
        _local.buf = buf
    return buf


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read(path: str | os.PathLike[str], chunk_size: int) -> _Read:
    """Hash one regular file through a reusable buffer; refuse symlinks and special files."""
    if chunk_size < 4096:
        raise InvalidInput(f"chunk_size must be at least 4096 bytes, got {chunk_size}")
    started = time.time_ns()
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SecurityError(f"refusing to hash {os.fspath(path)}: it is a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecurityError(f"refusing to hash {os.fspath(path)}: it is {_kind(st.st_mode)}")
        buf = _buffer(chunk_size)
        if st.st_size > chunk_size and _FADV_SEQUENTIAL is not None:
            os.posix_fadvise(fd, 0, 0, _FADV_SEQUENTIAL)
        h = hashlib.sha256()
        size = 0
        readv, update = os.readv, h.update
        n = readv(fd, [buf])
        while n:
            update(buf[:n])  # hashlib releases the GIL for updates over 2 KiB
            size += n
            n = readv(fd, [buf])
        stable = _key(os.fstat(fd)) == _key(st) and size == st.st_size
    finally:
        os.close(fd)
    return _Read(h.hexdigest(), size, st, started, stable)


def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = DEFAULT_CHUNK) -> str:
    """Lowercase hex SHA-256 of a regular file, streamed in ``chunk_size``-byte reads.

    Raises :class:`SecurityError` if ``path`` is a symlink, FIFO, socket or device
    (the file is opened with ``O_NOFOLLOW | O_NONBLOCK``; nothing blocks or is followed).
    """
    return _read(path, chunk_size).sha256


# -- many files ------------------------------------------------------------------------------
def _workers(workers: int, n: int) -> int:
    if workers < 0:
        raise InvalidInput(f"workers must be >= 0 (0 = one per core), got {workers}")
    if workers == 0:
        try:
            workers = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            workers = os.cpu_count() or 1
    return max(1, min(workers, n))


def _parallel(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``[fn(x) for x in items]`` on ``workers`` threads pulling from one shared index.

    One long-lived task per thread (not one future per file) keeps the per-file overhead
    at a lock and a list store. The first exception stops the others and is re-raised.
    """
    n = len(items)
    workers = _workers(workers, n)
    if workers == 1:
        return [fn(x) for x in items]
    out: list[Any] = [None] * n
    lock = threading.Lock()
    stop = threading.Event()
    nxt = [0]

    def work() -> None:
        while not stop.is_set():
            with lock:
                i = nxt[0]
                nxt[0] = i + 1
            if i >= n:
                return
            try:
                out[i] = fn(items[i])
            except BaseException:
                stop.set()
                raise

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sha256") as pool:
        futures = [pool.submit(work) for _ in range(workers)]
    for f in futures:
        f.result()
    return out


def hash_files(paths: Iterable[str | os.PathLike[str]], *, workers: int = 0,
               chunk_size: int = DEFAULT_CHUNK) -> dict[str, FileDigest]:
    """SHA-256 of many files in parallel; returns ``{str(path): FileDigest}``.

    ``workers`` threads (0 = one per available core) share the list; hashlib releases the GIL
    while hashing, so files are hashed concurrently. The result does not depend on the order
    of ``paths`` or on ``workers``. A single file is never split (SHA-256 is sequential).
    Raises :class:`SecurityError` for a symlink or special file, ``OSError`` if unreadable.
    """
    keys = list(dict.fromkeys(os.fspath(p) for p in paths))
    reads = _parallel(lambda p: _read(p, chunk_size), keys, workers)
    return {p: FileDigest(p, r.sha256, r.size) for p, r in zip(keys, reads)}


# -- paths -----------------------------------------------------------------------------------
# One component: no "/", backslash, control character or lone surrogate (undecodable byte).
_NAME = r"[^/\\\x00-\x1f\x7f\ud800-\udfff]+"
_SAFE_REL = re.compile(rf"(?:{_NAME}/)*{_NAME}")


def _is_safe_rel(rel: str) -> bool:
    """Fast path of :func:`check_relative_path` (one regex and two substring tests)."""
    if not _SAFE_REL.fullmatch(rel):
        return False
    s = f"/{rel}/"
    return "/./" not in s and "/../" not in s


def check_relative_path(rel: str) -> PurePosixPath:
    """Check a relative POSIX path read from a manifest; return it as a ``PurePosixPath``.

    Rejected (:class:`SecurityError`): empty or absolute paths, ``..``, ``.`` and empty
    components (``a//b``, trailing ``/``), backslashes, NUL and other control characters,
    and names that are not valid UTF-8 (so every accepted path has one canonical spelling).
    """
    if isinstance(rel, str) and _is_safe_rel(rel):
        return PurePosixPath(rel)
    if not isinstance(rel, str):
        raise SecurityError(f"unsafe path {rel!r}: expected a string, got {type(rel).__name__}")
    if not rel:
        raise SecurityError("unsafe path '': the path is empty")
    if rel.startswith("/"):
        raise SecurityError(f"unsafe path {rel!r}: absolute paths are not allowed")
    if "\\" in rel:
        raise SecurityError(f"unsafe path {rel!r}: backslashes are not allowed")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in rel):
        raise SecurityError(f"unsafe path {rel!r}: NUL and control characters are not allowed")
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            raise SecurityError(f"unsafe path {rel!r}: component {part!r} is not allowed")
    raise SecurityError(f"unsafe path {rel!r}: the name is not valid UTF-8")


def _walk(root: str | os.PathLike[str], *, follow: bool) -> list[tuple[str, str]]:
    """``[(relpath, path)]`` of the regular files under ``root``, sorted by relpath.

    Without ``follow`` any symlink is refused; with it, a symlink is followed only if its
    target resolves inside ``root`` (and each real directory is visited once).
    """
    root_s = os.fspath(root)
    try:
        st = os.lstat(root_s)
    except FileNotFoundError:
        raise InvalidInput(f"data folder {root_s} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        if not follow:
            raise SecurityError(f"refusing data folder {root_s}: it is a symlink to {os.readlink(root_s)}")
        st = os.stat(root_s)
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidInput(f"data folder {root_s} is {_kind(st.st_mode)}, expected a directory")
    real_root = os.path.realpath(root_s)
    seen = {(st.st_dev, st.st_ino)}
    out: list[tuple[str, str]] = []
    stack = [("", root_s)]
    while stack:
        prefix, folder = stack.pop()
        with os.scandir(folder) as it:
            for entry in it:
                rel = prefix + entry.name
                if not _is_safe_rel(entry.name):
                    check_relative_path(rel)  # raises with the reason
                if entry.is_symlink():
                    target = os.readlink(entry.path)
                    if not follow:
                        raise SecurityError(f"refusing symlink {entry.path} -> {target} in data folder {root_s}")
                    real = os.path.realpath(entry.path)
                    if os.path.commonpath([real_root, real]) != real_root:
                        raise SecurityError(f"symlink {entry.path} -> {target} leaves data folder {root_s}")
                    try:
                        tst = os.stat(real)
                    except FileNotFoundError:
                        raise SecurityError(f"symlink {entry.path} -> {target} is dangling") from None
                    if stat.S_ISDIR(tst.st_mode):
                        if (tst.st_dev, tst.st_ino) not in seen:
                            seen.add((tst.st_dev, tst.st_ino))
                            stack.append((rel + "/", entry.path))
                    elif stat.S_ISREG(tst.st_mode):
                        out.append((rel, entry.path))
                    else:
                        raise SecurityError(f"symlink {entry.path} -> {target} points to {_kind(tst.st_mode)}")
                elif entry.is_dir(follow_symlinks=False):
                    dst = entry.stat(follow_symlinks=False)
                    seen.add((dst.st_dev, dst.st_ino))
                    stack.append((rel + "/", entry.path))
                elif entry.is_file(follow_symlinks=False):
                    out.append((rel, entry.path))
                else:
                    mode = entry.stat(follow_symlinks=False).st_mode
                    raise SecurityError(f"refusing {entry.path} in data folder {root_s}: it is {_kind(mode)}")
    out.sort(key=lambda t: t[0])  # code-point order == UTF-8 byte order, the Merkle order
    return out


def safe_files(root: str | os.PathLike[str], *, follow: bool = False) -> list[Path]:
    """Regular files under data folder ``root``, sorted by relative path.

    Raises :class:`SecurityError` (one line naming the path) for a symlink (with
    ``follow=True``: only for one that leaves ``root``, dangles or points to a special file),
    a FIFO, socket or device, a ``root`` that is itself a symlink (unless ``follow``), or a
    name that :func:`check_relative_path` rejects. Raises :class:`InvalidInput` if ``root``
    is missing or not a directory.
    """
    return [Path(p) for _, p in _walk(root, follow=follow)]


# -- Merkle root ----------------------------------------------------------------------------
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


# -- stat cache -------------------------------------------------------------------------------
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


# -- verification -------------------------------------------------------------------------------
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
