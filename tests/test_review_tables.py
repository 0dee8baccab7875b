"""Review queues of a table model on their own (no pipeline run): the queue keeps each
flagged row as the client sent it, by column name, signed with the queue; a retraining
source appends the labelled raw rows, with the reviewers' class names, to the champion's
table under the same column names; a queue edited afterwards, or one that cannot join the
champion's table, is refused. The served end to end is in test_serving_tables.py."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from stages.core.errors import IntegrityError, InvalidInput
from stages.core.workspace import Workspace
from stages.data.preprocessing import fit_table_preprocessing
from stages.monitoring.inputs import row_digest, table_request
from stages.monitoring.review import write_queue
from stages.monitoring.review_labels import open_review, record_labels, resolve_labels, training_rows
from tests.support import identity as _identity
from tests.support import sign_reviewers

COLUMNS = [{"name": "age", "type": "numeric"}, {"name": "city", "type": "categorical", "categories": ["a", "b"]}]
CLASSES = ["benign", "malignant"]
SENT = [{"age": 30, "city": " b "}, {"age": None, "city": "c"}, {"age": 45.5, "city": None}, {"age": 61, "city": "a"}]


def _champion():
    from flows.playbooks.data import DatasetVersion

    X = np.array([[20, 0], [40, 1], [60, 0], [np.nan, 1], [35, 1], [50, 0]], dtype=np.float32)
    meta = {"kind": "table", "classes": CLASSES, "columns": COLUMNS, "missing": "impute"}
    return DatasetVersion("r0", "d" * 64, "s", X, np.array([0, 1, 0, 1, 0, 1]), meta)


def _spec() -> dict:
    """The signed preprocessing of the version that answered (version 3)."""
    return fit_table_preprocessing(_champion().X, COLUMNS, missing="impute", unknown_category="ignore")


def _versions(version: str) -> dict | None:
    return _spec() if version == "3" else None      # other versions no longer verify


def _flagged(rows: list[dict]) -> list[dict]:
    """Telemetry rows as the service logs a flagged table row: scaled features and the raw row."""
    X, raw = table_request(rows, spec=_spec(), max_batch=10)
    return [{"data": X[i].tobytes(), "shape": json.dumps([X.shape[1]]), "input_sha256": row_digest(X[i]), "client": "mallory",
             "time": time.time(), "model_version": "3", "prediction": i % 2, "detector_score": 4.5,
             "raw_row": json.dumps(raw[i])} for i in range(len(X))]


@pytest.fixture
def table_queue(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    sign_reviewers(ws.root)                     # rita and sam may label
    rows = _flagged(SENT)
    legacy = dict(rows[3], raw_row=None)        # logged before raw rows were kept
    other = dict(_flagged([{"age": 1, "city": "a"}])[0], raw_row=json.dumps({"age": 1, "town": "a"}))
    queue, skipped = write_queue(ws, model="m", reason="r", rows=[*rows[:3], legacy, other], classes=CLASSES,
                                 data_kind="table", columns=COLUMNS, preprocessing=_versions)
    return ws, queue, skipped


def test_a_table_queue_keeps_the_raw_rows_by_column_name_signed(table_queue):
    ws, queue, skipped = table_queue
    assert skipped == {"digest_mismatch": 0, "other_shape": 0, "no_raw_row": 2, "raw_row_mismatch": 0, "unverified_version": 0}
    assert queue.columns == [{"name": "age", "type": "numeric"}, {"name": "city", "type": "categorical"}]
    assert [item["row"] for item in queue.items] == [{"age": 30.0, "city": " b "}, {"age": None, "city": "c"},
                                                     {"age": 45.5, "city": None}]
    again = open_review(ws, queue.name, where="test").queue
    assert again.sha256 == queue.sha256 and [it["row"] for it in again.items] == [it["row"] for it in queue.items]


def _edit_row(folder):
    doc = json.loads((folder / "queue.json").read_text())
    doc["payload"]["items"][0]["row"]["age"] = 99.0         # what the client sent, changed afterwards
    (folder / "queue.json").write_text(json.dumps(doc))


def _drop_row(folder):
    doc = json.loads((folder / "queue.json").read_text())
    del doc["payload"]["items"][1]["row"]
    (folder / "queue.json").write_text(json.dumps(doc))


def test_a_raw_row_edited_in_the_telemetry_store_never_reaches_a_queue(tmp_path):
    """The telemetry store is not signed. An insider who rewrites a flagged row's raw cells
    there (the features and their digest left as the service logged them) would have the
    edited row appended to the champion's table by a retraining: the queue keeps a raw row
    only when the answering version's signed preprocessing turns it into the logged
    features; a row of a version that no longer verifies is left out too."""
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    rows = _flagged(SENT)
    moved = dict(rows[0], raw_row=json.dumps({"age": 75, "city": "b"}))             # another age
    relabelled_city = dict(rows[3], raw_row=json.dumps({"age": 61, "city": "b"}))   # another category
    revoked = dict(rows[1], model_version="2")
    queue, skipped = write_queue(ws, model="m", reason="r", rows=[moved, relabelled_city, rows[2], revoked, rows[1]],
                                 classes=CLASSES, data_kind="table", columns=COLUMNS, preprocessing=_versions)
    assert skipped["raw_row_mismatch"] == 2 and skipped["unverified_version"] == 1
    kept = {item["input_sha256"]: item["row"] for item in queue.items}
    assert kept == {r["input_sha256"]: json.loads(r["raw_row"]) for r in (rows[2], rows[1])}
    with pytest.raises(InvalidInput, match="each version's signed preprocessing"):
        write_queue(ws, model="m", reason="r", rows=rows, classes=CLASSES, data_kind="table", columns=COLUMNS)


@pytest.mark.parametrize("edit", [_edit_row, _drop_row])
def test_a_table_queue_edited_afterwards_is_refused(table_queue, edit):
    ws, queue, _ = table_queue
    edit(queue.folder)
    with pytest.raises(IntegrityError, match="signature"):
        open_review(ws, queue.name, where="test")


def test_labelled_raw_rows_join_the_champions_table_by_column_name_with_the_reviewers_labels(table_queue):
    from flows.playbooks.review import check_joinable, review_source, table_row_key
    from stages.data.prepared import row_values
    from stages.data.tables import read_table

    ws, queue, _ = table_queue
    d = [item["input_sha256"] for item in queue.items]
    record_labels(ws, queue, resolve_labels(queue, [(d[0], "malignant"), (d[1], "benign"), (d[2], None)]),
                  identity=_identity("rita"), reason="")
    review = open_review(ws, queue.name, where="test")
    X, y, items = training_rows(review.queue, review.final)
    assert [it["row"] for it in items] == [{"age": 30.0, "city": " b "}, {"age": None, "city": "c"}]
    champion = _champion()
    check_joinable(review, champion)
    source, overrides, record = review_source(ws, review, champion, X, y, items, run_id="20260101T000000Z-abcdef",
                                              declared=None, label_column="diagnosis")
    assert record["items"] == 2 and record["champion_rows"] == 6 and not overrides
    table = read_table(source, label_column="diagnosis", columns=None, missing="impute", max_categories=10)
    assert [c["name"] for c in table.columns] == ["age", "city"]
    assert table.columns[1]["categories"] == ["a", "b", "c"]             # the review row's new clinic joins the list
    meta = {"columns": table.columns}
    added = [(row_values(table.X, meta, i)["values"], str(table.labels[i])) for i in (6, 7)]
    assert added == [({"age": 30.0, "city": "b"}, "malignant"), ({"age": None, "city": "c"}, "benign")]
    assert [(row_values(table.X, meta, i)["values"], str(table.labels[i])) for i in range(6)] == \
        [(row_values(champion.X, champion.meta, i)["values"], CLASSES[int(champion.y[i])]) for i in range(6)]
    # the run's data is checked by these keys: the raw row as sent matches the row as ingested
    assert [table_row_key(it["row"], it["label"]) for it in items] == [table_row_key(v, lab) for v, lab in added]


def test_far_out_labelled_rows_are_trained_as_the_model_saw_them_clipped_to_the_champions_range(tmp_path):
    """An attacker's rows far past the training range, labelled by a reviewer: appended as
    sent, one of them would stretch the range the retraining scales every row by (ages 20 to
    60 would become 20 to 5,000). They are appended clipped to the champion's range, as the
    served model clipped them; the queue keeps them as sent, the item records both, and the
    run's data check looks for the clipped row."""
    from flows.playbooks.review import review_source, table_row_key
    from stages.data.prepared import row_values
    from stages.data.tables import read_table

    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    sign_reviewers(ws.root)
    sent = [{"age": 5000, "city": "a"}, {"age": -3, "city": "b"}, {"age": 41, "city": "a"}]
    queue, _ = write_queue(ws, model="m", reason="r", rows=_flagged(sent), classes=CLASSES, data_kind="table",
                           columns=COLUMNS, preprocessing=_versions)
    d = [item["input_sha256"] for item in queue.items]
    record_labels(ws, queue, resolve_labels(queue, [(d[0], "malignant"), (d[1], "benign"), (d[2], "benign")]),
                  identity=_identity("rita"), reason="")
    review = open_review(ws, queue.name, where="test")
    X, y, items = training_rows(review.queue, review.final)
    source, _, _ = review_source(ws, review, _champion(), X, y, items, run_id="20260101T000000Z-abcdef",
                                 declared=None, label_column="diagnosis")
    table = read_table(source, label_column="diagnosis", columns=None, missing="impute", max_categories=10)
    added = [row_values(table.X, {"columns": table.columns}, i)["values"] for i in (6, 7, 8)]
    assert [v["age"] for v in added] == [60.0, 20.0, 41.0]
    assert np.nanmax(table.X[:, 0]) == 60 and np.nanmin(table.X[:, 0]) == 20
    assert [it["row"]["age"] for it in items] == [5000, -3, 41]                       # as sent, as the queue signed it
    assert [it.get("trained_row") for it in items] == [{"age": 60.0, "city": "a"}, {"age": 20.0, "city": "b"}, None]
    keys = {table_row_key(v, lab) for v, lab in zip(added, ["malignant", "benign", "benign"])}
    assert {table_row_key(it.get("trained_row", it["row"]), it["label"]) for it in items} == keys


