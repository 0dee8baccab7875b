"""The data watcher: hash the data source and, only when its bytes changed since the last
look, emit ``mlsec.data.changed`` (docs/events.md). The automation ``mlsec deploy`` creates
starts ``secure-training`` on that event; an unchanged source starts nothing. It runs as the
``data-watch`` deployment, on the schedule ``mlsec schedule create --on-change`` gives it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from filelock import FileLock

from stages.core.telemetry import telemetry_off

telemetry_off()  # before Prefect reads its settings at import

from prefect import flow, get_run_logger  # noqa: E402

from stages.core import events  # noqa: E402
from stages.core.errors import InvalidInput, PipelineError  # noqa: E402
from stages.core.params import load_params  # noqa: E402
from stages.core.workspace import Workspace, write_json  # noqa: E402
from stages.trust.hashing import hash_files, merkle_root, safe_files, sha256_file  # noqa: E402


def source_digest(source: str, *, root: Path | None = None) -> str:
    """SHA-256 over a source file, or the Merkle root over the sorted files of a source folder."""
    if source.startswith("sklearn:"):
        return hashlib.sha256(source.encode()).hexdigest()
    path = Path(source) if root is None else (root / source)
    if path.is_dir():
        files = safe_files(path)
        digests = hash_files([str(p) for p in files])
        return merkle_root([{"path": str(p.relative_to(path)), "sha256": digests[str(p)].sha256, "size": digests[str(p)].size}
                            for p in files])
    if not path.is_file():
        raise InvalidInput(f"data source not found: {source}")
    return sha256_file(path)


@flow(name="data-watch")
def data_watch(data: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Emit ``mlsec.data.changed`` when the source's bytes changed since the last look."""
    ws = Workspace.from_env()
    params = load_params(ws.params_path, overrides or [])
    source = data or params.data.source
    digest = source_digest(source, root=ws.root)
    state_path = ws.runs_dir / ".data-watch.json"
    state_path.parent.mkdir(parents=True, exist_ok=True)
    key = f"{params.project.name}:{source}"
    logger = get_run_logger()
    with FileLock(str(state_path) + ".lock", timeout=60):
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        previous = state.get(key)
        if previous == digest:
            logger.info("data source %s unchanged (sha256 %s...): nothing to run", source, digest[:16])
            return {"status": "unchanged", "source": source, "source_sha256": digest}
        sent = events.emit(events.DATA_CHANGED, {"model": params.project.name, "source": source, "source_sha256": digest,
                                                 "previous_sha256": previous})
        if sent is None:
            raise PipelineError(f"could not send {events.DATA_CHANGED}: no Prefect API (set PREFECT_API_URL)")
        state[key] = digest
        write_json(state_path, state)
    logger.info("data source %s changed (sha256 %s... -> %s...): sent %s", source, str(previous)[:16], digest[:16],
                events.DATA_CHANGED)
    return {"status": "changed", "source": source, "source_sha256": digest, "previous_sha256": previous}
