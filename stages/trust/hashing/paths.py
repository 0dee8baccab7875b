"""Safe paths: manifest paths that cannot leave their folder, and a data-folder walk that
refuses symlinks and special files."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath

from stages.core.errors import InvalidInput, SecurityError
from stages.trust.hashing.digests import _kind

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
