"""The pipeline on real servers, as a team runs it: ``prefect server start`` (its own database,
SQLite or PostgreSQL), ``mlflow server`` reached over HTTP, a Prefect worker on a process
pool. Deploy, trigger through the API, schedule, change the data, kill a worker mid-run."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests import servers
from tests.support import STANDARD_RUN, make_workspace, run_cli, small_digits

pytestmark = pytest.mark.slow

FAST = STANDARD_RUN
# the short runs' gate, in the signed policy (a --set would be a weakening, never auto-promoted)
POLICY = ["gate.min_robust_accuracy={}", "gate.min_clean_accuracy=0.3", "gate.min_clean_accuracy_all_test=0.3",
          "gate.no_regression=null", "gate.max_mia_auc=null"]
SETS = [a for item in FAST for a in ("--set", item)]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class _RetryingClient(httpx.Client):
    """The REST API as Prefect's own client uses it: a 408, 429, 502 or 503 (the server busy,
    as under a full test run) is sent again after a pause, up to four times."""

    def send(self, request, **kwargs):
        for pause in (1, 2, 4, 8):
            response = super().send(request, **kwargs)
            if response.status_code not in (408, 429, 502, 503):
                return response
            response.close()
            time.sleep(pause)
        return super().send(request, **kwargs)


class Stack:
    """The servers, the workspace and helpers to talk to them."""

    def __init__(self, root: Path, api: str, mlflow_url: str):
        self.root, self.api, self.mlflow_url = root, api, mlflow_url
        self.ws = make_workspace(root / "ws", policy=POLICY)
        self.env = {"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_url}
        self.http = _RetryingClient(base_url=api, timeout=30)
        self.worker: object = None

    def cli(self, *args: str, timeout: int = 600):
        return run_cli(list(args), cwd=self.ws, env_extra=self.env, timeout=timeout)

    def start_worker(self):
        self.worker = servers.start_worker("mlsec", self.root / "worker.log", MLSEC_ROOT=str(self.ws), **self.env)

    def deployment_id(self, name: str) -> str:
        flow = "secure-training" if name == "secure-training" else "data-watch"
        return self.http.get(f"/deployments/name/{flow}/{name}").raise_for_status().json()["id"]

    def trigger(self, **parameters) -> str:
        body = {"parameters": parameters} if parameters else {}
        r = self.http.post(f"/deployments/{self.deployment_id('secure-training')}/create_flow_run", json=body)
        return r.raise_for_status().json()["id"]

    def flow_run(self, run_id: str) -> dict:
        return self.http.get(f"/flow_runs/{run_id}").raise_for_status().json()

    def wait(self, run_id: str, *, states=TERMINAL, timeout_s: float = 900) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state_type"] in states:
                return run
            time.sleep(2)
        raise AssertionError(f"flow run {run_id} still {run['state_type']} after {timeout_s} s; "
                             f"worker log: {(self.root / 'worker.log').read_text()[-3000:]}")

    def runs_of(self, deployment: str) -> list[dict]:
        body = {"deployments": {"id": {"any_": [self.deployment_id(deployment)]}}, "sort": "EXPECTED_START_TIME_ASC"}
        return self.http.post("/flow_runs/filter", json=body).raise_for_status().json()

    def versions(self) -> list:
        import mlflow

        c = mlflow.MlflowClient(tracking_uri=self.mlflow_url, registry_uri=self.mlflow_url)
        return list(c.search_model_versions("name = 'mlsec-digits'"))

    def ledger(self) -> list[dict]:
        return [json.loads(line) for line in (self.ws / "audit" / "ledger.jsonl").read_text().splitlines()]


def _stack(root: Path, *, backend: str):
    """Context manager: servers on SQLite or PostgreSQL, a deployed workspace and a worker."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        with contextlib.ExitStack() as stack:
            prefect_db = mlflow_db = None
            if backend == "postgresql":
                user, port = stack.enter_context(servers.postgres_cluster(root / "pg"))
                prefect_db = f"postgresql+asyncpg://{user}@127.0.0.1:{port}/prefect"
                mlflow_db = f"postgresql://{user}@127.0.0.1:{port}/mlflow"
            api = stack.enter_context(servers.prefect_server(root / "prefect", database_url=prefect_db))
            mlflow_url = stack.enter_context(servers.mlflow_server(root / "mlflow", backend_uri=mlflow_db))
            s = Stack(root, api, mlflow_url)
            if backend == "postgresql":
                s.pg_user, s.pg_port = user, port
            small_digits(s.ws / "digits.npz", seed=0)
            deployed = s.cli("deploy", "--create-pool", "--json", "--data", "digits.npz", *SETS)
            assert deployed.returncode == 0, deployed.stderr[-3000:]
            s.deployed = json.loads(deployed.stdout)
            s.start_worker()
            stack.callback(lambda: servers.stop(s.worker))
            yield s
    return cm()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with _stack(tmp_path_factory.mktemp("real"), backend="sqlite") as s:
        yield s


