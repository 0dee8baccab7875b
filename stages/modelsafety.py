"""Model-folder safety: signatures, unsafe-file scanning, safetensors checks, attestations.

- ``sign_model_dir`` / ``verify_model_dir``: the OpenSSF ``model_signing`` package with the
  pipeline's ECDSA P-256 key (``stages.keys``), offline, never Sigstore. Verification tries
  the current key, then retired keys in ``<key_dir>/trusted/`` (see ``stages.keys`` on
  rotation). Every file in the folder is covered; git files are not skipped.
- ``scan_model_file`` / ``assert_safe_model_dir``: an allow-list of formats. Anything that
  can carry pickle is refused whatever fickling says (we never load pickle from outside);
  fickling's verdict only makes the message useful.
- ``validate_safetensors_header`` / ``load_safetensors``: the header is parsed and bounded
  here before ``safetensors`` sees the file, so a crafted header cannot exhaust memory.
- ``build_attestation`` / ``sign_attestation`` / ``verify_attestation``: an in-toto
  Statement v1 with a SLSA provenance v1 predicate, in a DSSE envelope signed with the
  pipeline's Ed25519 key.

Every failure raises ``IntegrityError`` (or its child ``SecurityError``) with one line.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import re
import stat
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages import keys
from stages.errors import IntegrityError, InvalidInput, SecurityError

SIGNATURE_NAME = "model.sig"

# ---------------------------------------------------------------- model signatures


def _hashing_config(model_dir: Path, signature_path: Path):
    from model_signing import hashing

    ignored: list[str] = []
    try:
        ignored.append(str(signature_path.resolve().relative_to(model_dir.resolve())))
    except ValueError:
        pass  # the signature lies outside the folder
    return (
        hashing.Config()
        .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
        .set_ignored_paths(paths=ignored, ignore_git_paths=False)
    )


# model_signing reports "Signature mismatch: [<diffs>]", the list printed with repr().
_DIFF_RE = re.compile(r"(Extra files found|Missing files) in model \\*'.*?\\*': (.+?)\\*[\"']")
_HASH_RE = re.compile(r"Hash mismatch for \\*'(.+?)\\*': Expected")


def _condense(exc: BaseException, limit: int = 300) -> str:
    """One short line from model_signing's (sometimes long, multi-line) exceptions."""
    text = str(exc)
    parts = []
    for kind, names in _DIFF_RE.findall(text):
        parts.append(("extra files: " if kind.startswith("Extra") else "missing files: ") + names.strip())
    changed = _HASH_RE.findall(text)
    if changed:
        parts.append("changed: " + ", ".join(changed))
    line = "; ".join(parts) if parts else f"{type(exc).__name__}: {' '.join(text.split())}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def sign_model_dir(model_dir: Path, signature_path: Path) -> None:
    """Sign every file of ``model_dir`` into ``signature_path`` (a Sigstore bundle, JSON).

    The folder is checked with ``assert_safe_model_dir`` first: unsafe content is never
    signed. ``signature_path`` may lie inside the folder (it is then left out of the
    signed manifest) or outside it.
    """
    model_dir, signature_path = Path(model_dir), Path(signature_path)
    if not model_dir.is_dir():
        raise IntegrityError(f"cannot sign {model_dir}: not a folder")
    assert_safe_model_dir(model_dir, signature_names=_sig_names(model_dir, signature_path))
    mk = keys.model_key()
    from model_signing import signing

    try:
        (
            signing.Config()
            .set_hashing_config(_hashing_config(model_dir, signature_path))
            .use_elliptic_key_signer(private_key=mk.private_path)
            .sign(model_dir, signature_path)
        )
    except Exception as exc:  # noqa: BLE001 - condensed into our one-line error
        raise IntegrityError(f"signing {model_dir} failed: {_condense(exc)}") from None


def _sig_names(model_dir: Path, signature_path: Path) -> tuple[str, ...]:
    names = {SIGNATURE_NAME}
    try:
        names.add(str(signature_path.resolve().relative_to(model_dir.resolve())))
    except ValueError:
        pass
    return tuple(sorted(names))


