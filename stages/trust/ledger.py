"""Append-only, hash-chained audit ledger (JSON lines).

Each line is one entry::

    {"seq": 7, "time": "...", "actor": "alice", "event": "gate.verdict", "run_id": "...",
     "payload": {...}, "payload_sha256": "...", "prev": "<hash of entry 6>", "hash": "...",
     "sig": {"key_id": "...", "sig": "..."}}

``hash`` is the SHA-256 of the canonical JSON of the entry without ``hash`` and ``sig``;
``prev`` links it to the entry before (64 zeros for the first); ``sig`` is the pipeline's
Ed25519 signature over ``hash`` (entries written before signatures existed have none).
Editing, deleting, reordering or inserting a line breaks the chain at that line. Cutting
lines off the end leaves a valid shorter chain, so every append also rewrites a signed head
file (``ledger.head.json``: seq and hash of the last entry, Ed25519-signed), each MLflow run
and each alias move records the head it saw; a truncated ledger disagrees with all three.

Before it extends the chain, ``append`` checks the last line against the signed head and
refuses (``IntegrityError``, exit 4) when they disagree, naming what differs: a rewritten
last entry, entries removed from the end, or entries added without the pipeline's key. The
one disagreement it accepts is the one an interrupted append leaves: a last entry, signed
by the pipeline, one past the head and chained to it. Appends hold a file lock, so
concurrent runs interleave whole entries and never fork the chain.
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
from stages.trust.keys import PublicKey, load_signer, trusted_keys
from stages.trust.signing import sign_document, verify_document, verify_signature

GENESIS = "0" * 64
_UNHASHED = ("hash", "sig")


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k not in _UNHASHED}
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


def entry_problem(entry: Any, *, keys: dict[str, PublicKey] | None = None) -> str | None:
    """Why an entry cannot be what the pipeline wrote (its own fields only), or None.

    ``keys``: the trusted keys, read once by a caller that checks many entries.
    """
    if not isinstance(entry, dict):
        return "not an object"
    missing = {"seq", "event", "payload", "payload_sha256", "prev", "hash"} - set(entry)
    if missing:
        return f"entry lacks fields {sorted(missing)}"
    try:
        if hashlib.sha256(canonical_json(entry["payload"])).hexdigest() != entry["payload_sha256"]:
            return "payload does not match its digest (edited entry)"
        if entry_hash(entry) != entry["hash"]:
            return "entry hash does not match its content (edited entry)"
    except InvalidInput:
        return "entry holds values no entry can hold (edited entry)"
    sig = entry.get("sig")
    if sig is not None:
        if not isinstance(sig, dict):
            return "entry signature is malformed (edited entry)"
        try:
            verify_signature(str(entry["hash"]).encode(), sig.get("sig", ""), key_id=sig.get("key_id", ""),
                             keys=trusted_keys() if keys is None else keys)
        except IntegrityError as err:
            return f"entry signature does not verify ({err}): edited entry"
    return None


def describe_head_mismatch(*, last_seq: int | None, last_hash: str | None, head_seq: Any, head_hash: Any) -> str:
    """Name what differs between the ledger's last entry and its signed head."""
    if last_seq is None:
        return f"the ledger holds no entries but its signed head says seq {head_seq}: the ledger was deleted or emptied"
    if head_seq == last_seq:
        return (f"the last entry (seq {last_seq}) was rewritten: its hash is {str(last_hash)[:12]}..., "
                f"the signed head says {str(head_hash)[:12]}...")
    if isinstance(head_seq, int) and last_seq < head_seq:
        return f"entries removed from the end: the ledger ends at seq {last_seq}, the signed head says seq {head_seq}"
    return (f"entries added without the pipeline's key: the ledger ends at seq {last_seq}, "
            f"the signed head says seq {head_seq}")


