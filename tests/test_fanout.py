"""Fan-out: the same cores give the same answers serially, on local worker processes and on a
Dask cluster; progress says how much is left."""

from __future__ import annotations

import time

import numpy as np
import pytest

from stages.core.fanout import eta_text, serial_map
from stages.core.params import OrchestrationParams, load_params
from tests.support import ROOT, process_alive


def _digits(n: int = 400):
    from stages.data.io import load_source

    d = load_source("sklearn:digits")
    idx = np.random.default_rng(0).choice(len(d.y), n, replace=False)
    return d.X[idx], d.y[idx]


def _fast_screen():
    # 5 epochs: after 2 the net doubts most rows, and shortcuts would make no refit to fan out
    params = load_params(ROOT / "params.yaml", ["screen.folds=3", "screen.backdoor_epochs=5"]).screen
    return params


def test_eta_text():
    assert eta_text(0, 4, 0.0) == "0/4"
    assert eta_text(1, 4, 30.0) == "1/4, about 1m30s left"
    assert eta_text(4, 4, 61.0) == "4/4 in 1m01s"
    # a resumed loop: 2 of 10 were done before the clock started, 2 more took 20 s
    assert eta_text(4, 10, 20.0, first=2) == "4/10, about 1m00s left"
    assert eta_text(2, 10, 5.0, first=2) == "2/10"


def test_clock_restarts_when_work_goes_back(monkeypatch):
    from stages.core import fanout

    now = [100.0]
    monkeypatch.setattr(fanout.time, "monotonic", lambda: now[0])
    clock = fanout.Clock()
    assert clock.text("epochs", 3, 10) == "3/10"  # resumed at 3: nothing timed yet
    now[0] += 10
    assert clock.text("epochs", 4, 10) == "4/10, about 1m00s left"
    now[0] += 10
    assert clock.text("epochs", 2, 10) == "2/10"  # restored to epoch 2: timed again from here
    now[0] += 5
    assert clock.text("epochs", 3, 10) == "3/10, about 35s left"


def test_serial_map_keeps_order_and_reports_progress():
    seen = []
    out = serial_map(lambda v: v * v, [3, 1, 2], label="sq", progress=lambda label, done, total, note="": seen.append((done, total)))
    assert out == [9, 1, 4]
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]


def _screen_with(mapper):
    from stages.screening import screen_dataset

    X, y = _digits()
    y = y.copy()
    y[:12] = (y[:12] + 1) % 10  # a few flips so that something is flagged
    return screen_dataset(X, y, params=_fast_screen(), mapper=mapper)


@pytest.fixture(scope="module")
def serial_findings():
    return _screen_with(None)


def _same(a, b) -> None:
    assert a.flags == b.flags
    assert np.array_equal(a.labels, b.labels)
    assert {k: v["flagged"] for k, v in a.per_detector.items()} == {k: v["flagged"] for k, v in b.per_detector.items()}


def test_screen_on_worker_processes_matches_serial(serial_findings, prefect_server):
    from flows.fanout import Progress, TaskRunnerMapper, make_runner

    assert serial_findings.flags, "the flipped rows should be flagged"
    runner = make_runner(OrchestrationParams(task_runner="processes", workers=2))
    seen = []

    class Recorder(Progress):
        def __call__(self, label, done, total, note=""):
            seen.append((label, done, total))

    with runner:
        findings = _screen_with(TaskRunnerMapper(runner, Recorder("screen")))
    _same(findings, serial_findings)
    # 3 folds + the screening net + the trimmed neighbours, the cross-class residuals and the
    # Datalab audit, each reported when done
    assert [s for s in seen if s[1] and s[0] == "screen-evidence"] == [("screen-evidence", i, 7) for i in range(1, 8)]
    # the refits without the doubted rows ran their folds on the workers too, label issues' second
    # fit and shortcuts' first round in one batch (3 folds each) with the trigger-group search,
    # later shortcut rounds on their own
    refits = [s[2] for s in seen if s[0] == "screen-refit" and s[1] == s[2]]
    assert refits and refits[0] == 7 and all(n == 3 for n in refits[1:]), seen
    detectors = _fast_screen().detectors
    assert [s for s in seen if s[0] == "detectors"][-1] == ("detectors", len(detectors), len(detectors))


@pytest.mark.parametrize("kind", ["image", "table"])
def test_fan_out_items_are_the_contexts_own_recipes(monkeypatch, kind):
    """Each piece of shared evidence has one recipe: a screen that computes it on first use
    and one that fans it out ahead of the detectors call the same function on the same
    arguments, so a recipe changed in one place changes both paths."""
    import hashlib
    import pickle

    from stages.screening import context
    from stages.screening.context import Recipe, ScreenContext, check_screen_inputs
    from stages.screening.prefetch import prefetch_evidence

    def stand_in(key):
        return lambda *args: (key, hashlib.sha256(pickle.dumps(args)).hexdigest())

    keys = list(context.RECIPES)
    for key in keys:
        monkeypatch.setitem(context.RECIPES, key, Recipe(stand_in(key), context.RECIPES[key].inputs))
    X, y = _digits(120)
    X, y, _, k = check_screen_inputs(X if kind == "image" else X.reshape(len(X), -1), y, None)

    def ctx():
        return ScreenContext(X, y, params=_fast_screen(), num_classes=k, annotator_labels=None)

    lazy, ahead = ctx(), ctx()
    # the detectors that read these pieces, none that needs the K-fold probabilities
    computed = prefetch_evidence(ahead, ["loss_isolation", "stamps", "spectral", "outliers"], serial_map)
    assert sorted(computed) == sorted(keys)
    for key in keys:
        assert ahead._cache[key] == lazy.evidence(key), key


