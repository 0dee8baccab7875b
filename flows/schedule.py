"""Scheduled retraining: a Prefect deployment served by this process.

``mlsec schedule --cron '0 3 * * *'`` retrains on a cron schedule; ``--interval N
--on-change`` checks the data source every N seconds and retrains only when its bytes
changed since the last ingested version (SHA-256 of the source file or folder). The
deployment is served with ``flow.serve`` (no work pool needed); point ``PREFECT_API_URL``
at a ``prefect server`` to see and trigger it in the UI.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from stages.core.telemetry import telemetry_off

telemetry_off()  # before Prefect reads its settings at import

from prefect import flow, get_run_logger  # noqa: E402

from flows.pipeline import secure_training  # noqa: E402
from stages.core.errors import InvalidInput, PipelineError  # noqa: E402
from stages.core.params import load_params  # noqa: E402
from stages.core.workspace import Workspace, write_json  # noqa: E402
from stages.trust.hashing import hash_files, merkle_root, safe_files, sha256_file  # noqa: E402


def source_digest(source: str) -> str:
    """SHA-256 over a source file, or over the sorted files of a source folder."""
    if source.startswith("sklearn:"):
        return hashlib.sha256(source.encode()).hexdigest()
    path = Path(source)
    if path.is_dir():
        files = safe_files(path)
        digests = hash_files([str(p) for p in files])
        return merkle_root([{"path": str(p.relative_to(path)), "sha256": digests[str(p)].sha256, "size": digests[str(p)].size}
                            for p in files])
    if not path.is_file():
        raise InvalidInput(f"data source not found: {source}")

    return sha256_file(path)


@flow(name="retrain-on-change")
def retrain_on_change(data: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run secure-training when the data source changed since the last check."""
    ws = Workspace.from_env()
    params = load_params(ws.params_path, overrides or [])
    source = data or params.data.source
    digest = source_digest(source)
    state_path = ws.runs_dir / ".schedule-state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get(source) == digest:
        get_run_logger().info("data source %s unchanged (%s...): no retraining", source, digest[:16])
        return {"status": "unchanged", "source_sha256": digest}
    try:
        summary = secure_training(data=data, overrides=overrides or [], triggered_by="schedule:on-change")
    except PipelineError as err:
        summary = getattr(err, "summary", {"status": "failed", "error": str(err)})
    state[source] = digest
    write_json(state_path, state)
    return summary


def serve_schedule(*, cron: str | None, interval: int | None, on_change: bool, data: str | None, overrides: list[str],
                   name: str) -> None:
    """Serve the retraining deployment until interrupted."""
    if interval is not None and interval < 1:
        raise InvalidInput(f"--interval must be at least 1 second, got {interval}")
    if on_change:
        retrain_on_change.serve(name=name, cron=cron, interval=interval, parameters={"data": data, "overrides": overrides})
    else:
        secure_training.serve(name=name, cron=cron, interval=interval,
                              parameters={"data": data, "overrides": overrides, "triggered_by": f"schedule:{name}"})
