"""Review queues and reviewers' labels on their own (no pipeline run): a queue is signed and
recorded when written, labels are signed by identity keys of the reviewers the signed policy
names, and every file changed, added or removed afterwards is refused; labels that name no
item or no class, or come from anyone the signed policy does not let label, are refused and
change nothing. The end-to-end labelling and retraining is in test_serving_review.py."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from stages.core.errors import GateRejected, IntegrityError, InvalidInput
from stages.core.workspace import Workspace
from stages.monitoring.inputs import row_digest
from stages.monitoring.review import write_queue
from stages.monitoring.review_labels import (
    open_review,
    queue_status,
    read_label_file,
    record_labels,
    resolve_labels,
    training_rows,
)
from stages.trust.identities import identity_public
from stages.trust.ledger import Ledger
from tests.support import identity as _identity
from tests.support import sign_reviewers

SHAPE = [1, 8, 8]


def _rows(n: int, *, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.random(SHAPE, dtype=np.float32)
        out.append({"data": x.tobytes(), "shape": json.dumps(SHAPE), "input_sha256": row_digest(x), "client": "mallory",
                    "time": time.time(), "model_version": "2", "prediction": i % 10, "detector_score": 4.5})
    return out


@pytest.fixture
def review_ws(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    sign_reviewers(ws.root)                     # rita and sam may label
    rows = _rows(6)
    rows[5]["input_sha256"] = "0" * 64          # the telemetry database says another digest than the bytes have
    queue, skipped = write_queue(ws, model="mlsec-digits", reason="PGD seen", rows=rows, classes=list(range(10)),
                                 data_kind="image")
    return ws, queue, skipped, rows


def _state(ws: Workspace, queue) -> tuple:
    """What labelling may change: the label files and the ledger's length."""
    labels = sorted(p.name for p in (queue.folder / "labels").glob("*")) if (queue.folder / "labels").exists() else []
    return labels, len(Ledger(ws.ledger_path).entries())


def test_a_queue_is_signed_and_recorded_and_rows_whose_bytes_differ_from_their_digest_are_left_out(review_ws):
    ws, queue, skipped, rows = review_ws
    assert skipped == {"digest_mismatch": 1, "other_shape": 0} and len(queue.items) == 5
    review = open_review(ws, queue.name, where="test")
    assert [row_digest(x) for x in review.queue.X] == [r["input_sha256"] for r in rows[:5]]
    doc = json.loads((queue.folder / "queue.json").read_text())
    assert set(doc) == {"payload", "signature"} and doc["payload"]["classes"] == list(range(10))
    recorded = [e for e in Ledger(ws.ledger_path).entries() if e["event"] == "review.queue"]
    assert recorded[-1]["payload"]["queue_sha256"] == queue.sha256
    assert queue_status(review.queue, review.final, review.entries)["status"] == "awaiting review"


def test_labels_are_signed_by_the_reviewer_and_the_latest_decision_wins(review_ws):
    ws, queue, _, _ = review_ws
    d = [item["input_sha256"] for item in queue.items]
    rita, sam = _identity("rita"), _identity("sam")
    review = open_review(ws, queue.name, where="test")
    record_labels(ws, review.queue, resolve_labels(review.queue, [(d[0][:10], "7"), (d[1], 3), (d[2], None)]),
                  identity=rita, reason="checked")
    review = open_review(ws, queue.name, where="test")
    record_labels(ws, review.queue, resolve_labels(review.queue, [(d[1], "discard"), (d[3], 9)]), identity=sam, reason="")
    review = open_review(ws, queue.name, where="test")
    X, y, items = training_rows(review.queue, review.final)
    assert [it["input_sha256"] for it in items] == [d[0], d[3]] and y.tolist() == [7, 9]
    assert [it["labelled_by"] for it in items] == ["rita", "sam"]
    assert np.array_equal(X, review.queue.X[[0, 3]])
    assert review.final[d[1]].decision == "discard" and review.final[d[1]].identity == "sam"
    status = queue_status(review.queue, review.final, review.entries)
    assert (status["labelled"], status["discarded"], status["pending"], status["status"]) == (2, 2, 1, "in review")
    entry = [e for e in review.entries if e["event"] == "review.label"][-1]["payload"]
    assert entry["identity"] == "sam" and entry["key_id"] == identity_public("sam")[0]