def test_a_queue_that_cannot_join_the_champions_table_is_refused(table_queue, tmp_path):
    from dataclasses import replace

    from flows.playbooks.review import check_joinable

    ws, queue, _ = table_queue
    review = open_review(ws, queue.name, where="test")
    champion = _champion()
    renamed = replace(champion, meta={**champion.meta, "columns": [dict(COLUMNS[0], name="years"), COLUMNS[1]]})
    with pytest.raises(InvalidInput, match="names and types differ"):
        check_joinable(review, renamed)
    with pytest.raises(InvalidInput, match="holds table inputs, the champion was trained on image data"):
        check_joinable(review, replace(champion, meta={**champion.meta, "kind": "image"}))
    old = write_queue(ws, model="m", reason="r", rows=_flagged(SENT[:1]), classes=CLASSES, data_kind="table",
                      columns=COLUMNS, preprocessing=_versions)[0]
    old_review = replace(review, queue=replace(old, payload={k: v for k, v in old.payload.items() if k != "columns"}))
    with pytest.raises(InvalidInput, match="keeps only the scaled features"):
        check_joinable(old_review, champion)


def test_a_telemetry_store_created_before_raw_rows_gains_the_column_and_keeps_its_rows(tmp_path):
    """A store written by an earlier version (no raw_row column): opened, it gains the column;
    its old flagged rows read back with none, and new ones keep theirs."""
    import sqlite3

    from stages.monitoring.store import TelemetryStore

    db = tmp_path / "telemetry.db"
    old = _flagged(SENT[:1])[0]
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE flagged_inputs (input_sha256 VARCHAR(64) PRIMARY KEY, time FLOAT NOT NULL, client "
                     "VARCHAR(64) NOT NULL, model_version VARCHAR(32) NOT NULL, prediction INTEGER NOT NULL, detector_score "
                     "FLOAT NOT NULL, shape VARCHAR(64) NOT NULL, data BLOB NOT NULL)")
        conn.execute("INSERT INTO flagged_inputs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     [old[k] for k in ("input_sha256", "time", "client", "model_version", "prediction", "detector_score",
                                       "shape", "data")])
    store = TelemetryStore(f"sqlite:///{db}", queue_max=10, retention_s=86_400).start()
    new = _flagged(SENT[1:2])[0]
    assert store.submit("flagged_inputs", [new]) and store.flush()
    rows = {r["input_sha256"]: r["raw_row"] for r in store.flagged_inputs()}
    store.close()
    assert rows == {old["input_sha256"]: None, new["input_sha256"]: new["raw_row"]}