def verify_model_dir(model_dir: Path, signature_path: Path) -> None:
    """Check ``model_dir`` against its signature and the safety allow-list.

    Raises ``IntegrityError`` naming what failed: missing signature, a key that is not
    trusted, changed, extra or missing files; ``SecurityError`` for unsafe content.
    """
    model_dir, signature_path = Path(model_dir), Path(signature_path)
    if not model_dir.is_dir():
        raise IntegrityError(f"model folder {model_dir} is missing")
    if not signature_path.is_file():
        raise IntegrityError(f"model signature {signature_path} is missing")
    from model_signing import verifying

    tried: list[str] = []
    for key_id, public_path in keys.trusted_model_public_keys():
        try:
            (
                verifying.Config()
                .use_elliptic_key_verifier(public_key=public_path)
                .set_hashing_config(_hashing_config(model_dir, signature_path))
                .verify(model_dir, signature_path)
            )
        except ValueError as exc:
            if str(exc).startswith("Key mismatch"):
                tried.append(keys.short_id(key_id))
                continue
            raise IntegrityError(f"model folder {model_dir} does not match its signature: {_condense(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - malformed bundle, unreadable file, ...
            raise IntegrityError(f"model signature {signature_path} cannot be verified: {_condense(exc)}") from None
        break
    else:
        raise IntegrityError(
            f"model signature {signature_path} was not made by a trusted key"
            f" (tried {', '.join(tried) or 'none'})"
        )
    assert_safe_model_dir(model_dir, signature_names=_sig_names(model_dir, signature_path))


# ---------------------------------------------------------------- safetensors headers

MAX_SAFETENSORS_HEADER = 16 * 1024 * 1024  # bytes of JSON header; real headers are < 1 MiB
MAX_TENSOR_RANK = 16
SAFETENSORS_DTYPES: dict[str, int] = {  # dtype -> bytes per element
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def validate_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and check a safetensors header without trusting it; return the tensor table.

    Checks: 8-byte little-endian header length within ``MAX_SAFETENSORS_HEADER`` and the
    file; UTF-8 JSON object without duplicate keys; string-to-string ``__metadata__``;
    per tensor an allow-listed dtype, a shape of non-negative ints, ``data_offsets``
    inside the data section whose length matches the shape; tensors neither overlap
    nor leave gaps. Raises ``SecurityError`` naming the file and the problem.
    """
    path = Path(path)
    name = path.name

    def bad(msg: str) -> SecurityError:
        return SecurityError(f"{name}: unsafe safetensors header: {msg}")

    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise bad(f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_SAFETENSORS_HEADER:
                raise bad(f"header length {n} exceeds the {MAX_SAFETENSORS_HEADER}-byte limit")
            if n < 2 or 8 + n > size:
                raise bad(f"header length {n} does not fit a {size}-byte file")
            raw = fh.read(n)
    except OSError as exc:
        raise SecurityError(f"{name}: cannot read: {exc.strerror}") from None
    if raw[:1] != b"{":
        raise bad("header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"header is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_len = size - 8 - n
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("__metadata__ must map strings to strings")
    spans: list[tuple[int, int, str]] = []
    for tname, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {tname!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise bad(f"tensor {tname!r} has dtype {dtype!r}, not in the allow-list")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_TENSOR_RANK
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise bad(f"tensor {tname!r} has an invalid shape {str(shape)[:60]}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise bad(f"tensor {tname!r} has data_offsets {str(offsets)[:60]} outside the {data_len}-byte data section")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"tensor {tname!r} spans {offsets[1] - offsets[0]} bytes but {dtype}{shape} needs {nbytes}")
        spans.append((offsets[0], offsets[1], tname))
    spans.sort()
    pos = 0
    for begin, end, tname in spans:
        if begin < pos:
            raise bad(f"tensor {tname!r} overlaps the tensor before it")
        if begin > pos:
            raise bad(f"gap of {begin - pos} bytes before tensor {tname!r}")
        pos = end
    if pos != data_len:
        raise bad(f"{data_len - pos} trailing bytes after the last tensor")
    return header


def load_safetensors(path: Path, *, device: str = "cpu") -> dict:
    """Validate the header, then load the tensors with ``safetensors.torch.load_file``."""
    validate_safetensors_header(Path(path))
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # noqa: BLE001
        raise SecurityError(f"{Path(path).name}: safetensors refused the file: {_condense(exc)}") from None


# ---------------------------------------------------------------- scanning

SAFE_SUFFIXES = {
    ".safetensors": "safetensors",
    ".json": "json",
    ".md": "text", ".txt": "text", ".html": "text", ".yaml": "text", ".yml": "text",
    ".png": "png",
}  # fmt: skip
SAFE_NAMES = {"MLmodel": "text"}  # requirements.txt, conda.yaml, python_env.yaml: by suffix
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
    import ast

    from fickling.analysis import Severity, check_safety
    from fickling.fickle import StackedPickle

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
    from fickling.fickle import UNSAFE_IMPORTS

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
    from fickling.analysis import Severity

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


# ---------------------------------------------------------------- attestations

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
DSSE_PAYLOAD_TYPE = "application/vnd.in-toto+json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_ATTESTATION_BYTES = 16 * 1024 * 1024


def _check_digest(what: str, name: str, digest: str) -> None:
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise InvalidInput(f"{what} {name!r}: sha256 must be 64 lowercase hex chars, got {str(digest)[:70]!r}")


def build_attestation(
    *,
    subjects: dict[str, str],
    materials: dict[str, str],
    builder_id: str,
    build_type: str,
    parameters: dict,
    run_id: str,
    started: str,
    finished: str,
) -> dict:
    """An in-toto Statement v1 with a SLSA provenance v1 predicate, as a plain dict.

    ``subjects``: artifact name -> sha256 hex (the model files). ``materials``: name or
    URI (anything containing ``://``) -> sha256 hex (data, code). ``started``/``finished``
    are RFC 3339 timestamps (``2024-05-01T12:00:00Z``). The statement is checked with the
    ``in_toto_attestation`` classes and the SLSA provenance protobuf schema.
    """
    from google.protobuf import json_format
    from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
    from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
    from in_toto_attestation.v1.statement import Statement

    if not subjects:
        raise InvalidInput("an attestation needs at least one subject")
    for name, digest in subjects.items():
        _check_digest("subject", name, digest)
    for name, digest in materials.items():
        _check_digest("material", name, digest)
    deps = [
        {"uri": name, "digest": {"sha256": d}} if "://" in name else {"name": name, "digest": {"sha256": d}}
        for name, d in sorted(materials.items())
    ]
    predicate = {
        "buildDefinition": {
            "buildType": build_type,
            "externalParameters": parameters,
            "resolvedDependencies": deps,
        },
        "runDetails": {
            "builder": {"id": builder_id},
            "metadata": {"invocationId": run_id, "startedOn": started, "finishedOn": finished},
        },
    }
    try:
        keys.canonical_json(predicate)  # JSON-representable, no NaN
        json_format.ParseDict(predicate, provenance_pb2.Provenance())
        stmt = Statement(
            [ResourceDescriptor(name=n, digest={"sha256": d}).pb for n, d in sorted(subjects.items())],
            SLSA_PROVENANCE_V1,
            predicate,
        )
        stmt.validate()
    except (json_format.ParseError, ValueError, TypeError) as exc:
        raise InvalidInput(f"invalid provenance: {' '.join(str(exc).split())[:200]}") from None
    out = json_format.MessageToDict(stmt.pb)
    out["predicate"] = predicate  # keep the caller's JSON types (protobuf Struct makes ints floats)
    return out


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign_attestation(statement: dict) -> dict:
    """Wrap ``statement`` in a DSSE envelope signed with the pipeline's Ed25519 key."""
    payload = keys.canonical_json(statement)
    signer = keys.load_signer()
    return {
        "payloadType": DSSE_PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": signer.key_id, "sig": signer.sign(_pae(DSSE_PAYLOAD_TYPE, payload))}],
    }


def verify_attestation(envelope: dict, *, expected_subjects: dict[str, str] | None = None) -> dict:
    """Check a DSSE envelope and return its statement, or raise ``IntegrityError``.

    At least one signature must be by a trusted key, and every signature by a trusted key
    must be valid. With ``expected_subjects`` (name -> sha256) the statement's subjects
    must be exactly those.
    """
    if not isinstance(envelope, dict):
        raise IntegrityError("malformed attestation envelope: not an object")
    if envelope.get("payloadType") != DSSE_PAYLOAD_TYPE:
        raise IntegrityError(f"attestation payloadType {envelope.get('payloadType')!r} is not {DSSE_PAYLOAD_TYPE}")
    sigs = envelope.get("signatures")
    if not isinstance(sigs, list) or not sigs or not all(isinstance(s, dict) for s in sigs):
        raise IntegrityError("attestation carries no signatures")
    b64 = envelope.get("payload")
    if not isinstance(b64, str) or len(b64) > MAX_ATTESTATION_BYTES * 4 // 3 + 4:
        raise IntegrityError("malformed attestation envelope: payload missing or too large")
    try:
        payload = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise IntegrityError("malformed attestation envelope: payload is not base64") from None
    trusted = keys.trusted_keys()
    pae = _pae(DSSE_PAYLOAD_TYPE, payload)
    verified, unknown = 0, []
    for s in sigs:
        kid = s.get("keyid")
        if not isinstance(kid, str) or kid not in trusted:
            unknown.append(keys.short_id(str(kid)))
            continue
        keys.verify_signature(pae, s.get("sig", ""), key_id=kid)  # raises on a bad signature
        verified += 1
    if not verified:
        raise IntegrityError(f"attestation signed by unknown key {', '.join(unknown)}")
    try:
        stmt = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise IntegrityError("attestation payload is not JSON") from None
    if not isinstance(stmt, dict) or stmt.get("_type") != STATEMENT_TYPE:
        raise IntegrityError("attestation payload is not an in-toto Statement v1")
    subjects = stmt.get("subject")
    if not isinstance(subjects, list) or not subjects:
        raise IntegrityError("attestation has no subjects")
    if expected_subjects is not None:
        seen: dict[str, str] = {}
        for sub in subjects:
            if not isinstance(sub, dict) or not isinstance(sub.get("digest"), dict):
                raise IntegrityError("attestation has a malformed subject")
            seen[str(sub.get("name"))] = str(sub["digest"].get("sha256"))
        missing = sorted(set(expected_subjects) - set(seen))
        extra = sorted(set(seen) - set(expected_subjects))
        changed = sorted(n for n in set(seen) & set(expected_subjects) if seen[n] != expected_subjects[n])
        problems = []
        if changed:
            n = changed[0]
            problems.append(
                f"{n} sha256 {expected_subjects[n][:12]}... expected, attested {seen[n][:12]}..."
                + (f" (+{len(changed) - 1} more)" if len(changed) > 1 else "")
            )
        if missing:
            problems.append("not attested: " + ", ".join(missing[:5]))
        if extra:
            problems.append("unexpected: " + ", ".join(extra[:5]))
        if problems:
            raise IntegrityError("attestation subject mismatch: " + "; ".join(problems))
    return stmt