def _threads(_: int) -> tuple[int, tuple[int, ...]]:
    import torch
    from threadpoolctl import threadpool_info

    return torch.get_num_threads(), tuple(sorted({pool["num_threads"] for pool in threadpool_info()}))


def test_local_workers_start_with_the_run_on_one_thread_each(prefect_server):
    """Workers start when the run enters the pool, not at its first fan-out, and each runs
    torch, BLAS and OpenMP on one thread: a worker per core that started a thread per core
    would spin-wait against the others."""
    from concurrent.futures import wait

    from flows.fanout import TaskRunnerMapper, make_runner, running, start_workers

    with running(make_runner(OrchestrationParams(task_runner="processes", workers=2))) as runner:
        ready = start_workers(runner)  # the futures running() started
        assert len(ready) == 2
        wait(ready, timeout=120)
        assert all(f.done() and f.exception() is None for f in ready)
        assert len(runner.worker_pids()) == 2, "the workers should be up before any item"
        seen = TaskRunnerMapper(runner)(_threads, [0, 1, 2, 3], label="threads")
    assert set(seen) == {(1, (1,))}, seen


def test_a_failed_run_stops_its_workers_without_waiting_for_their_items(prefect_server):
    """A check that fails while fan-out items run (here: a second item that raises while the
    first sleeps for ten minutes) ends the run at once, and no worker outlives it."""
    from concurrent.futures import wait

    from flows.fanout import TaskRunnerMapper, make_runner, running

    started = time.monotonic()
    with pytest.raises(ZeroDivisionError):
        with running(make_runner(OrchestrationParams(task_runner="processes", workers=2))) as runner:
            wait(runner.start_workers(), timeout=120)
            pids = runner.worker_pids()
            assert len(pids) == 2
            TaskRunnerMapper(runner)(_sleep_or_invert, [600, 0], label="slow-and-failing")
    assert time.monotonic() - started < 300, "the run waited for the sleeping item"
    deadline = time.monotonic() + 30
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in pids if process_alive(pid)], "a worker outlived the failed run"


def _sleep_or_invert(v: int) -> float:
    if v:
        time.sleep(v)
    return 1 / v


def test_screen_on_a_dask_cluster_matches_serial(serial_findings, prefect_server):
    from distributed import LocalCluster

    from flows.fanout import TaskRunnerMapper, make_runner

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        runner = make_runner(OrchestrationParams(task_runner="auto", dask_address=cluster.scheduler_address))
        assert type(runner).__name__ == "DaskTaskRunner"
        with runner:
            findings = _screen_with(TaskRunnerMapper(runner))
    _same(findings, serial_findings)


@pytest.mark.parametrize("early_exit", [True, False])
def test_attacks_on_worker_processes_match_serial(prefect_server, early_exit):
    import torch

    from flows.fanout import TaskRunnerMapper, make_runner
    from stages.ml.nets import build_model
    from stages.ml.robustness import CHUNK_ROWS, evaluate_robustness

    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10)
    X, y = _digits(CHUNK_ROWS + 300)  # two chunks
    kwargs = dict(epsilons=[0.05, 0.1], pgd_steps=3, restarts=2, seed=7, early_exit=early_exit)
    serial = evaluate_robustness(model, X, y, **kwargs)
    with make_runner(OrchestrationParams(task_runner="processes", workers=2)) as runner:
        fanned = evaluate_robustness(model, X, y, mapper=TaskRunnerMapper(runner), **kwargs)
    assert np.array_equal(serial.correct, fanned.correct)
    assert serial.robust_accuracy == fanned.robust_accuracy


def test_a_failing_item_fails_the_fan_out(prefect_server):
    from flows.fanout import TaskRunnerMapper, make_runner

    with make_runner(OrchestrationParams(task_runner="threads", workers=2)) as runner:
        with pytest.raises(ZeroDivisionError):
            TaskRunnerMapper(runner)(_invert, [1, 0, 2], label="invert")


def _invert(v: int) -> float:
    return 1 / v


def test_a_dask_scheduler_that_does_not_answer_is_one_line():
    from flows.fanout import check_dask
    from flows.server import free_port
    from stages.core.errors import InvalidInput, PipelineError

    port = free_port()
    with pytest.raises(PipelineError, match=f"Dask scheduler at tcp://127.0.0.1:{port} does not answer"):
        check_dask(f"tcp://127.0.0.1:{port}", timeout_s=1.5)
    with pytest.raises(InvalidInput, match="tcp://HOST:PORT"):
        check_dask("not an address", timeout_s=1)