def test_a_labelled_row_beyond_the_float32_range_is_refused_and_still_measured(tmp_path):
    """The model clips an attacker's 1e300; the queue keeps it as sent, the epsilon measure
    copes with it, and a retraining that would train on it is bad input naming the item."""
    from flows.playbooks.review import check_table_items, perturbation_inputs

    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    sign_reviewers(ws.root)
    queue, _ = write_queue(ws, model="m", reason="r", rows=_flagged([{"age": 1e300, "city": "a"}, SENT[0]]),
                           classes=CLASSES, data_kind="table", columns=COLUMNS, preprocessing=_versions)
    assert queue.items[0]["row"] == {"age": 1e300, "city": "a"}
    d = [item["input_sha256"] for item in queue.items]
    record_labels(ws, queue, resolve_labels(queue, [(d[0], "benign"), (d[1], "malignant")]), identity=_identity("rita"),
                  reason="")
    review = open_review(ws, queue.name, where="test")
    X, _, items = training_rows(review.queue, review.final)
    train, flagged = perturbation_inputs(_champion(), review.queue, X, items)
    assert np.isfinite(flagged).all() and flagged.shape[1] == train.shape[1] and flagged[0, 0] == 1.0   # clipped
    with pytest.raises(InvalidInput, match=rf"item {d[0][:16]}\.\.\., column 'age' holds 1e\+300, beyond the float32"):
        check_table_items(queue.name, items)
    check_table_items(queue.name, items[1:])