@pytest.mark.parametrize("pairs, match", [
    ([("ffffffffffff", "1")], "holds no item"),
    ([("xyz", "1")], "not an input digest"),
    ([(0, "1")], "not an input digest"),
    ([("{d0}", "11")], "not one of the champion's classes"),
    ([("{d0}", "cat")], "not one of the champion's classes"),
    ([("{d0}", 2.5)], "not one of the champion's classes"),
    ([("{d0}", "1"), ("{d0}", "2")], "labelled twice"),
])
def test_labels_naming_no_item_or_no_class_are_refused(review_ws, pairs, match):
    ws, queue, _, _ = review_ws
    d0 = queue.items[0]["input_sha256"]
    pairs = [(g.format(d0=d0) if isinstance(g, str) else g, lab) for g, lab in pairs]
    with pytest.raises(InvalidInput, match=match):
        resolve_labels(queue, pairs)


def test_text_classes_take_names_or_positions_and_a_class_named_discard_needs_null(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    queue, _ = write_queue(ws, model="m", reason="r", rows=_rows(2), classes=["cat", "discard"], data_kind="image")
    d = [item["input_sha256"] for item in queue.items]
    out = resolve_labels(queue, [(d[0], "cat"), (d[1], 1)])
    assert [(o["label"], o["position"]) for o in out] == [("cat", 0), ("discard", 1)]
    assert resolve_labels(queue, [(d[0], None)])[0]["decision"] == "discard"
    with pytest.raises(InvalidInput, match="is one of the classes"):
        resolve_labels(queue, [(d[0], "discard")])


def test_label_files_in_csv_and_json(tmp_path):
    (tmp_path / "a.csv").write_text("input_sha256,label\n" + "ab" * 32 + ",7\n" + "cd" * 32 + ",discard\n")
    (tmp_path / "b.json").write_text(json.dumps({"ab" * 32: 7, "cd" * 32: None}))
    (tmp_path / "c.json").write_text(json.dumps([{"input_sha256": "ab" * 32, "label": 7}]))
    assert read_label_file(str(tmp_path / "a.csv")) == [("ab" * 32, "7"), ("cd" * 32, "discard")]
    assert read_label_file(str(tmp_path / "b.json")) == [("ab" * 32, 7), ("cd" * 32, None)]
    assert read_label_file(str(tmp_path / "c.json")) == [("ab" * 32, 7)]
    for name, text, match in [("e.csv", "", "holds no labels"), ("h.csv", "input_sha256,label\n", "holds no labels"),
                              ("e.json", "{}", "holds no labels"), ("x.json", "{", "not JSON"),
                              ("l.json", "[1, 2]", "expected"), ("t.csv", "a,b,c\n", "two columns")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(InvalidInput, match=match):
            read_label_file(str(tmp_path / name))
    with pytest.raises(InvalidInput, match="not found"):
        read_label_file(str(tmp_path / "missing.csv"))


def test_a_reviewer_without_an_identity_key_stores_nothing(review_ws):
    ws, queue, _, _ = review_ws
    before = _state(ws, queue)
    labels = resolve_labels(queue, [(queue.items[0]["input_sha256"], 1)])
    with pytest.raises(InvalidInput, match="no private key for identity 'nobody'"):
        record_labels(ws, queue, labels, identity="nobody", reason="")
    assert _state(ws, queue) == before


def _cli_label(ws: Workspace, queue, who: str):
    from tests.support import run_cli

    return run_cli(["review", "label", queue.name, "--identity", who, "--item", queue.items[0]["input_sha256"],
                    "--label", "1"], cwd=ws.root)


def _recreate(name: str) -> str:
    """``name``'s identity deleted from this key folder and created again: a new key."""
    from stages.trust.identities import create_identity, key_dir

    for suffix in (".pem", ".pub.pem"):
        (key_dir() / "identities" / f"{name}{suffix}").unlink()
    create_identity(name)
    return name


def _minted(ws: Workspace) -> str:
    return _identity("mallory")                 # anyone with a shell can mint an identity


def _added_to_params_yaml(ws: Workspace) -> str:
    """The attacker lists themself in params.yaml; nobody signs it."""
    from tests.support import ROOT

    text = (ROOT / "params.yaml").read_text().replace("  reviewers: []", "  reviewers: [rita, sam, mallory]")
    assert "mallory" in text
    (ws.root / "params.yaml").write_text(text)
    return _identity("mallory")


def _recreated_under_a_pinned_name(ws: Workspace) -> str:
    sign_reviewers(ws.root, ["rita", "sam", "vera"])     # vera is a reviewer, with her key pinned
    return _recreate("vera")                             # then someone makes a new key under her name


@pytest.mark.parametrize("attacker, match", [
    (_minted, r"identity 'mallory' may not label under the signed policy \(reviewers: rita, sam\)"),
    (_added_to_params_yaml, r"identity 'mallory' may not label under the signed policy \(reviewers: rita, sam\)"),
    (_recreated_under_a_pinned_name, r"'vera' signed with key \w+, not the key the signed policy pinned for them"),
])
def test_only_the_signed_policys_reviewers_with_their_pinned_keys_may_label(review_ws, attacker, match):
    """An insider with a shell on the machine labels the flagged inputs: refused with exit 3,
    one line; no label stored, and the ledger gains only the refusal."""
    import re

    ws, queue, _, _ = review_ws
    who = attacker(ws)
    before = _state(ws, queue)
    proc = _cli_label(ws, queue, who)
    assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1 and re.search(match, proc.stderr), \
        (proc.returncode, proc.stderr)
    labels, entries = _state(ws, queue)
    assert labels == before[0] and entries == before[1] + 1
    refusal = Ledger(ws.ledger_path).entries()[-1]
    assert refusal["event"] == "review.label.refused" and refusal["payload"]["identity"] == who
    assert refusal["payload"]["queue"] == queue.name and refusal["payload"]["refused"] == "GateRejected"
    assert _cli_label(ws, queue, "rita").returncode == 0                 # a listed reviewer still labels


def test_without_reviewers_in_the_signed_policy_nobody_labels_and_the_refusal_says_how_to_name_them(review_ws):
    from stages.trust.policy import policy_path

    ws, queue, _, _ = review_ws
    labels = resolve_labels(queue, [(queue.items[0]["input_sha256"], 1)])
    sign_reviewers(ws.root, [])                        # the project's default: promotion.reviewers: []
    with pytest.raises(GateRejected, match=r"names no reviewers; list the reviewers in promotion.reviewers of "
                                           r"params.yaml and have the policy owner run 'mlsec policy sign'"):
        record_labels(ws, queue, labels, identity=_identity("rita"), reason="")
    policy_path(ws).rename(ws.root / "policy.json.away")   # no policy: refused too, and a missing one is a violation
    with pytest.raises(IntegrityError, match="signed policy .* is missing, but the ledger records policy"):
        record_labels(ws, queue, labels, identity="rita", reason="")
    assert _state(ws, queue)[0] == []


def _cli(ws: Workspace, capsys, argv: list[str]):
    """Run a command in the workspace; its JSON (``--json``) or its text."""
    from flows.cli import main
    from tests.support import inside

    capsys.readouterr()
    with inside(ws.root):
        assert main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out) if "--json" in argv else out


def test_labels_by_a_reviewer_removed_from_the_policy_no_longer_reach_a_retraining(review_ws, capsys):
    """Rita labels, then the policy owner removes her: the retraining is refused (exit 3),
    naming her items, until a listed reviewer labels them again."""
    from flows.playbooks.data import DatasetVersion
    from flows.playbooks.review import labelled_rows
    from stages.monitoring.reviewers import check_labellers

    ws, queue, _, _ = review_ws
    d = [item["input_sha256"] for item in queue.items]
    record_labels(ws, queue, resolve_labels(queue, [(d[0], 7), (d[1], None)]), identity=_identity("rita"), reason="")
    record_labels(ws, queue, resolve_labels(queue, [(d[2], 3)]), identity=_identity("sam"), reason="")
    data = DatasetVersion("r0", "d" * 64, "s", np.zeros((4, *SHAPE), np.float32), np.arange(4),
                          {"classes": list(range(10)), "kind": "image"})
    assert len(labelled_rows(ws, queue.name, model="mlsec-digits", data=data, where="test")[3]) == 2
    sign_reviewers(ws.root, ["sam"])                   # the policy owner removes rita
    with pytest.raises(GateRejected, match=r"2 item\(s\) were last labelled by rita, whom the signed policy in force "
                                           r"does not let label .*'rita' may not label"):
        labelled_rows(ws, queue.name, model="mlsec-digits", data=data, where="test")
    refusal = Ledger(ws.ledger_path).entries()[-1]
    assert refusal["event"] == "review.retrain.refused" and refusal["payload"]["items"] == [d[0], d[1]]
    assert refusal["payload"]["labelled_by"] == ["rita"]
    review = open_review(ws, queue.name, where="test")     # the check itself, as evasion-response makes it
    with pytest.raises(GateRejected, match="last labelled by rita"):
        check_labellers(ws, queue=queue.name, decisions=review.final.values())
    # review list and show say so before anyone tries to retrain, and write nothing
    before = len(Ledger(ws.ledger_path).entries())
    listed = _cli(ws, capsys, ["review", "list", "--json"])
    assert (listed[0]["status"], listed[0]["not_counted"], listed[0]["not_counted_labellers"]) == \
        ("needs relabelling", 2, ["rita"])
    shown = _cli(ws, capsys, ["review", "show", queue.name, "--json"])
    assert {it["input_sha256"]: bool(it["not_counted"]) for it in shown["items_detail"] if it["decision"]} == \
        {d[0]: True, d[1]: True, d[2]: False}
    assert "'rita' may not label" in next(it["not_counted"] for it in shown["items_detail"] if it["not_counted"])
    text = _cli(ws, capsys, ["review", "show", queue.name])
    assert "not counted 2 (labelled by rita" in text and text.count("NOT COUNTED") == 2
    assert len(Ledger(ws.ledger_path).entries()) == before
    # sam labels rita's items again: his later decisions replace hers, and the retraining may use them
    record_labels(ws, queue, resolve_labels(queue, [(d[0], 7), (d[1], None)]), identity="sam", reason="rechecked")
    assert _cli(ws, capsys, ["review", "list", "--json"])[0]["not_counted"] == 0
    _, _, y, items = labelled_rows(ws, queue.name, model="mlsec-digits", data=data, where="test")
    assert [(it["input_sha256"], it["labelled_by"]) for it in items] == [(d[0], "sam"), (d[2], "sam")]
    assert y.tolist() == [7, 3]


def _tamper_npz(folder):
    with np.load(folder / "inputs.npz") as f:
        X, p = f["X"].copy(), f["predictions"]
    X[0, 0, 0, 0] = 1.0 - X[0, 0, 0, 0]          # one pixel of one flagged input
    np.savez(folder / "inputs.npz", X=X, predictions=p)


def _tamper_queue(folder):
    doc = json.loads((folder / "queue.json").read_text())
    doc["payload"]["items"][0]["client"] = "somebody-else"
    (folder / "queue.json").write_text(json.dumps(doc))


def _tamper_label(folder):
    path = next((folder / "labels").glob("*.json"))
    doc = json.loads(path.read_text())
    doc["payload"]["labels"][0].update(label=3, position=3)     # another class than the reviewer signed
    path.write_text(json.dumps(doc))


def _swap_label_for_another_reviewers(folder):
    """A validly signed label document by another reviewer, copied over the recorded one."""
    path = next((folder / "labels").glob("*.json"))
    forged = json.loads(path.read_text())
    from stages.trust.identities import identity_signer
    from stages.trust.signing import sign_document

    forged["payload"]["labels"][0].update(label=3, position=3)
    path.write_text(json.dumps(sign_document(forged["payload"], signer=identity_signer(_identity("sam")))))


@pytest.mark.parametrize("tamper, match", [
    (_tamper_npz, "inputs.npz: SHA-256"),
    (_tamper_queue, "queue.json: bad signature"),
    (_tamper_label, "bad signature"),
    (_swap_label_for_another_reviewers, "unknown key|bad signature"),
    (lambda f: next((f / "labels").glob("*.json")).unlink(), "missing; the ledger records it"),
    (lambda f: shutil.copy(next((f / "labels").glob("*.json")), f / "labels" / "more.json"), "no review.label ledger entry"),
    (lambda f: (f / "queue.json").unlink(), "missing, but the ledger records the queue"),
])
def test_a_queue_or_label_changed_after_it_was_signed_is_refused_and_recorded(review_ws, tamper, match):
    ws, queue, _, _ = review_ws
    record_labels(ws, queue, resolve_labels(queue, [(queue.items[0]["input_sha256"], 7)]), identity=_identity("rita"),
                  reason="")
    open_review(ws, queue.name, where="test")        # intact
    tamper(queue.folder)
    with pytest.raises(IntegrityError, match=match):
        open_review(ws, queue.name, where="test")
    assert Ledger(ws.ledger_path).entries()[-1]["event"] == "integrity.violation"


def test_a_row_that_no_longer_hashes_to_its_digest_is_refused_even_under_a_matching_file_digest(review_ws):
    """An insider who re-signs the queue with the pipeline's key still meets the ledger's record."""
    ws, queue, _, _ = review_ws
    from stages.trust.hashing import sha256_file
    from stages.trust.signing import sign_document

    _tamper_npz(queue.folder)
    payload = dict(queue.payload, inputs={**queue.payload["inputs"], "sha256": sha256_file(queue.folder / "inputs.npz")})
    (queue.folder / "queue.json").write_text(json.dumps(sign_document(payload)))
    with pytest.raises(IntegrityError, match="the ledger records queue digest"):
        open_review(ws, queue.name, where="test")


def test_an_unknown_queue_is_bad_input(review_ws):
    ws, _, _, _ = review_ws
    for name in ("20000101T000000Z", "../audit", ""):
        with pytest.raises(InvalidInput, match="unknown review queue|invalid review queue name"):
            open_review(ws, name, where="test")


def test_labelled_rows_join_the_champions_data_with_the_reviewers_labels_and_its_class_order(tmp_path):
    """The source a retraining ingests: the champion's rows, then the labelled ones with the
    reviewers' classes (by name, the champion's class order kept), each recorded under the run
    with the sample digest ingest will give it."""
    from flows.playbooks.data import DatasetVersion
    from flows.playbooks.review import review_source
    from stages.data.io import load_source
    from stages.data.prepared import row_digest as sample_digest

    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    sign_reviewers(ws.root)
    classes = ["zebra", "ant", "cat"]                     # declared order, not sorted
    rng = np.random.default_rng(1)
    data = DatasetVersion("r0", "d" * 64, "s", rng.random((6, *SHAPE), dtype=np.float32),
                          np.array([0, 1, 2, 0, 1, 2]), {"classes": classes, "kind": "image"})
    queue, _ = write_queue(ws, model="m", reason="r", rows=_rows(3, seed=2), classes=classes, data_kind="image")
    d = [item["input_sha256"] for item in queue.items]
    record_labels(ws, queue, resolve_labels(queue, [(d[0], "cat"), (d[1], None), (d[2], "zebra")]),
                  identity=_identity("rita"), reason="")
    review = open_review(ws, queue.name, where="test")
    X, y, items = training_rows(review.queue, review.final)
    run_id = "20260101T000000Z-abcdef"
    source, overrides, record = review_source(ws, review, data, X, y, items, run_id=run_id, declared=None,
                                              label_column="label")
    assert overrides == ['data.classes=["zebra", "ant", "cat"]'] and record["items"] == 2
    ingested = load_source(source, classes=classes)        # as the run's ingest reads it with that setting
    assert list(ingested.classes) == classes and len(ingested.y) == 8
    assert ingested.y[-2:].tolist() == [2, 0] and np.array_equal(ingested.X[-2:], review.queue.X[[0, 2]])
    assert [sample_digest(ingested.X, int(ingested.y[i]), i) for i in (6, 7)] == [it["sample_sha256"] for it in items]
    entry = [e for e in Ledger(ws.ledger_path).entries() if e["event"] == "review.train"][-1]
    assert entry["run_id"] == run_id and [it["input_sha256"] for it in entry["payload"]["items"]] == [d[0], d[2]]
    from stages.trust.policy import load_signed_policy     # who was allowed to label, and under which policy

    assert entry["payload"]["reviewers_policy_sha256"] == load_signed_policy(ws).sha256
    assert {it["labelled_key_id"] for it in entry["payload"]["items"]} == {identity_public("rita")[0]}
    assert queue_status(review.queue, review.final, Ledger(ws.ledger_path).entries())["trained_in"] == \
        [{"run_id": run_id, "items": 2}]
    # nothing labelled: the champion's rows alone, and the ledger says so
    empty = np.zeros((0, *SHAPE), dtype=np.float32)
    source, _, record = review_source(ws, review, data, empty, np.zeros(0, np.int64), [], run_id=run_id + "0",
                                      declared=classes, label_column="label")
    assert record["items"] == 0 and len(load_source(source, classes=classes).y) == 6
