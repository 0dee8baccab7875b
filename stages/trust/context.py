"""The run context every stage receives: where the run lives, and how its inputs are
re-verified before they are read.

Two records anchor a run:
  * ``manifest.json``: the signed ingest manifest (data bytes -> digests -> Merkle root);
  * ``artifacts.json``: a signed index of every file a stage produced (name -> path, SHA-256).
Both name their run, and a record of another run is refused: a manifest or index copied in
from an earlier (say, rejected) run cannot stand in for this run's own.

A stage reads its inputs through :meth:`RunContext.dataset_bytes` and
:meth:`RunContext.input_bytes`: each file is read once, hashed, compared with the signed
record, and the caller parses those same bytes, so a file swapped between the check and the
use is never read. :meth:`RunContext.dataset` and :meth:`RunContext.inputs` only check
(fast path: the stat cache; ``paranoid`` re-hashes everything) for stages that verify what
they do not parse. A mismatch writes an ``integrity.violation`` ledger entry naming the file
and both digests, then raises :class:`IntegrityError` (exit 4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from stages.core.errors import IntegrityError
from stages.core.workspace import Workspace, write_json
from stages.trust.hashing import (
    StatCache,
    check_relative_path,
    hash_files,
    read_file,
    safe_files,
    sha256_file,
    verify_files,
)
from stages.trust.ledger import Ledger
from stages.trust.signing import derive_secret, sign_document, verify_document


@dataclass
class RunContext:
    ws: Workspace
    run_id: str
    paranoid: bool = False

    @property
    def run_dir(self) -> Path:
        return self.ws.run_dir(self.run_id)

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.ws.ledger_path)

    @property
    def manifest_path(self) -> Path:
        return self.run_dir / "manifest.json"

    @property
    def artifacts_path(self) -> Path:
        return self.run_dir / "artifacts.json"

    def path(self, *parts: str) -> Path:
        p = self.run_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def log(self, event: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.ledger.append(event, payload, run_id=self.run_id)

    # -- integrity -------------------------------------------------------------------
    def violation(self, *, file: str, expected: str, actual: str, where: str, reason: str | None = None) -> IntegrityError:
        """Record an integrity violation in the ledger and return the error to raise.

        ``expected``/``actual`` are digests (or what stood in for one); ``reason`` replaces
        the digest sentence in the message when the problem is not a changed byte.
        """
        payload = {"file": file, "expected_sha256": expected, "actual_sha256": actual, "stage": where}
        if reason:
            payload["reason"] = reason
        self.log("integrity.violation", payload)
        if reason:
            return IntegrityError(f"integrity violation in {where}: {file}: {reason}")
        return IntegrityError(f"integrity violation in {where}: {file} has SHA-256 {actual[:16]}..., "
                              f"the record says {expected[:16]}...")

    def _belongs(self, record: dict[str, Any], *, file: str, where: str) -> dict[str, Any]:
        """``record`` unchanged if it names this run; otherwise a recorded violation."""
        owner = record.get("run_id")
        if owner != self.run_id:
            raise self.violation(file=file, expected=self.run_id, actual=str(owner), where=where,
                                 reason=f"the record belongs to run {owner!r}, not to run {self.run_id!r} "
                                        "(copied in from another run)")
        return record

    def _stat_cache(self):
        """The stat cache, MAC'd with a secret derived from the signing key (Ed25519
        signatures are deterministic), so whoever can write ``runs/`` but not the key
        cannot vouch for an edited file."""

        return StatCache(self.ws.runs_dir / ".statcache.json", key=derive_secret(b"mlsec.statcache/v1"))

    def manifest(self, *, where: str = "run") -> dict[str, Any]:
        """The verified manifest payload (signature checked, and written for this run)."""

        if not self.manifest_path.exists():
            raise IntegrityError(f"run {self.run_id} has no manifest: ingest did not run or its record was removed")
        try:
            doc = json.loads(self.manifest_path.read_bytes())
        except ValueError:
            raise IntegrityError(f"manifest of run {self.run_id} is not valid JSON") from None
        return self._belongs(verify_document(doc), file=f"runs/{self.run_id}/manifest.json", where=where)

    def _expected_data(self, manifest: dict[str, Any]) -> tuple[str, Path, dict[str, tuple[str, int]]]:
        rel = manifest["prepared_dir"]
        check_relative_path(rel)
        expected = {}
        for entry in manifest["files"]:
            check_relative_path(entry["path"])
            expected[entry["path"]] = (entry["sha256"], entry["size"])
        return rel, self.ws.root / rel, expected

    def dataset(self, *, where: str) -> tuple[Path, dict[str, Any]]:
        """Verify the prepared data against the signed manifest; return (folder, manifest).

        For checks only: a stage that parses the data uses :meth:`dataset_bytes`.
        """

        manifest = self.manifest(where=where)
        rel, folder, expected = self._expected_data(manifest)
        cache = self._stat_cache()
        result = verify_files(folder, expected, cache=cache, paranoid=self.paranoid)
        if result.mismatches:
            name, want, got = result.mismatches[0]
            raise self.violation(file=f"{rel}/{name}", expected=want, actual=got, where=where)
        try:
            cache.save()
        except OSError:
            pass
        return folder, manifest

    def dataset_bytes(self, *, where: str) -> tuple[dict[str, bytes], dict[str, Any]]:
        """The prepared data files' bytes (relative path -> bytes), each checked against the
        signed manifest as read, and the manifest. Parse these bytes, never the files again."""

        manifest = self.manifest(where=where)
        rel, folder, expected = self._expected_data(manifest)
        present = {str(p.relative_to(folder)) for p in safe_files(folder)} if folder.is_dir() else set()
        extra = sorted(present - expected.keys())
        if extra:
            raise self.violation(file=f"{rel}/{extra[0]}", expected="absent", actual="unexpected file", where=where)
        out: dict[str, bytes] = {}
        for name, (want, size) in sorted(expected.items()):
            try:
                data, actual = read_file(folder / name)
            except FileNotFoundError:
                data, actual = b"", "missing"
            if actual != want or len(data) != size:
                raise self.violation(file=f"{rel}/{name}", expected=want, actual=actual, where=where)
            out[name] = data
        return out, manifest

    # -- stage outputs -----------------------------------------------------------------
    def _read_index(self, *, where: str = "run") -> dict[str, Any]:
        if not self.artifacts_path.exists():
            return {"run_id": self.run_id, "artifacts": {}}
        try:
            doc = json.loads(self.artifacts_path.read_bytes())
        except ValueError:
            raise IntegrityError(f"artifact index of run {self.run_id} is not valid JSON") from None
        return self._belongs(verify_document(doc), file=f"runs/{self.run_id}/artifacts.json", where=where)

    def record_outputs(self, stage: str, files: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """Hash a stage's output files into the signed artifact index; return their records."""

        digests = hash_files([str(p) for p in files.values()])
        records = {}
        for name, path in files.items():
            d = digests[str(path)]
            records[name] = {"path": str(Path(path).resolve().relative_to(self.run_dir.resolve())), "sha256": d.sha256,
                             "size": d.size, "stage": stage}
        with FileLock(str(self.artifacts_path) + ".lock", timeout=60):
            index = self._read_index(where=stage)
            index["artifacts"].update(records)
            write_json(self.artifacts_path, sign_document(index))
        return records

    def _record(self, index: dict[str, Any], name: str, *, where: str) -> tuple[dict[str, Any], Path]:
        if name not in index:
            raise IntegrityError(f"{where}: input {name!r} of run {self.run_id} was never recorded")
        rec = index[name]
        check_relative_path(rec["path"])
        return rec, self.run_dir / rec["path"]

    def inputs(self, *names: str, where: str) -> dict[str, Path]:
        """Paths of recorded outputs of earlier stages, each re-verified (for checks and
        copies of whole folders; to parse a file use :meth:`input_bytes`)."""

        index = self._read_index(where=where)["artifacts"]
        out = {}
        for name in names:
            rec, path = self._record(index, name, where=where)
            actual = sha256_file(path) if path.is_file() and not path.is_symlink() else "missing"
            if actual != rec["sha256"]:
                raise self.violation(file=f"runs/{self.run_id}/{rec['path']}", expected=rec["sha256"], actual=actual, where=where)
            out[name] = path
        return out

    def input_bytes(self, *names: str, where: str) -> dict[str, bytes]:
        """The bytes of recorded outputs of earlier stages, each checked against the signed
        index as read. Parse these bytes, never the files again."""

        index = self._read_index(where=where)["artifacts"]
        out = {}
        for name in names:
            rec, path = self._record(index, name, where=where)
            try:
                data, actual = read_file(path)
            except FileNotFoundError:
                data, actual = b"", "missing"
            if actual != rec["sha256"]:
                raise self.violation(file=f"runs/{self.run_id}/{rec['path']}", expected=rec["sha256"], actual=actual, where=where)
            out[name] = data
        return out

    def verify_all(self, *, where: str) -> bool:
        """Re-verify the data and every recorded artifact of the run; raises on a mismatch."""
        self.dataset(where=where)
        self.inputs(*self.recorded(where=where).keys(), where=where)
        return True

    def recorded(self, *, where: str = "run") -> dict[str, dict[str, Any]]:
        return self._read_index(where=where)["artifacts"]

    def read_input_json(self, name: str, *, where: str) -> dict[str, Any]:
        data = self.input_bytes(name, where=where)[name]
        try:
            return json.loads(data)
        except ValueError:
            raise IntegrityError(f"{where}: input {name!r} of run {self.run_id} is not valid JSON") from None

    def write_output_json(self, stage: str, name: str, relpath: str, obj: Any) -> Path:
        path = self.path(relpath)
        write_json(path, obj)
        self.record_outputs(stage, {name: path})
        return path
