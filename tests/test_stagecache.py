"""Stage reuse: keys come from verified, signed records; a reused output is re-verified and an
attacker who edits what would be reused gets an integrity violation, never a silent reuse."""

from __future__ import annotations

import json

import pytest

from stages.core.errors import IntegrityError
from stages.core.params import load_params
from stages.core.workspace import Workspace, write_json
from stages.trust import stagecache
from stages.trust.context import RunContext


@pytest.fixture
def two_runs(workspace):
    """Two runs that ingested the same bytes; the first has a recorded 'train' output."""
    from stages import ingest

    ws = Workspace(workspace)
    params = load_params(ws.params_path, ["ingest.dvc_push=false"])
    runs = []
    for run_id in ("run-a", "run-b"):
        ctx = RunContext(ws, run_id)
        ingest.run(ctx, params)
        runs.append(ctx)
    first = runs[0]
    out = first.path("model", "weights.bin")
    out.write_bytes(b"weights of run a")
    first.record_outputs("train", {"weights": out})
    return ws, params, runs


def _key(ctx, settings=None):
    return stagecache.cache_key(ctx, "train", settings=settings or {"epochs": 3}, inputs={"split": "ab" * 32})


def test_same_inputs_hit_and_replay_into_the_new_run(two_runs):
    ws, params, (a, b) = two_runs
    key, material = _key(a)
    stagecache.store(a, "train", key, material, result={"weights_sha256": "x"}, outputs=["weights"])
    key_b, _ = _key(b)
    assert key_b == key  # same data (verified manifest), code, settings and inputs
    hit = stagecache.lookup(b, "train", key_b)
    assert hit is not None and hit["run_id"] == "run-a" and hit["result"] == {"weights_sha256": "x"}
    paths = stagecache.replay(b, "train", hit)
    assert paths["weights"].read_bytes() == b"weights of run a"
    assert b.inputs("weights", where="test")["weights"] == paths["weights"]  # in run b's own signed index
    assert any(e["event"] == "stage.cached" and e["payload"]["from_run"] == "run-a" for e in b.ledger.entries())


def test_other_settings_or_inputs_miss(two_runs):
    ws, params, (a, b) = two_runs
    key, material = _key(a)
    stagecache.store(a, "train", key, material, result={}, outputs=["weights"])
    assert _key(b, {"epochs": 4})[0] != key
    assert stagecache.lookup(b, "train", _key(b, {"epochs": 4})[0]) is None
    other_inputs = stagecache.cache_key(b, "train", settings={"epochs": 3}, inputs={"split": "cd" * 32})[0]
    assert other_inputs != key and stagecache.lookup(b, "train", other_inputs) is None


def test_an_edited_output_is_an_integrity_violation(two_runs):
    ws, params, (a, b) = two_runs
    key, material = _key(a)
    stagecache.store(a, "train", key, material, result={}, outputs=["weights"])
    (a.run_dir / "model" / "weights.bin").write_bytes(b"poisoned weights")
    with pytest.raises(IntegrityError, match="weights.bin"):
        stagecache.lookup(b, "train", key)
    assert any(e["event"] == "integrity.violation" for e in b.ledger.entries())


def test_an_edited_cache_record_is_an_integrity_violation(two_runs):
    ws, params, (a, b) = two_runs
    key, material = _key(a)
    stagecache.store(a, "train", key, material, result={"weights_sha256": "x"}, outputs=["weights"])
    record = a.run_dir / "cache" / "train.json"
    body = json.loads(record.read_text())
    body["result"] = {"weights_sha256": "forged"}
    record.write_text(json.dumps(body))
    with pytest.raises(IntegrityError):
        stagecache.lookup(b, "train", key)


def test_a_forged_pointer_is_a_miss_not_a_reuse(two_runs):
    ws, params, (a, b) = two_runs
    key, material = _key(a)
    stagecache.store(a, "train", key, material, result={}, outputs=["weights"])
    # point another key at run a: its signed record names a different key
    forged = stagecache.cache_key(b, "train", settings={"epochs": 99}, inputs={})[0]
    pointer = ws.runs_dir / ".stage-cache" / "train" / forged
    pointer.write_text("run-a\n")
    assert stagecache.lookup(b, "train", forged) is None
    # a pointer to a run that does not exist, or to an impossible run id, is a miss too
    pointer.write_text("../../etc\n")
    assert stagecache.lookup(b, "train", forged) is None
    pointer.write_text("run-gone\n")
    assert stagecache.lookup(b, "train", forged) is None


def test_an_unsigned_index_cannot_vouch_for_a_record(two_runs):
    ws, params, (a, b) = two_runs
    key, material = _key(a)
    stagecache.store(a, "train", key, material, result={}, outputs=["weights"])
    index = json.loads(a.artifacts_path.read_text())
    index["payload"]["artifacts"]["weights"]["sha256"] = "0" * 64  # re-point without the key
    write_json(a.artifacts_path, index)
    with pytest.raises(IntegrityError):
        stagecache.lookup(b, "train", key)


def test_a_tables_signed_feature_statistics_travel_with_a_reused_training(two_runs):
    """A cache entry of train carries the feature statistics a table run recorded (serving
    reads them), and a run without them (images) is not asked for them."""
    from flows.caching import OUTPUTS, stage_outputs

    ws, params, (a, b) = two_runs
    assert stage_outputs(a, "train") == OUTPUTS["train"]
    stats = a.path("feature_statistics.json")
    write_json(stats, {"run_id": "run-a", "statistics": {"n": 3}})
    a.record_outputs("train", {"feature_statistics": stats})
    assert stage_outputs(a, "train") == [*OUTPUTS["train"], "feature_statistics"]
    key, material = _key(a)
    stagecache.store(a, "train", key, material, result={}, outputs=["weights", "feature_statistics"])
    paths = stagecache.replay(b, "train", stagecache.lookup(b, "train", _key(b)[0]))
    assert json.loads(b.input_bytes("feature_statistics", where="test")["feature_statistics"]) == \
        json.loads(stats.read_text()) and paths["feature_statistics"].parent == b.run_dir
