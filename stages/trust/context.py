"""The run context every stage receives: where the run lives, and how its inputs are
re-verified before they are read.

Two records anchor a run:
  * ``manifest.json``: the signed ingest manifest (data bytes -> digests -> Merkle root);
  * ``artifacts.json``: a signed index of every file a stage produced (name -> path, SHA-256).
A stage reads an input only through :meth:`RunContext.dataset` or :meth:`RunContext.inputs`,
which re-check digests (fast path: the stat cache; ``paranoid`` re-hashes everything) and
signatures. A mismatch writes an ``integrity.violation`` ledger entry naming the file and
both digests, then raises :class:`IntegrityError` (exit 4).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from stages.core.errors import IntegrityError
from stages.core.workspace import Workspace, read_json, write_json
from stages.trust.hashing import (
    StatCache,
    check_relative_path,
    hash_files,
    sha256_file,
    verify_files,
)
from stages.trust.keys import load_signer
from stages.trust.ledger import Ledger
from stages.trust.signing import sign_document, verify_document


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
    def violation(self, *, file: str, expected: str, actual: str, where: str) -> IntegrityError:
        """Record an integrity violation in the ledger and return the error to raise."""
        self.log("integrity.violation", {"file": file, "expected_sha256": expected, "actual_sha256": actual, "stage": where})
        return IntegrityError(f"integrity violation in {where}: {file} has SHA-256 {actual[:16]}..., "
                              f"the record says {expected[:16]}...")

    def _stat_cache(self):
        """The stat cache, MAC'd with a secret derived from the signing key (Ed25519
        signatures are deterministic), so whoever can write ``runs/`` but not the key
        cannot vouch for an edited file."""

        secret = hashlib.sha256(load_signer().sign(b"mlsec.statcache/v1").encode()).digest()
        return StatCache(self.ws.runs_dir / ".statcache.json", key=secret)

    def manifest(self) -> dict[str, Any]:
        """The verified manifest payload (signature checked)."""

        if not self.manifest_path.exists():
            raise IntegrityError(f"run {self.run_id} has no manifest: ingest did not run or its record was removed")
        try:
            doc = json.loads(self.manifest_path.read_text())
        except ValueError:
            raise IntegrityError(f"manifest of run {self.run_id} is not valid JSON") from None
        return verify_document(doc)

    def dataset(self, *, where: str) -> tuple[Path, dict[str, Any]]:
        """Verify the prepared data against the signed manifest; return (folder, manifest)."""

        manifest = self.manifest()
        rel = manifest["prepared_dir"]
        check_relative_path(rel)
        folder = self.ws.root / rel
        expected = {}
        for entry in manifest["files"]:
            check_relative_path(entry["path"])
            expected[entry["path"]] = (entry["sha256"], entry["size"])
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

    # -- stage outputs -----------------------------------------------------------------
    def _read_index(self) -> dict[str, Any]:
        if not self.artifacts_path.exists():
            return {"run_id": self.run_id, "artifacts": {}}
        try:
            return verify_document(json.loads(self.artifacts_path.read_text()))
        except ValueError:
            raise IntegrityError(f"artifact index of run {self.run_id} is not valid JSON") from None

    def record_outputs(self, stage: str, files: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """Hash a stage's output files into the signed artifact index; return their records."""

        digests = hash_files([str(p) for p in files.values()])
        records = {}
        for name, path in files.items():
            d = digests[str(path)]
            records[name] = {"path": str(Path(path).resolve().relative_to(self.run_dir.resolve())), "sha256": d.sha256,
                             "size": d.size, "stage": stage}
        with FileLock(str(self.artifacts_path) + ".lock", timeout=60):
            index = self._read_index()
            index["artifacts"].update(records)
            write_json(self.artifacts_path, sign_document(index))
        return records

    def inputs(self, *names: str, where: str) -> dict[str, Path]:
        """Paths of recorded outputs of earlier stages, each re-verified before use."""

        index = self._read_index()["artifacts"]
        out = {}
        for name in names:
            if name not in index:
                raise IntegrityError(f"{where}: input {name!r} of run {self.run_id} was never recorded")
            rec = index[name]
            check_relative_path(rec["path"])
            path = self.run_dir / rec["path"]
            actual = sha256_file(path) if path.is_file() and not path.is_symlink() else "missing"
            if actual != rec["sha256"]:
                raise self.violation(file=f"runs/{self.run_id}/{rec['path']}", expected=rec["sha256"], actual=actual, where=where)
            out[name] = path
        return out

    def verify_all(self, *, where: str) -> bool:
        """Re-verify the data and every recorded artifact of the run; raises on a mismatch."""
        self.dataset(where=where)
        self.inputs(*self.recorded().keys(), where=where)
        return True

    def recorded(self) -> dict[str, dict[str, Any]]:
        return self._read_index()["artifacts"]

    def read_input_json(self, name: str, *, where: str) -> dict[str, Any]:
        return read_json(self.inputs(name, where=where)[name])

    def write_output_json(self, stage: str, name: str, relpath: str, obj: Any) -> Path:
        path = self.path(relpath)
        write_json(path, obj)
        self.record_outputs(stage, {name: path})
        return path
