"""The flow's side of fan-out and progress: a mapper backed by a Prefect task runner, and a
progress reporter for the terminal, the run log and the Prefect UI.

``orchestration.task_runner`` picks the runner (``auto``: a Dask cluster when
``orchestration.dask_address`` names one, else local processes); ``orchestration.workers``
how many local workers (0 = one per core). Each item of a fan-out is a Prefect task run
(named after the work, e.g. ``screen-evidence-2``), so the UI shows which fold, detector or
attack runs, and each finished item moves a progress artifact with the time left. Processes,
not threads, by default: the screening SVC and the small torch networks hold the GIL for
much of their time (see ``bench/orchestration.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner

from stages.core.errors import InvalidInput, PipelineError
from stages.core.fanout import Clock, serial_map
from stages.core.params import OrchestrationParams


def local_workers(orch: OrchestrationParams) -> int:
    return orch.workers or os.cpu_count() or 1


def runner_kind(orch: OrchestrationParams) -> str:
    if orch.task_runner != "auto":
        return orch.task_runner
    return "dask" if orch.dask_address else ("processes" if local_workers(orch) > 1 else "serial")


def make_runner(orch: OrchestrationParams):
    """The Prefect task runner ``orchestration`` asks for (not entered), or None for serial."""
    kind = runner_kind(orch)
    if kind == "serial":
        return None
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=local_workers(orch))
    if kind == "processes":
        return LocalProcessRunner(local_workers(orch))
    if kind == "dask":
        from prefect_dask import DaskTaskRunner  # Dask: only when a run fans out on it

        if orch.dask_address:
            return DaskTaskRunner(address=orch.dask_address, client_kwargs={"timeout": f"{orch.dask_timeout_s}s"})
        return DaskTaskRunner(cluster_kwargs={"n_workers": local_workers(orch), "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    raise InvalidInput(f"unknown orchestration.task_runner {kind!r}")


def prepare_worker() -> None:
    """Run once in each local worker process as it starts.

    * Import what the fan-out items run (torch, scikit-learn, the screening and attack code:
      about 6 s of CPU a process), so that a run pays it while its first stages run rather
      than in its first fan-out.
    * One thread for torch and for the BLAS and OpenMP pools: the pool has a worker per
      core, and a worker that starts a thread per core spin-waits against the others. On
      10,000 MNIST rows, the screening network took 85 s instead of 28.5 s beside the folds
      with torch's default threads; with BLAS's default threads for the nearest-neighbour
      search, the first wave of a screen took 62 s, with one 52 to 58 s.
    """
    import torch
    from threadpoolctl import threadpool_limits

    import stages.ml.robustness  # noqa: F401
    import stages.screening.prefetch  # noqa: F401

    torch.set_num_threads(1)
    threadpool_limits(1)  # for the rest of the process (the libraries loaded by the imports above)


class LocalProcessRunner(ProcessPoolTaskRunner):
    """Prefect's process pool, each worker prepared by :func:`prepare_worker`, with the two
    things a run needs that the pool does not offer: start every worker as the run enters the
    pool, and stop them at once when the run fails.

    Both reach the pool's ``concurrent.futures.ProcessPoolExecutor`` (``_executor``, and its
    ``_processes``): Prefect 3 has no public handle for either, and Python 3.11's executor no
    ``terminate_workers``. This class is the one place that depends on them; the fan-out
    tests fail if an upgrade moves them."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers=max_workers, initializer=prepare_worker)
        self._ready: list[Any] | None = None

    def duplicate(self) -> "LocalProcessRunner":
        return type(self)(self._max_workers)

    def __enter__(self) -> "LocalProcessRunner":
        super().__enter__()
        self._ready = None
        return self

    def start_workers(self) -> list[Any]:
        """Start every worker now rather than at the first item; a future per worker, done once
        it is ready (the same futures when called again)."""
        if self._executor is None:
            raise RuntimeError("the process pool is not entered")
        if self._ready is None:
            # ProcessPoolExecutor starts a worker per submitted item while none is idle
            self._ready = [self._executor.submit(int) for _ in range(self._max_workers)]
        return self._ready

    def _workers(self) -> dict[int, Any]:
        """The executor's worker processes by process id; none before the pool is entered."""
        return dict((self._executor._processes or {}) if self._executor is not None else {})

    def worker_pids(self) -> list[int]:
        """The process ids of the workers started so far."""
        return sorted(self._workers())

    def stop_workers_now(self) -> None:
        """Terminate the workers, whatever they run: a failed run does not wait for items whose
        results nobody will read."""
        for proc in self._workers().values():
            with contextlib.suppress(Exception):
                proc.terminate()


def start_workers(runner) -> list[Any]:
    """Start a local process pool's workers now; nothing for other runners (a Dask cluster's
    workers are already up, threads start with their items)."""
    return runner.start_workers() if isinstance(runner, LocalProcessRunner) else []