def _check_promoted_run(s: Stack, flow_run_id: str) -> str:
    run = s.wait(flow_run_id)
    assert run["state_type"] == "COMPLETED", (run["state"], (s.root / "worker.log").read_text()[-3000:])
    finished = [e for e in s.ledger() if e["event"] == "run.finish" and e["payload"]["status"] == "promoted"]
    assert finished, "no promoted run in the ledger"
    registered = [e for e in s.ledger() if e["event"] == "register.version"]
    versions = {str(v.version): v for v in s.versions()}
    last = registered[-1]["payload"]
    assert last["version"] in versions
    mv = versions[last["version"]]
    assert mv.tags["mlsec.run_id"] in {e["run_id"] for e in registered}
    assert mv.tags["mlsec.registered"] == "complete"
    return last["version"]


def test_deploy_registers_both_deployments_and_the_automations(stack):
    d = stack.deployed
    assert set(d["deployments"]) == {"secure-training", "data-watch"}
    assert d["pool"] == {"name": "mlsec", "type": "process", "created": True}
    params = stack.http.get(f"/deployments/{stack.deployment_id('secure-training')}").json()["parameters"]
    assert params["data"] == "digits.npz" and params["overrides"] == FAST
    names = {a["name"] for a in stack.http.post("/automations/filter", json={}).json()}
    assert {"mlsec-retrain-on-data-change:mlsec-digits", "mlsec-retrain-on-alert:mlsec-digits",
            "mlsec-crashed-run-detector"} <= names


def test_run_triggered_through_the_api_registers_in_the_mlflow_server(stack):
    version = _check_promoted_run(stack, stack.trigger())
    import mlflow

    c = mlflow.MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)
    assert c.get_model_version_by_alias("mlsec-digits", "champion").version == version
    audit = stack.cli("audit", "verify", "--json")
    assert audit.returncode == 0 and json.loads(audit.stdout)["ok"], audit.stdout + audit.stderr


def test_bad_schedules_and_names_are_one_line(stack):
    for args, needle in ((["schedule", "create", "--cron", "61 * * * *"], "invalid cron expression '61 * * * *'"),
                         (["schedule", "create", "--rrule", "FREQ=SOMETIMES"], "invalid RRule 'FREQ=SOMETIMES'"),
                         (["schedule", "create", "--interval", "0"], "--interval must be at least 1 second"),
                         (["schedule", "remove", "no-such-id"], "no schedule with id 'no-such-id'"),
                         (["deploy", "--pool", "no-such-pool"], "work pool 'no-such-pool' does not exist")):
        proc = stack.cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)


def test_a_schedule_fires_and_is_removed(stack):
    before = {r["id"] for r in stack.runs_of("secure-training")}
    created = stack.cli("schedule", "create", "--interval", "5", "--json")
    assert created.returncode == 0, created.stderr
    sched = json.loads(created.stdout)
    listed = json.loads(stack.cli("schedule", "list", "--json").stdout)
    assert [r["id"] for r in listed] == [sched["id"]] and listed[0]["schedule"] == "every 5 s"
    deadline = time.monotonic() + 120
    fired = []
    while not fired and time.monotonic() < deadline:
        fired = [r for r in stack.runs_of("secure-training") if r["id"] not in before and r["auto_scheduled"]
                 and r["state_type"] != "SCHEDULED"]
        time.sleep(2)
    removed = stack.cli("schedule", "remove", "--all", "--json")
    assert removed.returncode == 0 and json.loads(removed.stdout)["removed"] == [sched["id"]]
    assert fired, "the interval schedule started no run"
    assert fired[0]["parameters"]["triggered_by"] == "schedule"
    _check_promoted_run(stack, fired[0]["id"])
    for r in stack.runs_of("secure-training"):  # runs scheduled ahead and not started: gone with the schedule
        if r["state_type"] == "SCHEDULED":
            stack.http.delete(f"/flow_runs/{r['id']}")
    assert json.loads(stack.cli("schedule", "list", "--json").stdout) == []


