"""Ingest: read the source, normalise it, hash every file, version it with DVC, sign a manifest.

Every input check runs before anything is written, so a rejected input changes nothing
under ``data/``. Prepared data is content-addressed (``data/prepared/<merkle root[:16]>``)
and never overwritten: re-ingesting the same bytes reuses the folder after re-verifying it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from stages.core.params import Params
from stages.core.workspace import write_json
from stages.data.io import load_source
from stages.data.prepared import data_schema, write_prepared
from stages.runner import stage_main
from stages.trust.context import RunContext
from stages.trust.hashing import hash_files, merkle_root, safe_files
from stages.trust.provenance import dvc_add, environment_lock, git_state
from stages.trust.signing import sign_document

STAGE = "ingest"


def _digests(folder: Path, *, workers: int) -> tuple[list[dict[str, Any]], str]:
    files = safe_files(folder)
    digests = hash_files([str(p) for p in files], workers=workers)
    entries = sorted(({"path": str(p.relative_to(folder)), "sha256": digests[str(p)].sha256, "size": digests[str(p)].size}
                      for p in files), key=lambda e: e["path"])
    return entries, merkle_root(entries)


def run(ctx: RunContext, params: Params, *, source: str | None = None) -> dict[str, Any]:
    """Ingest ``source`` (default ``params.data.source``) for run ``ctx``; return the manifest summary."""
    started = time.time()
    ctx.ledger.require_intact()  # never start a run on a chain someone rewrote
    code = git_state(ctx.ws.root)  # before this run's own 'dvc add' touches the tree
    src = source or params.data.source
    d = params.data
    dataset = load_source(src, label_column=d.label_column, image_shape=tuple(d.image_shape) if d.image_shape else None,
                          classes=d.classes, columns=d.columns, missing=d.missing, max_categories=d.max_categories)
    prepared_root = ctx.ws.prepared_dir
    prepared_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(prepared_root / ".ingest.lock"), timeout=600):
        incoming = prepared_root / f".incoming-{ctx.run_id}"
        shutil.rmtree(incoming, ignore_errors=True)
        try:
            write_prepared(dataset, incoming)
            entries, root = _digests(incoming, workers=params.ingest.hash_workers)
            final = prepared_root / root[:16]
            if final.exists():
                existing, existing_root = _digests(final, workers=params.ingest.hash_workers)
                if existing_root != root:
                    bad = next((e for e, n in zip(existing, entries) if e != n), existing[0] if existing else {"path": "?"})
                    want = next((n["sha256"] for n in entries if n["path"] == bad["path"]), "absent")
                    raise ctx.violation(file=f"{final.relative_to(ctx.ws.root)}/{bad['path']}", expected=want,
                                        actual=bad.get("sha256", "missing"), where=STAGE)
                shutil.rmtree(incoming)
            else:
                incoming.rename(final)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        dvc = dvc_add(ctx.ws.root, final, push=params.ingest.dvc_push)
    lock_text, lock_sha = environment_lock()
    env_path = ctx.path("environment.lock")
    env_path.write_text(lock_text)
    manifest = {
        "schema": "mlsec.manifest/v1",
        "run_id": ctx.run_id,
        "source": dataset.source,
        "ingested_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prepared_dir": str(final.relative_to(ctx.ws.root)),
        "files": entries,
        "merkle_root": root,
        "n": int(len(dataset.y)),
        "input_shape": list(dataset.input_shape),
        "num_classes": dataset.num_classes,
        "has_annotator_labels": dataset.annotator_labels is not None,
        **data_schema(dataset),
        "label_column": d.label_column if Path(dataset.source).suffix in (".csv", ".parquet") else None,
        "dvc": dvc,
        "git": code,
        "params_sha256": params.digest(),
        "environment_lock_sha256": lock_sha,
    }
    write_json(ctx.manifest_path, sign_document(manifest))
    ctx.record_outputs(STAGE, {"manifest": ctx.manifest_path, "environment_lock": env_path})
    summary = {"data_sha256": root, "prepared_dir": manifest["prepared_dir"], "dvc_md5": dvc["md5"], "n": manifest["n"],
               "input_shape": manifest["input_shape"], "num_classes": manifest["num_classes"], "kind": dataset.kind,
               "classes": manifest["classes"], "source": dataset.source,
               "git_commit": manifest["git"]["commit"], "seconds": round(time.time() - started, 3)}
    ctx.log("ingest.manifest", {k: summary[k] for k in ("data_sha256", "prepared_dir", "dvc_md5", "n", "source", "git_commit")})
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, run, argv, source_arg=True)


if __name__ == "__main__":
    raise SystemExit(main())