@task(name="fan-out", cache_policy=NO_CACHE, persist_result=False)
def fan_item(fn: Callable[[Any], Any], item: Any, label: str, index: int) -> Any:
    """One item of a fan-out: ``fn(item)``."""
    return fn(item)


class Progress:
    """Reports finished items of a named piece of work: a line with the time left on stderr
    and in the run log, and a Prefect progress artifact (its percentage and the same line)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._clock = Clock()
        self._artifacts: dict[str, Any] = {}

    def _log(self, text: str) -> None:
        try:
            get_run_logger().info(text)
        except Exception:  # noqa: BLE001 - outside a run: stderr only
            print(text, file=sys.stderr, flush=True)

    def __call__(self, label: str, done: int, total: int, note: str = "") -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        line = f"{self.stage}: {label} {self._clock.text(label, done, total)}" + (f" ({note})" if note else "")
        pct = 100.0 * done / max(1, total)
        try:
            if label not in self._artifacts:
                self._artifacts[label] = create_progress_artifact(progress=pct, description=line)
            else:
                update_progress_artifact(self._artifacts[label], progress=pct, description=line)
        except Exception:  # noqa: BLE001 - progress is a convenience, never a failure
            logging.getLogger(__name__).debug("progress artifact not written", exc_info=True)
        if done or note:
            self._log(line)


class TaskRunnerMapper:
    """``mapper(fn, items, label=...)`` through an entered Prefect task runner; serial when
    there is none or only one item. Results in the order of ``items``; the first failure
    raises (fail closed)."""

    def __init__(self, runner, progress: Progress | None = None) -> None:
        self.runner = runner
        self.progress = progress

    def __call__(self, fn: Callable[[Any], Any], items: Sequence[Any], *, label: str) -> list[Any]:
        items = list(items)
        if self.runner is None or len(items) < 2:
            return serial_map(fn, items, label=label, progress=self.progress)
        named = fan_item.with_options(name=label, task_run_name=f"{label}-{{index}}")
        if self.progress:
            self.progress(label, 0, len(items))
        futures = [self.runner.submit(named, parameters={"fn": fn, "item": item, "label": label, "index": i})
                   for i, item in enumerate(items)]
        index_of = {f.task_run_id: i for i, f in enumerate(futures)}
        for done, fut in enumerate(as_completed(futures), start=1):
            fut.result()  # raises the item's error at once
            if self.progress:
                self.progress(label, done, len(items), note=f"{label}-{index_of[fut.task_run_id]} finished")
        return [f.result() for f in futures]


def check_dask(address: str, *, timeout_s: float) -> None:
    """The Dask scheduler at ``address`` accepts a connection; one line otherwise."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme not in ("tcp", "tls") or not parsed.hostname or not parsed.port:
        raise InvalidInput(f"orchestration.dask_address must look like tcp://HOST:PORT, got {address!r}")
    deadline = time.monotonic() + timeout_s
    why = "no answer"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((parsed.hostname, parsed.port), timeout=min(3.0, timeout_s)):
                return
        except OSError as err:
            why = err.strerror or type(err).__name__
            time.sleep(0.5)
    raise PipelineError(f"the Dask scheduler at {address} does not answer ({why}, {timeout_s:g} s): start it "
                        "('dask scheduler') or unset orchestration.dask_address")


FANNED_OUT = ("screen", "evaluate")  # the stages whose cores take a mapper
PROGRESSED = ("train",)  # the stages whose cores take a progress reporter (epochs)
_RUN_MAPPERS: dict[str, Any] = {}


@contextlib.contextmanager
def mapper_for_run(run_id: str, runner) -> Iterator[None]:
    """Make ``runner`` the fan-out of run ``run_id`` for the block. Stage tasks look it up
    by run id instead of taking it as a parameter: Prefect records a task's parameters and
    hands them to its child tasks, and a pool of workers is no data to copy."""
    _RUN_MAPPERS[run_id] = runner
    try:
        yield
    finally:
        _RUN_MAPPERS.pop(run_id, None)


def run_mapper(run_id: str, stage: str) -> "TaskRunnerMapper":
    """The mapper (with progress reporting for ``stage``) of run ``run_id``."""
    return TaskRunnerMapper(_RUN_MAPPERS.get(run_id), Progress(stage))


@contextlib.contextmanager
def running(runner) -> Iterator[Any]:
    """Enter ``runner`` for the block. When the block ends in an exception (a failed check, a
    signal, a cancellation) the local worker processes are stopped at once: the run does not
    wait for fan-out items whose results nobody will read. Local workers start at once."""
    runner.__enter__()
    try:
        start_workers(runner)  # while the run's first stages work on this process
        yield runner
    except BaseException:
        if isinstance(runner, LocalProcessRunner):
            runner.stop_workers_now()
        runner.__exit__(*sys.exc_info())
        raise
    runner.__exit__(None, None, None)
