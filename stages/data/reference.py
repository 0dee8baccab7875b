"""The drift reference: signed statistics of the data the current champion was trained on.

Written when a model is promoted (never by a run that was only submitted), read by validate.
Each write is recorded in the ledger (``reference.accept``, with the document's digest), so
the reference fails closed: once a project has accepted one, a missing, replaced (an older,
validly signed one put back included) or unreadable reference is an integrity violation
instead of silently turning drift checks off or moving their baseline.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from stages.core.canonical import canonical_json
from stages.core.errors import IntegrityError
from stages.core.workspace import Workspace, write_json
from stages.trust.ledger import Ledger
from stages.trust.signing import sign_document, verify_document

EVENT = "reference.accept"


def reference_path(ws: Workspace, project: str) -> Path:
    return ws.reference_dir / f"{project}.json"


def recorded_reference(ws: Workspace, project: str) -> dict[str, Any] | None:
    """The ledger's last ``reference.accept`` entry for ``project`` (payload, seq), or None."""
    for entry in reversed(Ledger(ws.ledger_path).entries()):
        if entry.get("event") == EVENT and entry["payload"].get("project") == project:
            return {**entry["payload"], "seq": entry["seq"]}
    return None


def load_reference(ws: Workspace, project: str) -> dict[str, Any] | None:
    """The verified reference statistics, or None when the project never accepted any.

    Raises ``IntegrityError`` when the ledger records a reference and the file is missing,
    unreadable, unsigned, or not the document recorded last.
    """
    path = reference_path(ws, project)
    recorded = recorded_reference(ws, project)
    if not path.exists():
        if recorded is None:
            return None
        raise IntegrityError(f"drift reference {path} is missing, but the ledger recorded one for {project} at seq "
                             f"{recorded['seq']} (data {str(recorded.get('data_sha256'))[:16]}...): drift checks cannot run; "
                             "restore the file")
    try:
        doc = json.loads(path.read_bytes())
        payload = verify_document(doc)
        statistics = payload["statistics"]
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"drift reference {path} is unreadable; restore it") from None
    if recorded is not None and hashlib.sha256(canonical_json(doc)).hexdigest() != recorded.get("reference_sha256"):
        raise IntegrityError(f"drift reference {path} is not the one the ledger recorded last (seq {recorded['seq']}): "
                             "it was replaced")
    if payload.get("project") != project:
        raise IntegrityError(f"drift reference {path} is for project {payload.get('project')!r}, not {project!r}")
    return statistics


def save_reference(ws: Workspace, project: str, statistics: dict[str, Any], *, data_sha256: str) -> Path:
    """Sign and write the statistics of accepted data as the project's reference, and record it."""
    path = reference_path(ws, project)
    doc = sign_document({"project": project, "data_sha256": data_sha256, "statistics": statistics})
    write_json(path, doc)
    Ledger(ws.ledger_path).append(EVENT, {"project": project, "data_sha256": data_sha256,
                                          "reference_sha256": hashlib.sha256(canonical_json(doc)).hexdigest(),
                                          "path": str(path.relative_to(ws.root))})
    return path
