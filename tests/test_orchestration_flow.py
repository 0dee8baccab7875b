"""The flow's orchestration on the real services: a rerun on unchanged data reuses screen,
train and evaluate (Prefect shows them as Cached) and registers no duplicate version; reuse
never skips a verification; two runs of one model do not race on its aliases."""

from __future__ import annotations

import json
import threading

import pytest

from tests.support import make_workspace, run_cli, small_digits

pytestmark = pytest.mark.slow

FAST = ["--data", "small.npz", "--set", "train.mode=standard", "--set", "train.model=mlp", "--set", "train.epochs=15",
        "--set", "evaluate.pgd_steps=3", "--set", "evaluate.restarts=1", "--set", "evaluate.apgd_steps=5", "--set", "screen.folds=3",
        "--set", "screen.backdoor_epochs=2"]
# the short runs' gate, in the signed policy (not --set, which would be a weakening)
POLICY = ["gate.min_robust_accuracy={}", "gate.min_clean_accuracy=0.5", "gate.no_regression=null", "gate.max_mia_auc=null"]


def _task_states(flow_run_id: str) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs if r.state}


def _versions(ws) -> list[str]:
    import mlflow

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    c = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    return sorted(str(v.version) for v in c.search_model_versions("name = 'mlsec-digits'"))


@pytest.fixture(scope="module")
def reruns(tmp_path_factory, prefect_server):
    ws = make_workspace(tmp_path_factory.mktemp("orch") / "ws", policy=POLICY)
    small_digits(ws / "small.npz", seed=0, n=500)
    first = run_cli(["run", "--json", *FAST], cwd=ws)
    assert first.returncode == 0, first.stderr[-3000:]
    (ws / "first-run.stderr").write_text(first.stderr)  # the terminal: progress lines are read from it
    second = run_cli(["run", "--json", *FAST], cwd=ws)
    assert second.returncode == 0, second.stderr[-3000:]
    return ws, json.loads(first.stdout), json.loads(second.stdout)


def test_rerun_on_unchanged_data_reuses_stages_without_a_duplicate(reruns):
    ws, first, second = reruns
    assert first["status"] == "promoted" and first["cached"] == {}
    assert second["status"] == "promoted"
    assert second["cached"] == {"screen": first["run_id"], "train": first["run_id"], "evaluate": first["run_id"]}
    assert second["model"]["version"] == first["model"]["version"] and second["model"].get("reused")
    assert _versions(ws) == [first["model"]["version"]]
    assert second["metrics"] == first["metrics"]
    states = _task_states(second["flow_run_id"])
    assert {states[s] for s in ("screen", "train", "evaluate")} == {"Cached"}, states
    assert states["validate"] == "Completed" and states["gate"] == "Completed"


def test_reuse_still_verifies_what_it_reuses(reruns):
    ws, first, second = reruns
    weights = ws / "runs" / second["run_id"] / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    third = run_cli(["run", "--json", *FAST], cwd=ws)
    assert third.returncode == 4, third.stderr[-2000:]
    assert "integrity violation" in third.stderr and "model.safetensors" in third.stderr
    weights.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 1]))  # put it back for the next tests


def test_changed_settings_reuse_only_what_they_do_not_touch(reruns):
    ws, first, second = reruns
    proc = run_cli(["run", "--json", *FAST, "--set", "train.epochs=14"], cwd=ws)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert set(out["cached"]) == {"screen"}


def test_two_runs_of_one_model_do_not_race_on_its_aliases(reruns):
    ws, first, second = reruns
    results = {}

    def go(i: int) -> None:
        results[i] = run_cli(["run", "--json", *FAST, "--set", f"train.seed={10 + i}"], cwd=ws)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for proc in results.values():
        assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {json.loads(p.stdout)["run_id"] for p in results.values()}
    # each run's locked section (champion read .. alias moves) is contiguous in the ledger
    entries = [json.loads(line) for line in (ws / "audit" / "ledger.jsonl").read_text().splitlines()]
    section = [e.get("run_id") for e in entries if e.get("run_id") in runs and (
        e["event"] in ("alias.move", "gate.verdict", "register.version") or
        (e["event"] in ("stage.start", "stage.finish") and e["payload"].get("stage") in ("gate", "register")))]
    changes = sum(1 for a, b in zip(section, section[1:]) if a != b)
    assert changes == 1, section


def test_the_run_sent_its_events(reruns):
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    from stages.core import events

    ws, first, second = reruns
    with get_client(sync_client=True) as client:
        sent = client.read_events(filter=EventFilter(event=EventNameFilter(prefix=["mlsec."])), limit=50).events
    mine = [e for e in sent if e.payload.get("run_id") in (first["run_id"], second["run_id"])]
    names = {(e.event, e.payload["run_id"]) for e in mine}
    for run in (first, second):
        assert (events.DATA_INGESTED, run["run_id"]) in names and (events.RUN_FINISHED, run["run_id"]) in names
    moved = [e.payload for e in mine if e.event == events.ALIAS_MOVED]
    assert any(m["alias"] == "challenger" and m["version"] == first["model"]["version"] for m in moved), moved
    finished = [e.payload for e in mine if e.event == events.RUN_FINISHED and e.payload["run_id"] == second["run_id"]]
    assert finished[0]["status"] == "promoted" and finished[0]["cached"] == ["evaluate", "screen", "train"]


def test_training_in_a_flow_reports_each_epoch_with_the_time_left(reruns):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
        FlowRunFilter,
        FlowRunFilterId,
    )

    ws, first, second = reruns
    run_id = first["flow_run_id"]
    with get_client(sync_client=True) as client:
        def task_runs(flow_run_id):
            return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

        tasks = {r.id: r.name for r in task_runs(run_id)}
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), type=ArtifactFilterType(any_=["progress"])))
        reused = [a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[second["flow_run_id"]]), type=ArtifactFilterType(any_=["progress"])))
            if "epochs" in (a.description or "")]
    # the run log on the terminal ("HH:MM:SS | INFO | Task run 'train-123' - train: epochs 3/15, ...")
    logs = [line.split(" - ", 1)[1] for line in (ws / "first-run.stderr").read_text().splitlines()
            if "Task run 'train" in line and " - " in line]
    # the UI: a progress artifact on the train task, moved to 100% by the last epoch
    epochs = [a for a in artifacts if tasks.get(a.task_run_id, "").startswith("train") and "epochs" in (a.description or "")]
    assert len(epochs) == 1, [(tasks.get(a.task_run_id), a.description) for a in artifacts]
    assert epochs[0].data == pytest.approx(100.0) and "epochs 15/15 in" in epochs[0].description
    # every epoch, what trains and the time left
    lines = [m for m in logs if m.startswith("train: epochs ")]
    assert lines[0].startswith("train: epochs 0/15") and "standard" in lines[0]
    for k in range(1, 15):
        assert any(m.startswith(f"train: epochs {k}/15, about ") and " left (standard: loss " in m for m in lines), (k, lines)
    # the rerun reused the trained model: no epoch ran, none is reported
    assert reused == []
