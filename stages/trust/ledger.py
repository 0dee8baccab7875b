"""Append-only, hash-chained audit ledger (JSON lines).

Each line is one entry::

    {"seq": 7, "time": "...", "actor": "alice", "event": "gate.verdict", "run_id": "...",
     "payload": {...}, "payload_sha256": "...", "prev": "<hash of entry 6>", "hash": "..."}

``hash`` is the SHA-256 of the canonical JSON of the entry without ``hash``; ``prev`` links
it to the entry before (64 zeros for the first). Editing, deleting, reordering or inserting
a line breaks the chain at that line. Cutting lines off the end leaves a valid shorter
chain, so every append also rewrites a signed head file (``ledger.head.json``: seq and hash
of the last entry, Ed25519-signed) and each MLflow run records the head it saw; a truncated
ledger disagrees with both. Appends hold a file lock, so concurrent runs interleave whole
entries and never fork the chain.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from stages.core.canonical import canonical_json, jsonable
from stages.core.errors import IntegrityError, InvalidInput
from stages.core.workspace import actor as current_actor
from stages.core.workspace import write_json
from stages.trust.signing import sign_document, verify_document

GENESIS = "0" * 64


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _last_line(path: Path) -> bytes | None:
    """The last non-empty line, read from the end (the ledger can grow large)."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        if end == 0:
            return None
        block = 4096
        buf = b""
        pos = end
        while pos > 0:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
            stripped = buf.rstrip(b"\n")
            if b"\n" in stripped:
                return stripped.rsplit(b"\n", 1)[1]
        return buf.rstrip(b"\n") or None


@dataclass
class Ledger:
    path: Path

    @property
    def head_path(self) -> Path:
        return self.path.with_name("ledger.head.json")

    def _lock(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path) + ".lock", timeout=60)

    def append(self, event: str, payload: dict[str, Any] | None = None, *, run_id: str | None = None,
               actor: str | None = None) -> dict[str, Any]:
        """Append one entry and return it. The payload must be JSON-serialisable."""

        payload = jsonable(payload or {})
        with self._lock():
            prev, seq = GENESIS, 0
            if self.path.exists():
                last = _last_line(self.path)
                if last is not None:
                    try:
                        tail = json.loads(last)
                        prev, seq = tail["hash"], int(tail["seq"]) + 1
                    except (ValueError, KeyError, TypeError):
                        raise IntegrityError(f"ledger {self.path}: last line is not a valid entry; run 'mlsec audit verify'") from None
            entry: dict[str, Any] = {
                "seq": seq,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() % 10**9 // 10**6:03d}Z",
                "actor": actor or current_actor(),
                "event": event,
                "run_id": run_id,
                "payload": payload,
                "payload_sha256": hashlib.sha256(canonical_json(payload)).hexdigest(),
                "prev": prev,
            }
            entry["hash"] = entry_hash(entry)
            line = json.dumps(entry, sort_keys=True, separators=(",", ":"), default=str) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            write_json(self.head_path, sign_document({"ledger": self.path.name, "seq": seq, "hash": entry["hash"]}))
            return entry

    def head(self) -> dict[str, Any] | None:
        """The last entry's seq and hash, or None for an empty ledger."""
        if not self.path.exists():
            return None
        last = _last_line(self.path)
        if last is None:
            return None
        tail = json.loads(last)
        return {"seq": tail["seq"], "hash": tail["hash"]}

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


@dataclass
class VerifyReport:
    ok: bool
    entries: int
    head: dict[str, Any] | None
    first_bad_line: int | None = None
    reason: str | None = None
    checks: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": self.entries, "head": self.head, "first_bad_line": self.first_bad_line,
                "reason": self.reason, "checks": self.checks}


def verify_chain(path: Path, *, anchors: list[dict[str, Any]] | None = None) -> VerifyReport:
    """Check every line of the ledger, the signed head file and any external anchors.

    ``anchors`` are ``{"seq", "hash", "source"}`` records kept elsewhere (each MLflow run's
    ``mlsec.ledger_head`` tag); each must match the entry with that seq. Line numbers in the
    report are 1-based.
    """

    ledger = Ledger(path)
    if not path.exists():
        return VerifyReport(ok=not anchors, entries=0, head=None,
                            reason=None if not anchors else "ledger missing but runs recorded a head")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    prev, by_seq = GENESIS, {}
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
        except ValueError:
            return VerifyReport(False, number - 1, None, number, "line is not valid JSON (edited or truncated)")
        missing = {"seq", "event", "payload", "payload_sha256", "prev", "hash"} - set(entry)
        if missing:
            return VerifyReport(False, number - 1, None, number, f"entry lacks fields {sorted(missing)}")
        if entry["seq"] != number - 1:
            return VerifyReport(False, number - 1, None, number,
                                f"sequence number {entry['seq']} where {number - 1} was expected (deleted, inserted or reordered line)")
        if entry["prev"] != prev:
            return VerifyReport(False, number - 1, None, number, "previous-hash link broken (deleted, inserted or reordered line)")
        try:
            payload_ok = hashlib.sha256(canonical_json(entry["payload"])).hexdigest() == entry["payload_sha256"]
            hash_ok = entry_hash(entry) == entry["hash"]
        except InvalidInput:
            return VerifyReport(False, number - 1, None, number, "entry holds values no entry can hold (edited entry)")
        if not payload_ok:
            return VerifyReport(False, number - 1, None, number, "payload does not match its digest (edited entry)")
        if not hash_ok:
            return VerifyReport(False, number - 1, None, number, "entry hash does not match its content (edited entry)")
        prev = entry["hash"]
        by_seq[entry["seq"]] = entry["hash"]
    head = {"seq": len(lines) - 1, "hash": prev} if lines else None
    report = VerifyReport(True, len(lines), head)
    report.checks["chain"] = "ok"
    # The signed head file catches a cut-off tail.
    if ledger.head_path.exists():
        try:
            signed = verify_document(json.loads(ledger.head_path.read_text()))
        except IntegrityError as err:
            return VerifyReport(False, len(lines), head, None, f"signed head file: {err}", report.checks)
        except ValueError:
            return VerifyReport(False, len(lines), head, None, "signed head file is not valid JSON", report.checks)
        if head is None or signed.get("seq") != head["seq"] or signed.get("hash") != head["hash"]:
            return VerifyReport(False, len(lines), head, len(lines) + 1 if head else 1,
                                f"ledger ends at seq {head['seq'] if head else -1} but the signed head says seq {signed.get('seq')} "
                                "(lines removed from the end)", report.checks)
        report.checks["signed_head"] = "ok"
    elif lines:
        return VerifyReport(False, len(lines), head, None, "signed head file missing", report.checks)
    for anchor in anchors or []:
        seq, want = anchor.get("seq"), anchor.get("hash")
        if by_seq.get(seq) != want:
            return VerifyReport(False, len(lines), head, (seq + 1) if isinstance(seq, int) else None,
                                f"{anchor.get('source', 'an anchor')} recorded entry {seq} with hash {str(want)[:12]}..., "
                                "which the ledger does not hold (ledger rewritten)", report.checks)
    if anchors:
        report.checks["anchors"] = f"{len(anchors)} ok"
    return report