@dataclass
class Ledger:
    path: Path

    @property
    def head_path(self) -> Path:
        return self.path.with_name("ledger.head.json")

    def _lock(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path) + ".lock", timeout=60)

    def signed_head(self) -> dict[str, Any] | None:
        """The verified payload of the signed head file, or None when there is none."""
        if not self.head_path.exists():
            return None
        try:
            doc = json.loads(self.head_path.read_bytes())
        except ValueError:
            raise IntegrityError(f"signed head {self.head_path.name} is not valid JSON") from None
        try:
            head = verify_document(doc)
        except IntegrityError as err:
            raise IntegrityError(f"signed head {self.head_path.name}: {err}") from None
        if head.get("ledger") != self.path.name:
            raise IntegrityError(f"signed head {self.head_path.name} is for ledger {head.get('ledger')!r}, not {self.path.name}")
        return head

    def _tail(self) -> tuple[str, int]:
        """``(prev, seq)`` for the next entry, after checking the last line against the signed head."""
        last = _last_line(self.path) if self.path.exists() else None
        head = self.signed_head()
        where = f"ledger {self.path}"
        if last is None:
            if head is not None:
                raise IntegrityError(f"{where}: " + describe_head_mismatch(last_seq=None, last_hash=None,
                                                                          head_seq=head.get("seq"), head_hash=head.get("hash")))
            return GENESIS, 0
        try:
            tail = json.loads(last)
        except ValueError:
            raise IntegrityError(f"{where}: last line is not a valid entry; run 'mlsec audit verify'") from None
        problem = entry_problem(tail)
        if problem is not None or not isinstance(tail.get("seq"), int):
            raise IntegrityError(f"{where}: last line is not a valid entry ({problem or 'no integer seq'}); "
                                 "run 'mlsec audit verify'")
        seq, digest = tail["seq"], tail["hash"]
        if head is None:
            raise IntegrityError(f"{where} has entries up to seq {seq} but its signed head {self.head_path.name} is missing; "
                                 "run 'mlsec audit verify'")
        if head.get("seq") == seq and head.get("hash") == digest:
            return digest, seq + 1
        # An append interrupted between the line and the head: signed by us, one past the head, chained to it.
        if head.get("seq") == seq - 1 and head.get("hash") == tail.get("prev") and isinstance(tail.get("sig"), dict):
            return digest, seq + 1
        raise IntegrityError(f"{where}: " + describe_head_mismatch(last_seq=seq, last_hash=digest, head_seq=head.get("seq"),
                                                                  head_hash=head.get("hash"))
                             + "; refusing to extend it (run 'mlsec audit verify')")

    def append(self, event: str, payload: dict[str, Any] | None = None, *, run_id: str | None = None,
               actor: str | None = None) -> dict[str, Any]:
        """Append one entry and return it. The payload must be JSON-serialisable.

        Raises ``IntegrityError`` (and writes nothing) when the last line and the signed head
        disagree.
        """

        payload = jsonable(payload or {})
        signer = load_signer()
        with self._lock():
            prev, seq = self._tail()
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
            entry["sig"] = {"key_id": signer.key_id, "sig": signer.sign(entry["hash"].encode())}
            line = json.dumps(entry, sort_keys=True, separators=(",", ":"), default=str) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            write_json(self.head_path, sign_document({"ledger": self.path.name, "seq": seq, "hash": entry["hash"]}))
            return entry

    def refusal(self, event: str, err: Exception, **payload: Any) -> Exception:
        """Record a refused request (``<what>.refused``: what was asked, by whom, why) and
        return ``err`` for the caller to raise: a refusal leaves a trace, nothing else."""
        self.append(event, {**payload, "refused": type(err).__name__, "message": str(err)})
        return err

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

    def require_intact(self) -> int:
        """Verify the whole chain and its signed head; return the entry count or raise ``IntegrityError``.

        Holds the append lock: a run appending at the same moment would otherwise be read
        with its head written and its line not yet (or the other way round)."""
        with self._lock():
            report = verify_chain(self.path)
        if not report.ok:
            where = f"line {report.first_bad_line}: " if report.first_bad_line else ""
            raise IntegrityError(f"ledger {self.path} is broken at {where}{report.reason}; run 'mlsec audit verify'")
        return report.entries


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

    ``anchors`` are ``{"seq", "hash", "source"}`` records kept elsewhere (the
    ``mlsec.ledger_head`` and ``mlsec.ledger_anchor.<seq>`` tags in MLflow); each must
    match the entry with that seq. Line numbers in the report are 1-based.
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
    keys = trusted_keys()
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
        problem = entry_problem(entry, keys=keys)
        if problem is not None:
            return VerifyReport(False, number - 1, None, number, problem)
        prev = entry["hash"]
        by_seq[entry["seq"]] = entry["hash"]
    head = {"seq": len(lines) - 1, "hash": prev} if lines else None
    report = VerifyReport(True, len(lines), head)
    report.checks["chain"] = "ok"
    # The signed head file catches a cut-off tail.
    if ledger.head_path.exists():
        try:
            signed = ledger.signed_head()
        except IntegrityError as err:
            return VerifyReport(False, len(lines), head, None, str(err), report.checks)
        if head is None or signed.get("seq") != head["seq"] or signed.get("hash") != head["hash"]:
            reason = describe_head_mismatch(last_seq=head["seq"] if head else None, last_hash=head["hash"] if head else None,
                                            head_seq=signed.get("seq"), head_hash=signed.get("hash"))
            bad = len(lines) if head and signed.get("seq") == head["seq"] else (len(lines) + 1 if head else 1)
            return VerifyReport(False, len(lines), head, bad, reason, report.checks)
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
