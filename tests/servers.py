"""Real servers for the integration tests, each a process on loopback with its own state:
a Prefect server (SQLite or PostgreSQL), an MLflow tracking server, a Prefect worker, and a
private PostgreSQL cluster from the distribution's packages."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, *, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s: {log.read_text()[-3000:]}")


def _processes() -> dict[int, tuple[int, int]]:
    """Process id -> (parent id, process group) of every live process (read from /proc)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if state != "Z":
            table[int(stat.parent.name)] = (int(ppid), int(pgrp))
    return table


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, children before grandchildren."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in _processes().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child)
    return found


def _running(pids: list[int], pgid: int | None) -> list[int]:
    """Which of ``pids``, and which members of the process group ``pgid``, still run."""
    return [pid for pid, (_, pgrp) in _processes().items() if pid in pids or pgrp == pgid]


def stop(proc: subprocess.Popen, *, group: bool = True, timeout_s: float = 20) -> None:
    """Stop ``proc`` and everything it started: its process group (``group``: it was started
    with ``start_new_session``; members stay in it after the leader exits) and the descendants
    that left the group (Prefect's runners start each flow run in a session of its own; MLflow's
    server starts uvicorn and job runners). SIGTERM first, SIGKILL for whatever still runs
    after ``timeout_s``."""
    pgid = proc.pid if group else None
    family = [proc.pid, *descendants(proc.pid)] if proc.poll() is None else []
    for pid in _running(family, pgid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout_s)
    while time.monotonic() < deadline and _running(family, pgid):
        time.sleep(0.2)
    for pid in _running(family, pgid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _running(family, pgid):  # SIGKILL is delivered, not waited for
        time.sleep(0.1)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"})
    env.update(extra)
    return env


@contextlib.contextmanager
def prefect_server(home: Path, *, database_url: str | None = None) -> Iterator[str]:
    """``prefect server start`` on loopback with its own home (and database)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = base_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false", PREFECT_SERVER_API_HOST="127.0.0.1",
                   PREFECT_SERVER_API_PORT=str(port), PREFECT_API_SERVICES_LATE_RUNS_ENABLED="false")
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    log = home / "server.log"
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", proc, log)
        yield url
    finally:
        stop(proc)


@contextlib.contextmanager
def mlflow_server(root: Path, *, backend_uri: str | None = None) -> Iterator[str]:
    """``mlflow server`` on loopback: tracking over HTTP, artifacts served by the server."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "mlflow-server.log"
    backend = backend_uri or f"sqlite:///{root / 'mlflow.db'}"
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", backend, "--artifacts-destination", str(root / "artifacts")],
                            env=base_env(), stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, log)
        yield url
    finally:
        stop(proc)


def start_worker(pool: str, log: Path, **env: str) -> subprocess.Popen:
    """``prefect worker start`` on a process pool, in its own process group (so a test can
    kill it and the flow runs it started, as a crashed machine would)."""
    return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                            env=base_env(PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5", **env),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def postgres_cluster(root: Path) -> Iterator[tuple[str, int]]:
    """A private PostgreSQL cluster (trust auth, loopback only) with the databases ``prefect``
    and ``mlflow``; yields (user, port). As root it runs as the ``postgres`` user, in a folder
    of its own under the system temporary directory (PostgreSQL refuses to run as root)."""
    import tempfile

    bindir = postgres_bin()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL server binaries not found (apt-get install postgresql-15)")
    base = Path(tempfile.mkdtemp(prefix="mlsec-pg-"))
    data, sockets = base / "data", base / "sock"
    sockets.mkdir()
    as_user: list[str] = []
    user = pwd.getpwuid(os.getuid()).pw_name
    if os.getuid() == 0:
        user = "postgres"
        as_user = ["runuser", "-u", "postgres", "--"]
        for path in (base, sockets):
            shutil.chown(path, "postgres", "postgres")
    port = free_port()
    log = base / "postgres.log"

    def run(*cmd: str) -> None:
        proc = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed: {(proc.stderr or proc.stdout)[-2000:]}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "120", "start", "-o",
            f"-h 127.0.0.1 -p {port} -k {sockets}")
        try:
            for db in ("prefect", "mlflow"):
                run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, db)
            yield user, port
        finally:
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=120)
    finally:
        shutil.rmtree(base, ignore_errors=True)
