"""Servers that do not answer, scheduling without a persistent server, and the temporary
Prefect server of a one-off run, which must never outlive it (signals included)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.server import LOCAL_API, free_port
from tests.support import STANDARD_RUN, process_alive, run_cli, small_digits


def _children(pid: int, needle: str) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == pid and needle in cmd:
            found.append(int(stat.parent.name))
    return found


def _env_without_prefect(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(extra)
    return env


def _local_server_answers() -> bool:
    try:
        with urllib.request.urlopen(LOCAL_API + "/health", timeout=1):
            return True
    except OSError:
        return False


def test_scheduling_without_a_server_refuses_with_what_to_start(workspace):
    if _local_server_answers():
        pytest.skip(f"a Prefect server answers at {LOCAL_API}: scheduling would (rightly) reuse it")
    env = _env_without_prefect(MLSEC_ROOT=str(workspace))
    for args in (["schedule", "create", "--interval", "20", "--on-change", "--data", "sklearn:digits"], ["deploy"]):
        exe = Path(sys.executable).parent / "mlsec"
        proc = subprocess.run([str(exe), *args], cwd=workspace, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "prefect server start" in lines[0] and "PREFECT_API_URL" in lines[0], proc.stderr


@pytest.mark.parametrize("var", ["PREFECT_API_URL", "MLFLOW_TRACKING_URI"])
def test_a_server_that_is_down_is_one_line_naming_it(workspace, var, prefect_server):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api" if var == "PREFECT_API_URL" else f"http://127.0.0.1:{port}"
    started = time.monotonic()
    proc = run_cli(["run"], cwd=workspace, env_extra={var: url}, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "does not answer" in lines[0], proc.stderr
    assert time.monotonic() - started < 60  # bounded retries, not Prefect's or MLflow's own minutes
    assert not (workspace / "runs").exists() or not any((workspace / "runs").iterdir())  # nothing started


def test_temporary_server_dies_with_its_parent_even_on_sigkill(tmp_path):
    code = ("import sys, time\nfrom pathlib import Path\nfrom flows.server import temporary_server\n"
            "with temporary_server(Path(sys.argv[1])) as server:\n    print(server.ready(), flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "home")], env=_env_without_prefect(),
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        servers = _children(proc.pid, "uvicorn")
        assert len(servers) == 1 and process_alive(servers[0])
        proc.kill()  # SIGKILL: no handler, no atexit
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while process_alive(servers[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not process_alive(servers[0]), "the temporary server outlived its parent"
    finally:
        proc.kill()


@pytest.mark.slow
def test_mlsec_run_killed_by_sigterm_mid_screen_leaves_no_process(workspace):
    exe = Path(sys.executable).parent / "mlsec"
    proc = subprocess.Popen([str(exe), "run", "--set", "orchestration.workers=2"], cwd=workspace,
                            env=_env_without_prefect(MLSEC_ROOT=str(workspace)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        servers: list[int] = []
        workers: list[int] = []
        while not workers and time.monotonic() < deadline and proc.poll() is None:
            servers = servers or _children(proc.pid, "uvicorn")
            workers = _children(proc.pid, "multiprocessing.spawn")  # the screen's fan-out is running
            time.sleep(0.5)
        assert servers and workers, f"no temporary server or fan-out workers seen: {proc.poll()}"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)  # not the minutes the running items would take
        assert proc.returncode != 0
        deadline = time.monotonic() + 30
        while any(process_alive(p) for p in servers + workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in servers + workers if process_alive(p)], "a process outlived 'mlsec run'"
    finally:
        proc.kill()


@pytest.mark.slow
def test_mlsec_run_delivers_its_logs_before_stopping_its_temporary_server(workspace):
    """As a user runs it (no PREFECT_API_URL, run logs sent to the API): every log line of the
    run reaches its temporary server, the last one included, before the server stops. A line
    still queued when it stops would be retried against the closed port at exit, for a minute
    or more after the result was printed ("Error logging to API"), and then lost."""
    import sqlite3

    small_digits(workspace / "small.npz", seed=0)
    env = _env_without_prefect(MLSEC_ROOT=str(workspace), PREFECT_LOGGING_TO_API_ENABLED="true")
    proc = subprocess.run([str(Path(sys.executable).parent / "mlsec"), "run", "--json", "--data", "small.npz",
                           *[a for item in STANDARD_RUN for a in ("--set", item)]],
                          cwd=workspace, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 3), proc.stderr[-3000:]  # 3: this weakened run is not promoted
    assert "Error logging to API" not in proc.stderr, proc.stderr[-3000:]
    flow_run_id = json.loads(proc.stdout)["flow_run_id"]
    with contextlib.closing(sqlite3.connect(f"file:{workspace / '.prefect/temporary/prefect.db'}?mode=ro", uri=True)) as db:
        lines = [m for (m,) in db.execute("SELECT message FROM log WHERE flow_run_id = ? ORDER BY timestamp", (flow_run_id,))]
    assert lines and lines[-1].startswith("Finished in state"), lines[-3:]


def test_scheduling_an_undeployed_flow_says_to_deploy_first(workspace, prefect_server):
    proc = run_cli(["schedule", "create", "--interval", "60"], cwd=workspace, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "secure-training/secure-training is not registered" in lines[0] and "mlsec deploy" in lines[0]
