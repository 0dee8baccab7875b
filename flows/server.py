"""Where the Prefect and MLflow servers are, whether they answer, and the temporary Prefect
server a one-off run owns.

* :func:`scheduling_api`: the Prefect API that deployments and schedules live on:
  ``PREFECT_API_URL``, else a persistent local server already answering on
  ``127.0.0.1:4200`` (reused, and said so); otherwise it refuses with one line saying what to
  start. A temporary server forgets its schedules when the command exits, so scheduling on
  one would silently do nothing.
* :func:`check_services`: the configured Prefect and MLflow servers answer their health
  endpoint, after a few bounded retries; otherwise one line naming the URL (exit 1), before
  any work starts.
* :func:`temporary_server`: ``mlsec run`` without ``PREFECT_API_URL`` starts its own Prefect
  server on loopback and stops it when it ends for any reason: a clean exit, an exception,
  SIGTERM or SIGHUP (turned into an exit), and SIGKILL (the server gets the parent-death
  signal), so no server outlives the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from stages.core.errors import InvalidInput, PipelineError

LOCAL_API = "http://127.0.0.1:4200/api"
HEALTH_TRIES = 3
TEMPORARY_ENV = "MLSEC_PREFECT_TEMPORARY"  # set while the Prefect API is a run's own temporary server


class ServiceUnavailable(PipelineError):
    """A configured server does not answer (exit 1)."""


def _health(url: str, timeout: float = 3.0) -> str | None:
    """None when ``url`` answers 200, else why not (one short phrase)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - our own configured servers
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return str(reason).split("] ")[-1][:120] or type(err).__name__


def wait_healthy(url: str, *, tries: int = HEALTH_TRIES, first_delay_s: float = 0.5) -> str | None:
    """Probe ``url`` up to ``tries`` times with doubling delays; None once it answers."""
    why = None
    delay = first_delay_s
    for attempt in range(tries):
        why = _health(url)
        if why is None:
            return None
        if attempt < tries - 1:
            time.sleep(delay)
            delay *= 2
    return why


def prefect_health_url(api_url: str) -> str:
    return api_url.rstrip("/") + "/health"


def mlflow_health_url(tracking_uri: str) -> str | None:
    """The health endpoint of an MLflow tracking server, None for a file or database store."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return tracking_uri.rstrip("/") + "/health"


def _require_prefect(api: str, *, hint: str) -> None:
    """Raise ServiceUnavailable, saying what to do (``hint``), when the Prefect API does not answer."""
    why = wait_healthy(prefect_health_url(api))
    if why:
        raise ServiceUnavailable(f"the Prefect server at {api} does not answer ({why}, {HEALTH_TRIES} tries): {hint}")


def check_services(*, mlflow_uri: str | None = None) -> None:
    """Fail fast, before any stage runs, when a configured server does not answer."""
    api = os.environ.get("PREFECT_API_URL")
    if api:
        _require_prefect(api, hint="start it ('prefect server start') or unset PREFECT_API_URL")
    health = mlflow_health_url(mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", ""))
    if health:
        why = wait_healthy(health)
        if why:
            raise ServiceUnavailable(f"the MLflow server at {health.rsplit('/health', 1)[0]} does not answer ({why}, "
                                     f"{HEALTH_TRIES} tries): start it ('mlflow server ...') or unset MLFLOW_TRACKING_URI")


def scheduling_api() -> str:
    """The API URL schedules and deployments go to; sets ``PREFECT_API_URL`` when reusing the
    local server. Refuses (exit 2) when there is none: nothing would ever run the schedule."""
    api = os.environ.get("PREFECT_API_URL")
    if api:
        _require_prefect(api, hint="start it with 'prefect server start'")
        return api
    if _health(prefect_health_url(LOCAL_API), timeout=2.0) is None:
        print(f"mlsec: using the Prefect server at {LOCAL_API} (PREFECT_API_URL is not set)", file=sys.stderr)
        os.environ["PREFECT_API_URL"] = LOCAL_API
        return LOCAL_API
    raise InvalidInput("schedules and deployments need a persistent Prefect server: start one with 'prefect server start' "
                       f"(and a worker: 'prefect worker start --pool mlsec'), then set PREFECT_API_URL={LOCAL_API}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with(parent: int):
    """preexec_fn: the child gets SIGTERM when its parent dies, however it dies (Linux)."""
    def set_death_signal() -> None:
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return set_death_signal


def _exit_on_signal(signum: int, frame) -> None:  # noqa: ANN001 - signal handler signature
    raise SystemExit(128 + signum)


class _Starting:
    """A server process on its way up: :meth:`ready` waits until it answers."""

    def __init__(self, proc: subprocess.Popen | None, url: str, log: Path | None, timeout_s: float) -> None:
        self.proc, self.url, self.log, self.timeout_s = proc, url, log, timeout_s

    def ready(self) -> str:
        if self.proc is None:
            return self.url
        deadline = time.monotonic() + self.timeout_s
        while _health(prefect_health_url(self.url), timeout=2.0) is not None:
            if self.proc.poll() is not None:
                raise ServiceUnavailable(f"the temporary Prefect server exited with code {self.proc.returncode}; see {self.log}")
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"the temporary Prefect server did not answer within {self.timeout_s:.0f} s; "
                                         f"see {self.log}")
            time.sleep(0.2)
        return self.url


def configured_server() -> _Starting:
    """The configured server (``PREFECT_API_URL``), as something to call ``ready()`` on."""
    return _Starting(None, os.environ.get("PREFECT_API_URL", ""), None, 0)


def _send_what_prefect_holds(timeout_s: float = 10.0) -> None:
    """Let Prefect's background senders (run logs, events) deliver what they still hold while
    the server is up: once it has stopped, each would retry against the closed port at
    interpreter exit, a minute or more after the run has printed its result."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # best effort: what is not delivered is lost either way
            service.drain_all(timeout=timeout_s)


@contextlib.contextmanager
def temporary_server(home: Path, *, timeout_s: float = 120.0) -> Iterator[_Starting]:
    """A Prefect server on loopback owned by this process. ``PREFECT_API_URL`` points at it as
    soon as it is started (set this before Prefect is imported, and import Prefect while the
    server comes up); call ``ready()`` on what this yields before using it."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    previous_handlers = {s: signal.signal(s, _exit_on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    log_path = home / "temporary-server.log"
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        preexec_fn=_die_with(os.getpid()), start_new_session=True)  # noqa: PLW1509 - prctl only, before exec
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", TEMPORARY_ENV)}
    try:
        os.environ["PREFECT_API_URL"] = url
        os.environ[TEMPORARY_ENV] = "1"
        yield _Starting(proc, url, log_path, timeout_s)
    finally:
        _send_what_prefect_holds()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
