"""Unsafe-file scanning of model folders: an allow-list of formats.

Anything that can carry pickle is refused whatever fickling says (we never load pickle from
outside); fickling's verdict only makes the message useful. Every failure is one line
naming the file (``SecurityError``, exit 4).
"""

from __future__ import annotations

import ast
import io
import json
import os
import stat
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fickling.analysis import Severity, check_safety
from fickling.fickle import UNSAFE_IMPORTS, StackedPickle

from stages.core.errors import SecurityError
from stages.models.weights import validate_safetensors_header

SIGNATURE_NAME = "model.sig"

SAFE_SUFFIXES = {
    ".safetensors": "safetensors",
    ".json": "json",
    ".md": "text", ".txt": "text", ".html": "text", ".yaml": "text", ".yml": "text",
    ".png": "png",
}  # fmt: skip
# requirements.txt, conda.yaml, python_env.yaml: by suffix. pyfunc_model.py: the pyfunc's code,
# covered by the model signature; registered_model_meta: what MLflow writes on download
SAFE_NAMES = {"MLmodel": "text", "pyfunc_model.py": "text", "registered_model_meta": "text"}
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib", ".ckpt", ".npy", ".npz"})
MAX_PICKLE_SCAN_BYTES = 64 * 1024 * 1024  # fickling is slow; bigger ones are refused unscanned
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_ZIP_MEMBERS = 100_000
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class ScanResult:
    """Verdict on one file of a model folder."""
    path: Path
    kind: str  # safetensors, json, text, png, signature, pickle, zip, unknown, ...
    safe: bool
    reason: str = ""  # one line; empty when safe
    severity: str | None = None  # fickling's severity for pickle-bearing files
    findings: tuple[str, ...] = field(default_factory=tuple)  # e.g. dangerous imports


