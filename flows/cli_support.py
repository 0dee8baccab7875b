"""What every ``mlsec`` command shares: the workspace it acts on and how it prints."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from stages.core.workspace import Workspace


def workspace() -> Workspace:
    """The workspace of ``MLSEC_ROOT`` (or the current folder); Prefect keeps its state in it."""
    ws = Workspace.from_env()
    os.environ.setdefault("PREFECT_HOME", str(ws.root / ".prefect"))
    return ws


def emit(obj: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    """Print ``obj`` as sorted JSON (``--json``) or as ``text(obj)``."""
    print(json.dumps(obj, sort_keys=True, default=str) if as_json else text(obj))