def test_changed_data_starts_a_run_and_unchanged_data_does_not(stack):
    watched = small_digits(stack.ws / "watched.npz", seed=1)
    before = {r["id"] for r in stack.runs_of("secure-training")}
    created = stack.cli("schedule", "create", "--interval", "4", "--on-change", "--data", "watched.npz", "--json")
    assert created.returncode == 0, created.stderr

    def started() -> list[dict]:
        return [r for r in stack.runs_of("secure-training") if r["id"] not in before]

    def watcher_runs() -> list[dict]:
        return [r for r in stack.runs_of("data-watch") if r["state_type"] == "COMPLETED"]

    try:
        deadline = time.monotonic() + 120
        while not started() and time.monotonic() < deadline:
            time.sleep(2)
        first = started()
        assert len(first) == 1, "the first look at the source should start exactly one run"
        assert first[0]["parameters"]["data"] == "watched.npz"
        assert first[0]["parameters"]["triggered_by"] == "automation:mlsec.data.changed"
        # unchanged bytes: the watcher keeps looking, nothing else starts
        seen = len(watcher_runs())
        deadline = time.monotonic() + 120
        while len(watcher_runs()) < seen + 3 and time.monotonic() < deadline:
            time.sleep(2)
        assert len(watcher_runs()) >= seen + 3, "the watcher stopped running"
        assert len(started()) == 1, "an unchanged source started a run"
        # changed bytes: one more run
        small_digits(watched, seed=2)
        deadline = time.monotonic() + 120
        while len(started()) < 2 and time.monotonic() < deadline:
            time.sleep(2)
        assert len(started()) == 2, "changed data started no run"
    finally:
        stack.cli("schedule", "remove", "--all")
    for r in started():
        stack.wait(r["id"])


def test_retraining_requested_by_an_alert_starts_a_run(stack):
    before = {r["id"] for r in stack.runs_of("secure-training")}
    sent = stack.http.post("/events", json=[{
        "id": __import__("uuid").uuid4().hex, "occurred": __import__("datetime").datetime.now(
            __import__("datetime").timezone.utc).isoformat(), "event": "mlsec.retrain.requested",
        "resource": {"prefect.resource.id": "mlsec.model.mlsec-digits"},
        "payload": {"model": "mlsec-digits", "reason": "drift on window 3", "alert": "mlsec.monitor.drift"}}])
    assert sent.status_code < 300, sent.text
    deadline = time.monotonic() + 90
    new = []
    while not new and time.monotonic() < deadline:
        new = [r for r in stack.runs_of("secure-training") if r["id"] not in before]
        time.sleep(2)
    assert new and new[0]["parameters"]["triggered_by"] == "automation:mlsec.retrain.requested"
    assert new[0]["parameters"]["data"] is None  # no data named: params.yaml's source
    stack.wait(new[0]["id"])


def _kill_flow_run_processes(flow_run_id: str) -> int:
    """SIGKILL every process running ``flow_run_id`` (Prefect puts the id in its environment)."""
    marker, killed = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode(), 0
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes():
                os.kill(int(environ.parent.name), signal.SIGKILL)
                killed += 1
        except OSError:
            continue
    return killed


def test_a_killed_worker_marks_its_run_crashed_and_a_rerun_completes(stack):
    # far more epochs than 35 s allow on any machine (on a quiet one, 300 finished before the kill)
    long_training = ["train.mode=adversarial", "train.adversarial.method=pgd", "train.epochs=20000"]
    flow_run_id = stack.trigger(overrides=[*FAST, *long_training])
    stack.wait(flow_run_id, states={"RUNNING"}, timeout_s=300)
    time.sleep(35)  # well into the run, past its first heartbeat
    os.killpg(stack.worker.pid, signal.SIGKILL)  # the worker and the run it started, as a dead machine
    stack.worker.wait()
    # the process worker starts each flow run in a session of its own: kill that too
    assert _kill_flow_run_processes(flow_run_id) >= 1
    crashed = stack.wait(flow_run_id, timeout_s=300)
    assert crashed["state_type"] == "CRASHED", crashed["state"]
    stack.start_worker()
    _check_promoted_run(stack, stack.trigger())
    versions = stack.versions()
    assert all(v.tags.get("mlsec.registered") == "complete" for v in versions)
    weights = [v.tags["mlsec.weights_sha256"] for v in versions]
    assert len(weights) == len(set(weights)), "the same weights were registered twice"


@pytest.mark.skipif(servers.postgres_bin() is None and not os.environ.get("CI"),
                    reason="PostgreSQL server binaries are not installed here (apt-get install postgresql-15; .ci/run does)")
def test_both_servers_on_postgresql(tmp_path):
    import psycopg

    with _stack(tmp_path, backend="postgresql") as s:
        version = _check_promoted_run(s, s.trigger())
        port = s.pg_port
        with psycopg.connect(host="127.0.0.1", port=port, user=s.pg_user, dbname="mlflow") as db, db.cursor() as cur:
            cur.execute("SELECT version FROM model_versions WHERE name = 'mlsec-digits'")
            assert [str(r[0]) for r in cur.fetchall()] == [version]
        with psycopg.connect(host="127.0.0.1", port=port, user=s.pg_user, dbname="prefect") as db, db.cursor() as cur:
            cur.execute("SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'")
            assert cur.fetchone()[0] >= 1