def _is_pickle_magic(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _fickling_verdict(data: bytes) -> tuple[str, list[str]]:
    """(worst severity name, imports found) for pickle bytes; static analysis only."""
    worst = Severity.LIKELY_SAFE
    imports: list[str] = []
    stacked = StackedPickle.load(io.BytesIO(data), fail_on_decode_error=False)
    for pickled in stacked:
        result = check_safety(pickled)
        worst = max(worst, result.severity)
        if pickled.has_invalid_opcode:
            worst = max(worst, Severity.LIKELY_UNSAFE)
        for node in pickled.properties.imports:
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                for alias in node.names:
                    dotted = f"{mod}.{alias.name}" if mod else alias.name
                    if mod in ("posix", "nt"):
                        dotted += f" (os.{alias.name})"
                    imports.append(dotted)
            else:
                imports.extend(a.name for a in node.names)
    return worst.name, imports


def _rank_imports(imports: list[str]) -> list[str]:

    seen = list(dict.fromkeys(imports))
    dangerous = [i for i in seen if any(p in UNSAFE_IMPORTS for p in i.split(" ")[0].split("."))]
    return dangerous + [i for i in seen if i not in dangerous]


def _scan_pickle_bytes(data: bytes) -> tuple[str, list[str]]:
    try:
        return _fickling_verdict(data)
    except Exception as exc:  # noqa: BLE001 - unparseable pickle: refused anyway
        return f"UNSCANNABLE ({type(exc).__name__})", []


def _pickle_result(path: Path, kind: str, severity: str, imports: list[str], where: str = "") -> ScanResult:
    ranked = _rank_imports(imports)
    shown = ", ".join(ranked[:4]) + (f" and {len(ranked) - 4} more" if len(ranked) > 4 else "")
    detail = f"fickling {severity}" + (f", imports {shown}" if shown else "")
    return ScanResult(
        path=path,
        kind=kind,
        safe=False,
        reason=f"{path.name}{where}: pickle-bearing file refused ({detail}); pickle is never loaded",
        severity=severity,
        findings=tuple(ranked),
    )


def _worse(a: str, b: str) -> str:
    """The more severe of two verdicts; anything not scanned counts as the worst."""
    def rank(x: str) -> int:
        return Severity[x].severity if x in Severity.__members__ else 99

    return a if rank(a) >= rank(b) else b


def _scan_zip(path: Path) -> ScanResult | None:
    """Scan pickle members of a zip (torch.save format); None if the zip has none."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ZIP_MEMBERS:
                return ScanResult(path, "zip", False, f"{path.name}: zip with {len(infos)} members refused")
            worst, imports, members = "LIKELY_SAFE", [], []
            for info in infos:
                if info.is_dir():
                    continue
                with zf.open(info) as fh:
                    head = fh.read(2)
                if not (info.filename.endswith((".pkl", ".pickle")) or _is_pickle_magic(head)):
                    continue
                members.append(info.filename)
                if info.file_size > MAX_PICKLE_SCAN_BYTES:
                    sev, imps = "NOT_SCANNED (too large)", []
                else:
                    sev, imps = _scan_pickle_bytes(zf.read(info))
                imports += imps
                worst = _worse(worst, sev)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        return ScanResult(path, "zip", False, f"{path.name}: unreadable zip archive refused ({type(exc).__name__})")
    if not members:
        return None
    return _pickle_result(path, "zip-pickle", worst, imports, where=f" ({members[0]})")


def _check_text(path: Path, head: bytes) -> str:
    if b"\x00" in head:
        return "binary content (NUL bytes) in a text file"
    return ""


def scan_model_file(path: Path, *, signature_names: Iterable[str] = (SIGNATURE_NAME,), relative_to: Path | None = None) -> ScanResult:
    """Classify one file of a model folder; never loads or unpickles it.

    Safe: allow-listed formats whose content matches (safetensors headers validated, JSON
    parses, PNG magic, text without NUL bytes, the signature file). Unsafe: symlinks,
    anything pickle-bearing (by suffix, by pickle magic bytes, or a zip holding a pickle,
    scanned with fickling for the message), other zips, any other format.
    """
    path = Path(path)
    rel = str(path.relative_to(relative_to)) if relative_to else path.name
    try:
        st = path.lstat()
    except OSError as exc:
        return ScanResult(path, "missing", False, f"{rel}: cannot read: {exc.strerror}")
    if stat.S_ISLNK(st.st_mode):
        return ScanResult(path, "symlink", False, f"{rel}: symlinks are not allowed in a model folder")
    if not stat.S_ISREG(st.st_mode):
        return ScanResult(path, "special", False, f"{rel}: not a regular file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8192)
    except OSError as exc:
        return ScanResult(path, "unreadable", False, f"{rel}: cannot read: {exc.strerror}")

    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES or _is_pickle_magic(head) or head.startswith(_ZIP_MAGIC):
        if head.startswith(_ZIP_MAGIC):
            zres = _scan_zip(path)
            if zres is not None:
                return ScanResult(zres.path, zres.kind, False, zres.reason.replace(path.name, rel, 1), zres.severity, zres.findings)
            if suffix not in PICKLE_SUFFIXES:
                return ScanResult(path, "zip", False, f"{rel}: zip archives are not allowed in a model folder")
        if st.st_size > MAX_PICKLE_SCAN_BYTES:
            sev, imports = "NOT_SCANNED (too large)", []
        else:
            sev, imports = _scan_pickle_bytes(path.read_bytes())
        res = _pickle_result(path, "pickle", sev, imports)
        return ScanResult(path, "pickle", False, res.reason.replace(path.name, rel, 1), res.severity, res.findings)

    if path.name in set(signature_names) or rel in set(signature_names):
        try:
            json.loads(path.read_bytes()) if st.st_size <= MAX_JSON_BYTES else None
        except (ValueError, UnicodeDecodeError):
            return ScanResult(path, "signature", False, f"{rel}: signature file is not JSON")
        return ScanResult(path, "signature", True)
    kind = SAFE_NAMES.get(path.name) or SAFE_SUFFIXES.get(suffix)
    if kind is None:
        return ScanResult(path, "unknown", False, f"{rel}: {suffix or 'extension-less'} files are not an allow-listed model format")
    if kind == "safetensors":
        try:
            validate_safetensors_header(path)
        except SecurityError as exc:
            return ScanResult(path, kind, False, str(exc).replace(path.name, rel, 1))
        return ScanResult(path, kind, True)
    if kind == "png":
        ok = head.startswith(_PNG_MAGIC)
        return ScanResult(path, kind, ok, "" if ok else f"{rel}: not a PNG image")
    if kind == "json":
        if st.st_size > MAX_JSON_BYTES:
            return ScanResult(path, kind, False, f"{rel}: JSON file of {st.st_size} bytes exceeds {MAX_JSON_BYTES}")
        try:
            json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return ScanResult(path, kind, False, f"{rel}: not valid UTF-8 JSON")
        return ScanResult(path, kind, True)
    problem = _check_text(path, head)
    return ScanResult(path, kind, not problem, f"{rel}: {problem}" if problem else "")


def assert_safe_model_dir(model_dir: Path, *, signature_names: Iterable[str] = (SIGNATURE_NAME,)) -> list[ScanResult]:
    """Scan every file under ``model_dir`` (hidden ones included); raise on any unsafe one.

    Raises ``SecurityError`` whose one-line message names each refused file and why
    (the first three, then a count). Returns the per-file results when all are safe.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or model_dir.is_symlink():
        raise SecurityError(f"model folder {model_dir} is not a plain folder")
    names = tuple(signature_names)
    results: list[ScanResult] = []

    def unreadable(exc: OSError) -> None:  # os.walk skips unreadable folders by default
        raise SecurityError(f"unsafe model folder: cannot list {exc.filename}: {exc.strerror}")

    for root, dirs, files in os.walk(model_dir, onerror=unreadable, followlinks=False):
        rootp = Path(root)
        for d in list(dirs):  # os.walk lists symlinked folders in dirs but does not enter them
            if (rootp / d).is_symlink():
                files.append(d)
                dirs.remove(d)
        for f in sorted(files):
            results.append(scan_model_file(rootp / f, signature_names=names, relative_to=model_dir))
    bad = [r for r in results if not r.safe]
    if bad:
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise SecurityError("unsafe model folder: " + "; ".join(r.reason for r in bad[:3]) + more)
    return results
