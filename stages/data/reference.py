"""The drift reference: signed statistics of the data the current champion was trained on.

Written when a model is promoted (never by a run that was only submitted), read by validate.
A project that has a champion must have its reference: a missing or unreadable one fails
closed instead of silently turning drift checks off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.core.errors import IntegrityError
from stages.core.workspace import Workspace, write_json
from stages.trust.signing import sign_document, verify_document


def reference_path(ws: Workspace, project: str) -> Path:
    return ws.reference_dir / f"{project}.json"


def load_reference(ws: Workspace, project: str) -> dict[str, Any] | None:
    """The verified reference statistics, or None when the project has none yet."""
    path = reference_path(ws, project)
    if not path.exists():
        return None
    try:
        return verify_document(json.loads(path.read_text()))["statistics"]
    except (ValueError, KeyError):
        raise IntegrityError(f"drift reference {path} is unreadable; restore it or remove it to start a new baseline") from None


def save_reference(ws: Workspace, project: str, statistics: dict[str, Any], *, data_sha256: str) -> Path:
    """Sign and write the statistics of accepted data as the project's reference."""
    path = reference_path(ws, project)
    write_json(path, sign_document({"project": project, "data_sha256": data_sha256, "statistics": statistics}))
    return path
