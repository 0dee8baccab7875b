"""Shared fixtures: telemetry off, throwaway keys, one real Prefect server per session,
and a ready workspace (git + DVC + local remote, MLflow on SQLite) per test that needs one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stages.core.telemetry import TELEMETRY_OFF
from tests.servers import stop
from tests.support import (CHAMPION_RUN, briefly_trained_digits_model, build_quick_champion, copy_workspace, inside,
                           make_workspace, run_cli)

ROOT = Path(__file__).resolve().parents[1]
for _k, _v in TELEMETRY_OFF.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"  # the session server stops before the last log flush
if "PYTEST_XDIST_WORKER" in os.environ:
    # two workers share the cores: one intra-op thread each (and in the commands they start),
    # rather than two spinning OpenMP pools per core
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Modules that share a session fixture run as one unit under ``make test`` (pytest-xdist,
# --dist loadfile): one worker, in file order. The serving workspace (``two_versions``): the
# playbooks and the review queue read the traffic the serving tests left in it, so a worker that
# took them alone would build a second workspace with no traffic in it. The digits champion
# (``digits_champion``): two minutes or more to build, once rather than once per worker.
SHARED_FIXTURE_UNITS = {
    "serving-workspace": ("test_serving.py", "test_serving_playbooks.py", "test_serving_review.py", "test_status_page.py"),
    "digits-champion": ("test_pipeline_e2e.py", "test_honesty.py"),
}
_UNIT_OF = {module: unit for unit, modules in SHARED_FIXTURE_UNITS.items() for module in modules}
# The longest work units, longest first (seconds of setup, call and teardown on the 2-core
# machine, --durations=0): 720, 610, 590, 320, 175, 165, 150, 140, 135, 120, 115. pytest-xdist
# hands units out in order of their number of tests, which put the few-test units with the
# longest tests (real servers, the MNIST audits) last, and one worker ran them alone at the end.
# Handed out first, the others fill in around them; the rest follow, by number of tests.
LONGEST_FIRST = ("test_real_servers.py", "digits-champion", "serving-workspace", "test_promotion.py",
                 "test_user_data_e2e.py", "test_orchestration_flow.py", "test_honesty_mnist.py", "test_guard_mnist.py",
                 "test_services.py", "test_backdoor_scan.py", "test_serving_tables.py")

try:
    from xdist.scheduler import LoadFileScheduling
except ImportError:  # plain pytest: one process runs every module in file order
    LoadFileScheduling = None

if LoadFileScheduling is not None:
    class _SharedFixtureScheduling(LoadFileScheduling):
        _ordered = False

        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            unit = _UNIT_OF.get(path.rsplit("/", 1)[-1])
            return f"tests/{unit}" if unit else path

        def _assign_work_unit(self, node) -> None:
            if not self._ordered:  # the queue is complete before the first unit is handed out
                rank = {f"tests/{name}": i for i, name in enumerate(LONGEST_FIRST)}
                order = sorted(self.workqueue, key=lambda scope: rank.get(scope, len(rank)))  # stable: the rest as they were
                self.workqueue = type(self.workqueue)((scope, self.workqueue[scope]) for scope in order)
                self._ordered = True
            super()._assign_work_unit(node)

    def pytest_xdist_make_scheduler(config, log):
        return _SharedFixtureScheduling(config, log) if config.getoption("dist") == "loadfile" else None


@pytest.fixture(scope="session", autouse=True)
def _session_keys(tmp_path_factory):
    """Signing keys for the test session only (never the user's)."""
    keydir = tmp_path_factory.mktemp("keys") / "k"
    old = os.environ.get("MLSEC_KEY_DIR")
    os.environ["MLSEC_KEY_DIR"] = str(keydir)
    yield keydir
    if old is None:
        os.environ.pop("MLSEC_KEY_DIR", None)
    else:
        os.environ["MLSEC_KEY_DIR"] = old


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Prefect reads its settings once, at import: name the session server's address now, so the
# flows run in this process and the commands run as subprocesses share one server. Each
# pytest-xdist worker has a session, and a server, of its own.
_PORT_VAR = "MLSEC_TEST_PREFECT_PORT" + (f"_{os.environ['PYTEST_XDIST_WORKER']}" if "PYTEST_XDIST_WORKER" in os.environ else "")
os.environ.setdefault(_PORT_VAR, str(_free_port()))
_PORT = int(os.environ[_PORT_VAR])
os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_PORT}/api"


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server on loopback, shared by every test of the session."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _PORT
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_API_HOST": "127.0.0.1",
           "PREFECT_SERVER_API_PORT": str(port), "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        stop(proc)
        raise RuntimeError("prefect server did not start within 120 s")
    old = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME")}
    os.environ["PREFECT_API_URL"] = url
    os.environ["PREFECT_HOME"] = str(home)
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    stop(proc)  # and whatever it started
    log.close()


@pytest.fixture(scope="session")
def digits_champion(tmp_path_factory, prefect_server):
    """(workspace, run summary): one ``mlsec run`` on digits to a promoted champion under the
    project's own policy, shared by the modules that only read it (the end-to-end checks, the
    honesty audit). A test that changes a workspace works on ``tests.support.copy_workspace``."""
    ws = make_workspace(tmp_path_factory.mktemp("champion") / "ws")
    proc = run_cli(["run", "--json", *[a for item in CHAMPION_RUN for a in ("--set", item)]], cwd=ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["status"] == "promoted", summary
    return ws, summary


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A fresh workspace (git + DVC + local remote; MLflow on SQLite inside it)."""
    ws = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("MLSEC_ROOT", str(ws))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(ws)
    return ws


@pytest.fixture(scope="module")
def one_thread():
    """8x8 digits gain nothing from intra-op threads and lose much on a busy machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def trained(one_thread):
    """(model, X, y): a cnn_small briefly trained on digits and 200 held-out digits as tensors."""
    return briefly_trained_digits_model()


@pytest.fixture(scope="session")
def quick_champion(tmp_path_factory, prefect_server):
    """(workspace, run summary): one short run (``tests.support.QUICK_RUN``) to a promoted
    version 1 under ``QUICK_POLICY``, signed on first use. The promotion and serving tests each
    start from a ``copy_workspace`` of it; nothing changes it."""
    path = tmp_path_factory.mktemp("quick") / "ws"
    return path, build_quick_champion(path)


@pytest.fixture(scope="session")
def two_versions(tmp_path_factory, quick_champion):
    """A workspace whose champion (version 2) replaced version 1, both through the pipeline;
    the serving and incident-playbook tests share it (each leaves it with a champion)."""
    from tests.serving_support import build_two_versions

    path = copy_workspace(quick_champion[0], tmp_path_factory.mktemp("serving") / "ws")
    with inside(path):
        return path, build_two_versions(path, first=quick_champion[1])
