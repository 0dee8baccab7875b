"""File digests: SHA-256 of one file, streamed, and of many files on parallel threads.

Every file is opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat``: a symlink,
FIFO, socket or device in place of a data file raises :class:`SecurityError` instead of
being followed, read forever or blocked on. Pure standard library.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from stages.core.errors import InvalidInput, SecurityError

DEFAULT_CHUNK = 1 << 20  # bytes per read; large enough that syscalls and copies are noise
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_FADV_SEQUENTIAL = getattr(os, "POSIX_FADV_SEQUENTIAL", None)
T = TypeVar("T")
R = TypeVar("R")


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


def _open_regular(path: str | os.PathLike[str], verb: str) -> tuple[int, os.stat_result]:
    """An fd of a regular file opened without following symlinks (the caller closes it), and its fstat."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SecurityError(f"refusing to {verb} {os.fspath(path)}: it is a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecurityError(f"refusing to {verb} {os.fspath(path)}: it is {_kind(st.st_mode)}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _read(path: str | os.PathLike[str], chunk_size: int) -> _Read:
    """Hash one regular file through a reusable buffer; refuse symlinks and special files."""
    if chunk_size < 4096:
        raise InvalidInput(f"chunk_size must be at least 4096 bytes, got {chunk_size}")
    started = time.time_ns()
    fd, st = _open_regular(path, "hash")
    try:
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


def read_file(path: str | os.PathLike[str]) -> tuple[bytes, str]:
    """The bytes of a regular file and their SHA-256 (lowercase hex), from one read.

    Callers check the digest and then parse these same bytes, so nothing can swap the file
    between the check and the use. Opened like :func:`sha256_file`: a symlink or special
    file raises :class:`SecurityError`.
    """
    fd, _ = _open_regular(path, "read")
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
    finally:
        os.close(fd)
    return data, hashlib.sha256(data).hexdigest()


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
