"""Maintenance playbooks (see docs/playbooks.md).

``rollback``: point ``champion`` back at the previous champion, with a reason in the ledger.
``purge-retrain``: after a poisoning incident, take the rows a run quarantined out of the
data, version the purged dataset as a new source (the original stays in DVC, untouched and
restorable), roll the model back, and optionally retrain on the purged data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stages.core.errors import InvalidInput, PipelineError
from stages.core.workspace import Workspace
from stages.data.prepared import parse_prepared
from stages.models.promotion import rollback
from stages.models.store import mlflow_aliases
from stages.trust.context import RunContext
from stages.trust.ledger import Ledger


def purge_quarantined(ws: Workspace, run_id: str) -> dict[str, Any]:
    """Write the run's data minus its quarantined rows to ``data/purged/<run>.npz``."""
    ctx = RunContext(ws, run_id, paranoid=True)
    files, manifest = ctx.dataset_bytes(where="playbook")
    qpath = ws.quarantine_dir / run_id / "quarantine.json"
    if not qpath.exists():
        raise InvalidInput(f"run {run_id} has no quarantine list at {qpath}")
    quarantine = ctx.read_input_json("quarantine", where="playbook")
    drop = sorted({int(s["index"]) for s in quarantine["samples"]})
    X, y, ann, _ = parse_prepared(files)
    keep = np.setdiff1d(np.arange(len(y)), np.asarray(drop, dtype=np.int64))
    out = ws.root / "data" / "purged" / f"{run_id}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"X": X[keep], "y": y[keep]}
    if ann is not None:
        arrays["annotator_labels"] = ann[keep]
    np.savez(out, **arrays)
    return {"purged_rows": len(drop), "kept_rows": int(len(keep)), "source": str(out), "from_data_sha256": manifest["merkle_root"]}


def run_maintenance(ws: Workspace, playbook: str, *, model: str, run_id: str | None, reason: str,
                    retrain: bool) -> dict[str, Any]:
    """``rollback`` or ``purge-retrain``, with a start and a finish entry in the ledger."""
    ledger = Ledger(ws.ledger_path)
    ledger.append("playbook.start", {"playbook": playbook, "model": model, "run_id": run_id, "reason": reason})
    result: dict[str, Any] = {"playbook": playbook, "model": model}
    if playbook == "rollback":
        result["rollback"] = rollback(ws, model, reason=reason)
    elif playbook == "purge-retrain":
        if not run_id:
            raise InvalidInput("purge-retrain needs --run-id (the run whose quarantine list to purge)")
        result["purge"] = purge_quarantined(ws, run_id)
        if "champion" in mlflow_aliases(ws, model):
            try:
                result["rollback"] = rollback(ws, model, reason=f"purge-retrain: {reason}")
            except PipelineError as err:
                result["rollback"] = {"skipped": str(err)}
        if retrain:
            from flows.pipeline import (
                secure_training,  # the flow module imports every stage: only for a retrain
            )

            try:
                result["retrain"] = secure_training(data=result["purge"]["source"], triggered_by=f"playbook:{playbook}")
            except PipelineError as err:
                result["retrain"] = getattr(err, "summary", {"status": "failed", "error": str(err)})
    ledger.append("playbook.finish", {"playbook": playbook, "model": model,
                                      "result": {k: v for k, v in result.items() if k != "retrain"}})
    return result
