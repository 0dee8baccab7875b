"""Reviewers label the inputs the detector flagged and a retraining run learns exactly those
rows with their labels, through the normal pipeline, on the serving tests' workspace (its
champion came through the pipeline). PGD inputs crafted on the champion are logged as the
service logs a flagged input; ``evasion-response`` queues them; the rest is the command line
as a reviewer uses it, including the attacker's edits of the queue's and the labels' files and
a retraining on labels by a reviewer the policy owner has since removed. The reviewers, rita
and sam, are those of ``tests.support.QUICK_POLICY``, pinned when the workspace's policy was
signed on first use."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

from stages.trust.ledger import Ledger
from tests.serving_support import QUICK
from tests.support import identity as _identity
from tests.support import run_cli, sign_reviewers

pytestmark = pytest.mark.slow

SET = [arg for o in QUICK for arg in ("--set", o)]
MODEL = "mlsec-digits"
N = 24   # flagged inputs


@pytest.fixture(scope="module")
def flagged(two_versions, prefect_server):
    """(workspace, queue name, {digest: (true class, prediction)}, fooled first): 24 PGD
    inputs (eps 0.15) crafted on the champion from digits it was trained on, logged as
    flagged by client 'mallory' and queued by evasion-response."""
    import torch

    from stages.data.io import load_source
    from stages.core.params import load_params
    from stages.ml.attacks import attack_pgd
    from stages.models.verify import load_verified_model
    from stages.monitoring.inputs import row_digest
    from stages.monitoring.store import TelemetryStore, default_url

    ws, _ = two_versions
    d = load_source("sklearn:digits")
    X, y = d.X[:N], d.y[:N]
    old = {k: os.environ.pop(k, None) for k in ("MLSEC_ROOT", "MLFLOW_TRACKING_URI")}
    os.environ["MLSEC_ROOT"] = str(ws)
    try:
        model = load_verified_model(f"{MODEL}@champion")
    finally:
        os.environ.pop("MLSEC_ROOT")
        os.environ.update({k: v for k, v in old.items() if v is not None})
    adv = attack_pgd(model, torch.from_numpy(X), torch.from_numpy(y), epsilon=0.15, alpha=0.03, steps=10, restarts=1,
                     generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = model(adv).argmax(1).numpy()
    adv = adv.numpy()
    t = load_params(ws / "params.yaml").serving.telemetry
    store = TelemetryStore(t.url or default_url(ws), queue_max=100, retention_s=86_400).start()
    now = time.time()
    assert store.submit("flagged_inputs", [{"input_sha256": row_digest(adv[i]), "time": now, "client": "mallory",
                                     "model_version": "2", "prediction": int(pred[i]), "detector_score": 9.5,
                                     "shape": str(list(adv.shape[1:])), "data": adv[i].tobytes()} for i in range(N)])
    assert store.flush()
    store.close()
    proc = run_cli(["playbook", "evasion-response", "--model", MODEL, "--reason", "PGD from mallory", "--since-hours",
                    "0.1", "--json"], cwd=ws)
    assert proc.returncode == 0, proc.stderr[-2000:]
    queue = json.loads(proc.stdout)["review_queue"]["queue"]
    assert json.loads(proc.stdout)["review_queue"]["items"] >= N
    order = sorted(range(N), key=lambda i: pred[i] == y[i])          # the inputs that fool the champion first
    truth = {row_digest(adv[i]): (int(y[i]), int(pred[i])) for i in order}
    return ws, queue, truth


def _cli(ws, *args, **kw):
    return run_cli(["review", *args], cwd=ws, **kw)


def _labels_state(ws, queue):
    folder = ws / "serving" / "review" / queue / "labels"
    return sorted((p.name, p.read_bytes()) for p in folder.glob("*")) if folder.exists() else []


def test_bad_labelling_input_is_one_line_exit_2_and_changes_nothing(flagged, tmp_path):
    ws, queue, truth = flagged
    digest = next(iter(truth))
    _identity("rita")
    (tmp_path / "empty.csv").write_text("input_sha256,label\n")
    (tmp_path / "outside.csv").write_text(f"{digest},10\n")
    (tmp_path / "unknown.json").write_text(json.dumps({"ab" * 32: 1}))
    before = (_labels_state(ws, queue), Ledger(ws / "audit" / "ledger.jsonl").head())
    for args in (["label", "20000101T000000Z", "--identity", "rita", "--item", digest, "--label", "1"],   # unknown queue
                 ["label", queue, "--identity", "rita", "--item", "ab" * 32, "--label", "1"],          # unknown digest
                 ["label", queue, "--identity", "rita", "--item", digest, "--label", "cat"],           # outside the classes
                 ["label", queue, "--identity", "rita", "--labels", str(tmp_path / "outside.csv")],
                 ["label", queue, "--identity", "rita", "--labels", str(tmp_path / "unknown.json")],
                 ["label", queue, "--identity", "rita", "--labels", str(tmp_path / "empty.csv")],      # empty label file
                 ["label", queue, "--identity", "nobody", "--item", digest, "--label", "1"],           # no identity key
                 ["label", queue, "--identity", "rita", "--item", digest],                             # no label
                 ["retrain", queue, "--reason", "nothing labelled yet"],                               # no labelled items
                 ["show", "../../audit"]):
        proc = _cli(ws, *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
            (args, proc.returncode, proc.stderr)
    proc = run_cli(["playbook", "evasion-response", "--model", MODEL, "--reason", "x", "--queue", queue], cwd=ws)
    assert proc.returncode == 2 and "add --retrain" in proc.stderr
    assert (_labels_state(ws, queue), Ledger(ws / "audit" / "ledger.jsonl").head()) == before


def test_reviewers_label_items_and_the_retrain_trains_on_exactly_those_rows_with_their_labels(flagged, tmp_path):
    from stages.core.workspace import Workspace
    from stages.data.prepared import parse_prepared
    from stages.monitoring.inputs import row_digest
    from stages.trust.context import RunContext

    ws, queue, truth = flagged
    rita, sam = _identity("rita"), _identity("sam")
    digests = list(truth)
    labelled, discarded = digests[:5], digests[5]
    # rita labels five attacks (one wrongly) and discards one; sam corrects rita's mistake
    lines = ["input_sha256,label"] + [f"{d},{truth[d][0]}" for d in labelled[1:]] + [f"{labelled[0]},{(truth[labelled[0]][0] + 1) % 10}",
                                                                                    f"{discarded},discard"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    proc = _cli(ws, "label", queue, "--identity", rita, "--labels", str(tmp_path / "labels.csv"), "--reason", "by eye", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["labelled"] == 5 and json.loads(proc.stdout)["discarded"] == 1
    proc = _cli(ws, "label", queue, "--identity", sam, "--item", labelled[0][:12], "--label", str(truth[labelled[0]][0]))
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(_cli(ws, "show", queue, "--json").stdout)
    by_digest = {it["input_sha256"]: it for it in shown["items_detail"]}
    assert by_digest[labelled[0]]["label"] == truth[labelled[0]][0] and by_digest[labelled[0]]["labelled_by"] == "sam"
    assert by_digest[discarded]["decision"] == "discard" and shown["labelled"] == 5 and shown["discarded"] == 1

    seq = Ledger(ws / "audit" / "ledger.jsonl").head()["seq"]
    proc = _cli(ws, "retrain", queue, "--reason", "adversarial retraining on reviewed inputs", "--json", *SET, timeout=1800)
    out = json.loads(proc.stdout)
    retrain = out["retrain"]
    assert retrain["status"] in ("promoted", "rejected") and "gate" in retrain, proc.stderr[-2000:]   # the normal gate
    assert proc.returncode == (0 if retrain["status"] == "promoted" else 3)
    run = retrain["run_id"]
    # the run's verified data: the champion's rows plus exactly the labelled rows, with the reviewers' labels
    files, _ = RunContext(Workspace(ws), run).dataset_bytes(where="test")
    X, y, _, _ = parse_prepared(files)
    assert len(y) == out["review_items"]["champion_rows"] + 5
    added = {row_digest(X[i]): int(y[i]) for i in range(len(y) - 5, len(y))}
    assert added == {d: truth[d][0] for d in labelled}
    assert any(truth[d][0] != truth[d][1] for d in labelled)          # reviewer labels, not the model's predictions
    everything = {row_digest(X[i]) for i in range(len(y))}
    assert not {discarded, *digests[6:]} & everything                   # discarded and unlabelled items stay out
    # the ledger says which queue items entered which run, and the run started from the playbook
    entries = Ledger(ws / "audit" / "ledger.jsonl").entries()
    trained = [e for e in entries if e["event"] == "review.train" and e["run_id"] == run]
    assert len(trained) == 1 and trained[0]["payload"]["queue"] == queue
    from stages.trust.policy import load_signed_policy     # the reviewers were those of the policy in force

    assert trained[0]["payload"]["reviewers_policy_sha256"] == load_signed_policy(Workspace(ws)).sha256
    assert {it["input_sha256"]: (it["label"], it["labelled_by"]) for it in trained[0]["payload"]["items"]} == \
        {d: (truth[d][0], "sam" if d == labelled[0] else "rita") for d in labelled}
    started = [e for e in entries if e["event"] == "run.start" and e["run_id"] == run]
    assert started[0]["payload"]["triggered_by"] == "playbook:evasion-response"
    assert "train.mode=adversarial" in started[0]["payload"]["overrides"]
    assert out["review_items"]["run_data"] == {"checked": True, "review_rows_in_run_data": 5}
    assert 0.1 <= out["perturbation"]["retrain_epsilon"] <= 0.3 and out["perturbation"]["measured_on"] == "labelled items"
    steps = [e["payload"].get("step") for e in entries if e["seq"] > seq and e["event"].startswith("playbook.")
             and e["payload"].get("playbook") == "evasion-response"]
    assert steps == [None, "review-queue", "perturbation", "review-items", "retrain", "review-rows-in-run", None]
    listed = {q["queue"]: q for q in json.loads(_cli(ws, "list", "--json").stdout)}
    assert listed[queue]["trained_in"] == [{"run_id": run, "items": 5}]
    if (retrain.get("model") or {}).get("version"):
        lin = json.loads(run_cli(["lineage", f"{MODEL}/{retrain['model']['version']}", "--json"], cwd=ws).stdout)
        assert lin["chain"]["review"]["queue"] == queue and len(lin["chain"]["review"]["items"]) == 5


def test_a_queue_or_label_edited_afterwards_is_refused_at_label_and_retrain_time(flagged):
    ws, queue, truth = flagged
    folder = ws / "serving" / "review" / queue
    digest = list(truth)[7]
    rita = _identity("rita")
    if not list((folder / "labels").glob("*.json")):
        assert _cli(ws, "label", queue, "--identity", rita, "--item", digest, "--label", "3").returncode == 0
    backup = folder.parent / f".{queue}.backup"
    shutil.copytree(folder, backup)

    def edit_inputs():
        with np.load(folder / "inputs.npz") as f:
            X, p = f["X"].copy(), f["predictions"]
        X[0, 0, 0, 0] = 1.0 - X[0, 0, 0, 0]
        np.savez(folder / "inputs.npz", X=X, predictions=p)

    def edit_queue():
        doc = json.loads((folder / "queue.json").read_text())
        item = doc["payload"]["items"][0]
        item["prediction"] = (item["prediction"] + 1) % 10                # the model said something else
        (folder / "queue.json").write_text(json.dumps(doc))

    def edit_label():
        path = sorted((folder / "labels").glob("*.json"))[0]
        doc = json.loads(path.read_text())
        label = next(lab for lab in doc["payload"]["labels"] if lab["position"] is not None)
        label["label"] = label["position"] = (label["position"] + 1) % 10   # another class than the reviewer gave
        path.write_text(json.dumps(doc))

    try:
        for edit in (edit_inputs, edit_queue, edit_label):
            edit()
            before = _labels_state(ws, queue)
            for args in (["label", queue, "--identity", rita, "--item", digest, "--label", "4"],
                         ["retrain", queue, "--reason", "x", *SET]):
                proc = _cli(ws, *args)
                assert proc.returncode == 4 and "integrity violation" in proc.stderr, (edit.__name__, args, proc.stderr)
                assert len(proc.stderr.strip().splitlines()) == 1
            assert _labels_state(ws, queue) == before                     # nothing labelled, nothing trained
            assert Ledger(ws / "audit" / "ledger.jsonl").entries()[-1]["event"] == "integrity.violation"
            shutil.rmtree(folder)
            shutil.copytree(backup, folder)
    finally:
        if backup.exists():
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(backup, folder)
            shutil.rmtree(backup)
    assert _cli(ws, "show", queue).returncode == 0                      # restored: intact again


def test_labels_by_a_reviewer_removed_from_the_policy_stop_the_retraining(flagged):
    """The policy owner removes rita after she labelled: both ways to retrain from the queue
    are refused with exit 3 and one line before any run starts, and the ledger records why."""
    ws, queue, truth = flagged
    rita = _identity("rita")
    shown = json.loads(_cli(ws, "show", queue, "--json").stdout)
    if not any(it["labelled_by"] == rita and it["decision"] == "label" for it in shown["items_detail"]):
        assert _cli(ws, "label", queue, "--identity", rita, "--item", list(truth)[8], "--label", "3").returncode == 0
    ledger = Ledger(ws / "audit" / "ledger.jsonl")
    sign_reviewers(ws, ["sam"])
    try:
        for args in (["review", "retrain", queue, "--reason", "x", *SET],
                     ["playbook", "evasion-response", "--model", MODEL, "--reason", "x", "--retrain", "--queue", queue, *SET]):
            seq = ledger.head()["seq"]
            proc = run_cli(args, cwd=ws)
            assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1, (args, proc.returncode, proc.stderr)
            assert "last labelled by rita" in proc.stderr and "'rita' may not label" in proc.stderr
            new = [e for e in ledger.entries() if e["seq"] > seq]
            assert [e["event"] for e in new] == ["review.retrain.refused"], (args, [e["event"] for e in new])
            assert new[0]["payload"]["labelled_by"] == ["rita"]
        proc = _cli(ws, "label", queue, "--identity", rita, "--item", list(truth)[9], "--label", "3")
        assert proc.returncode == 3 and "'rita' may not label" in proc.stderr     # nor may she label now
    finally:
        sign_reviewers(ws, ["rita", "sam"])
    assert _cli(ws, "show", queue).returncode == 0
