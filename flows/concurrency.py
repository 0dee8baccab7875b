"""One run at a time per registered model where it touches the model's aliases.

From reading the champion (for the gate's no-regression check) to registering the new
version and moving ``challenger`` (and ``champion``), a run holds its model's lock; a second
run of the same model waits there, and after ``orchestration.model_lock_timeout_s`` it
stops with a clear message. Two locks, taken in this order:

* on a persistent Prefect server, the global concurrency limit ``mlsec-model-<name>`` (one
  slot; created active if missing). It holds across machines, and its lease runs out when
  the holder dies, so a killed worker cannot block the model for ever;
* always, a file lock in the workspace (``runs/.locks/model-<name>.lock``), which covers runs
  on temporary servers and other processes on this machine.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from filelock import FileLock, Timeout

from flows.server import TEMPORARY_ENV
from stages.core.errors import PipelineError
from stages.core.workspace import Workspace

LEASE_S = 60.0  # renewed while the holder lives


class ModelBusy(PipelineError):
    """Another run of the same model held its lock for longer than the run would wait."""


def limit_name(model: str) -> str:
    return f"mlsec-model-{model}"


def _persistent_server() -> bool:
    return bool(os.environ.get("PREFECT_API_URL")) and not os.environ.get(TEMPORARY_ENV)


def ensure_limit(model: str) -> None:
    """Create the model's one-slot global concurrency limit when it is missing."""
    from prefect.client.orchestration import get_client  # Prefect: slow to import
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(limit_name(model))
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit_name(model), limit=1, active=True))
        except ObjectAlreadyExists:
            pass  # another run created it at the same time


@contextlib.contextmanager
def model_lock(ws: Workspace, model: str, *, timeout_s: float, logger=None) -> Iterator[None]:
    """Hold ``model``'s lock for the block; ModelBusy after ``timeout_s`` of waiting."""
    busy = (f"another run of model {model!r} is registering or promoting it (waited {timeout_s:g} s, "
            "orchestration.model_lock_timeout_s); rerun when it has finished")
    with contextlib.ExitStack() as stack:
        if _persistent_server():
            from prefect.concurrency.sync import concurrency  # Prefect: slow to import

            ensure_limit(model)
            if logger:
                logger.info("waiting for the lock of model %s (concurrency limit %s)", model, limit_name(model))
            try:
                stack.enter_context(concurrency(limit_name(model), occupy=1, timeout_seconds=timeout_s, strict=True,
                                                lease_duration=LEASE_S))
            except TimeoutError:
                raise ModelBusy(busy) from None
        path = ws.runs_dir / ".locks" / f"model-{model}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout:
            raise ModelBusy(busy) from None
        stack.callback(lock.release)
        yield
