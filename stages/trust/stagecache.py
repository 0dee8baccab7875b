"""Reuse of a stage's results from an earlier run with the same verified inputs and settings.

A stage is skipped only when everything it depends on is provably the same, and the key
says so from signed records only:

    key = SHA-256(canonical JSON of {stage, the digest of the code of ``stages/``, the
          environment lock digest and data Merkle root from this run's verified manifest,
          the stage's settings, the digests of its inputs from this run's signed index})

When a cacheable stage finishes, :func:`store` writes ``runs/<run>/cache/<stage>.json`` (the
key, what went into it, the stage's result and the names of its outputs) and records it in
the run's signed artifact index, then leaves a pointer ``runs/.stage-cache/<stage>/<key>``
naming the run. :func:`lookup` follows a pointer only as far as the signed records allow:
the pointed-to run's index must verify and hold a cache record with this very key, and the
record and every output it names must match their signed digests, re-hashed (no stat
cache). A pointer that leads nowhere (the run was deleted, or it holds another key) is a
miss; a record or output that does not match its signature is an integrity violation (exit
4), recorded in the ledger. :func:`replay` copies the verified outputs into this run and
records them in this run's own signed index, so later stages verify them as usual.

A cache hit never skips a verification or a decision: the stage core's pure computation
is what is reused; the inputs are verified to compute the key, and the caller still runs
every check and decision that follows from the reused result.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from stages.core.canonical import canonical_json
from stages.core.workspace import write_json
from stages.trust.context import RunContext
from stages.trust.hashing import check_relative_path

SCHEMA = "mlsec.stage-cache/v1"
CODE_ROOT = Path(__file__).resolve().parents[1]  # the stages package


@lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 over the path and bytes of every Python file of the ``stages`` package."""
    h = hashlib.sha256()
    for path in sorted(CODE_ROOT.rglob("*.py")):
        h.update(str(path.relative_to(CODE_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def cache_key(ctx: RunContext, stage: str, *, settings: dict[str, Any], inputs: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """(key, material) for ``stage`` of run ``ctx``: ``inputs`` maps names to digests the
    caller read from verified records; the manifest is verified here."""
    manifest = ctx.manifest()
    material = {"schema": SCHEMA, "stage": stage, "code_sha256": code_digest(),
                "environment_lock_sha256": manifest.get("environment_lock_sha256"),
                "data_sha256": manifest["merkle_root"], "settings": settings, "inputs": dict(sorted(inputs.items()))}
    return hashlib.sha256(canonical_json(material)).hexdigest(), material


def _pointer(ctx: RunContext, stage: str, key: str) -> Path:
    return ctx.ws.runs_dir / ".stage-cache" / stage / key


def record_name(stage: str) -> str:
    return f"cache_{stage}"


def store(ctx: RunContext, stage: str, key: str, material: dict[str, Any], *, result: dict[str, Any],
          outputs: list[str]) -> None:
    """Record that this run's ``stage`` with ``key`` produced ``result`` and ``outputs``."""
    body = {"schema": SCHEMA, "run_id": ctx.run_id, "stage": stage, "key": key, "material": material,
            "result": result, "outputs": list(outputs)}
    path = ctx.path("cache", f"{stage}.json")
    write_json(path, body)
    ctx.record_outputs(stage, {record_name(stage): path})
    pointer = _pointer(ctx, stage, key)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(ctx.run_id + "\n")


def lookup(ctx: RunContext, stage: str, key: str) -> dict[str, Any] | None:
    """The verified cache record of an earlier run for ``stage`` and ``key``, or None."""
    pointer = _pointer(ctx, stage, key)
    if not pointer.is_file():
        return None
    source_id = pointer.read_text().strip()
    if source_id == ctx.run_id:
        return None
    try:
        source = RunContext(ctx.ws, source_id, paranoid=True)
        if not source.artifacts_path.exists():
            return None  # the run was deleted: a miss
    except Exception:  # noqa: BLE001 - an unusable pointer (bad run id) is a miss
        return None
    index = source.recorded()  # signature verified; a forged index raises IntegrityError
    rec = index.get(record_name(stage))
    if rec is None:
        return None
    body = json.loads(_verified_bytes(ctx, source, rec, where=f"{stage} cache"))
    if body.get("key") != key or body.get("stage") != stage or body.get("run_id") != source_id:
        return None  # the pointer leads to another computation: a miss
    data = {}
    for name in body["outputs"]:
        if name not in index:
            raise ctx.violation(file=f"runs/{source_id}/artifacts.json", expected=name, actual="absent",
                                where=f"{stage} cache")
        data[name] = _verified_bytes(ctx, source, index[name], where=f"{stage} cache")
    return {**body, "index": {name: index[name] for name in body["outputs"]}, "data": data}


def _verified_bytes(ctx: RunContext, source: RunContext, rec: dict[str, Any], *, where: str) -> bytes:
    check_relative_path(rec["path"])
    path = source.run_dir / rec["path"]
    if not path.is_file() or path.is_symlink():
        raise ctx.violation(file=f"runs/{source.run_id}/{rec['path']}", expected=rec["sha256"], actual="missing", where=where)
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != rec["sha256"]:
        raise ctx.violation(file=f"runs/{source.run_id}/{rec['path']}", expected=rec["sha256"], actual=actual, where=where)
    return data


def replay(ctx: RunContext, stage: str, hit: dict[str, Any]) -> dict[str, Path]:
    """Write the verified bytes of ``hit``'s outputs (read once, when they were checked) into
    this run and record them in this run's signed index; return their paths, by name."""
    written: dict[str, Path] = {}
    for name, rec in hit["index"].items():
        check_relative_path(rec["path"])
        dest = ctx.path(rec["path"])
        dest.write_bytes(hit["data"][name])
        written[name] = dest
    ctx.record_outputs(stage, written)
    ctx.log("stage.cached", {"stage": stage, "from_run": hit["run_id"], "key": hit["key"]})
    return written


def reused_json(hit: dict[str, Any], name: str) -> dict[str, Any]:
    """A reused JSON output, parsed from the bytes that were verified."""
    return json.loads(hit["data"][name])
