"""What every ``mlsec`` command shares: the workspace it acts on, how it prints, the
services a flow command needs and the one-line form of expected failures."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Callable

from flows.server import check_services, configured_server, temporary_server
from stages.core.errors import PipelineError
from stages.core.workspace import Workspace


def workspace() -> Workspace:
    """The workspace of ``MLSEC_ROOT`` (or the current folder); Prefect keeps its state in it."""
    ws = Workspace.from_env()
    os.environ.setdefault("PREFECT_HOME", str(ws.root / ".prefect"))
    return ws


def emit(obj: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    """Print ``obj`` as sorted JSON (``--json``) or as ``text(obj)``."""
    print(json.dumps(obj, sort_keys=True, default=str) if as_json else text(obj))


def quiet_expected_failures() -> None:
    """Expected failures (bad input, rejection, integrity) are one line: drop the traceback
    Prefect's engine attaches to its log records (``--debug`` keeps them)."""

    class DropTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            exc = record.exc_info[1] if record.exc_info else None
            if isinstance(exc, PipelineError):
                record.exc_info, record.exc_text = None, None
            return True

    drop = DropTraceback()
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(drop)


def services(ws: Workspace, params) -> contextlib.AbstractContextManager:
    """Check the configured servers answer (one line naming the URL otherwise); without
    PREFECT_API_URL, a temporary Prefect server this process owns and always stops."""
    check_services(mlflow_uri=ws.mlflow_uri)
    if params.orchestration.dask_address and params.orchestration.task_runner in ("auto", "dask"):
        from flows.fanout import check_dask  # Prefect: slow to import; only when a Dask cluster is named

        check_dask(params.orchestration.dask_address, timeout_s=params.orchestration.dask_timeout_s)
    if os.environ.get("PREFECT_API_URL"):
        return contextlib.nullcontext(configured_server())
    return temporary_server(ws.root / ".prefect" / "temporary")
