"""The serving cores on their own: input checks, keys and budgets, the telemetry store under a
locked or full database, the adversarial and extraction detectors, drift and alert rules."""

from __future__ import annotations

import json
import sqlite3
import time

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.core.errors import InvalidInput
from stages.monitoring.access import Budgets, Client, KeyStore
from stages.monitoring.alerts import RateRules
from stages.monitoring.diagnosis import diagnose
from stages.monitoring.drift import DriftMonitor, drift_test
from stages.monitoring.extraction import ExtractionDetector, shapiro_w
from stages.monitoring.inputs import check_inputs, row_digest, row_digests
from stages.monitoring.store import TelemetryStore

SHAPE = (1, 8, 8)


# -- inputs -----------------------------------------------------------------------------
def test_inputs_accept_both_layouts_and_give_one_digest():
    rows = np.random.default_rng(0).random((3, 64)).round(3)
    flat = check_inputs(rows.tolist(), input_shape=SHAPE, max_batch=8)
    shaped = check_inputs(rows.reshape(3, 1, 8, 8).tolist(), input_shape=SHAPE, max_batch=8)
    assert flat.shape == shaped.shape == (3, 1, 8, 8) and flat.dtype == np.float32
    assert [row_digest(r) for r in flat] == [row_digest(r) for r in shaped]
    assert row_digests(flat) == row_digests(shaped) == row_digests(flat.astype(np.float64)) == [row_digest(r) for r in flat]


@pytest.mark.parametrize("value, match", [
    ("x", "list of rows"), ([], "empty"), ([[0.5] * 63], "shape"), ([[0.5] * 64, [0.5] * 63], "shape|ragged"),
    ([[float("nan")] + [0.5] * 63], "NaN"), ([[float("inf")] + [0.5] * 63], "NaN"), ([[1.5] + [0.5] * 63], r"\[0, 1\]"),
    ([[True] + [0.5] * 63], "numbers"), ([["0.5"] + [0.5] * 63], "numbers"), ([[None] + [0.5] * 63], "numbers"),
    ([[10**400] + [0.5] * 63], "too large|\\[0, 1\\]"), ([[0.5] * 64] * 9, "more than the limit"),
    ([[[[[0.5]]]]], "nested|shape"),
])
def test_inputs_refuse_with_a_message_that_shows_what_was_seen(value, match):
    with pytest.raises(InvalidInput, match=match):
        check_inputs(value, input_shape=SHAPE, max_batch=8)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=3),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                    max_leaves=80)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_any_json_value_is_accepted_or_refused_as_bad_input_never_anything_else(value):
    try:
        out = check_inputs(value, input_shape=(2,), max_batch=4)
    except InvalidInput:
        return
    assert out.dtype == np.float32 and out.shape[1:] == (2,) and np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


# -- keys and budgets -------------------------------------------------------------------
def test_keys_are_stored_hashed_and_name_exactly_one_client(tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    alice, bob = store.add("alice"), store.add("bob", budget=5)
    text = (tmp_path / "keys.json").read_text()
    # the secret part (token_urlsafe may itself hold "_": its last piece can be one character)
    assert alice not in text and bob not in text and alice.removeprefix("mlsec_alice_") not in text
    assert store.authenticate(alice).name == "alice" and store.authenticate(bob) == Client("bob", "client", 5)
    for wrong in (None, "", alice[:-1], alice + "x", "mlsec_alice_" + "A" * 43, "x" * 10_000):
        assert store.authenticate(wrong) is None
    with pytest.raises(InvalidInput, match="already has a key"):
        store.add("alice")
    with pytest.raises(InvalidInput, match="client name"):
        store.add("../evil")
    store.remove("alice")
    assert store.authenticate(alice) is None and store.authenticate(bob).name == "bob"


def test_budgets_charge_the_presenting_client_and_refuse_past_the_limit():
    budgets = Budgets(default_budget=10, period_s=3600, used={"alice": 8})
    alice, bob = Client("alice", "client", None), Client("bob", "client", 3)
    assert budgets.try_spend(alice, 2) == (True, 0)
    assert budgets.try_spend(alice, 1) == (False, 0)
    assert budgets.try_spend(bob, 3) == (True, 0) and budgets.try_spend(bob, 1)[0] is False
    assert budgets.used("alice") == 10 and budgets.used("bob") == 3


# -- telemetry store --------------------------------------------------------------------
def _row(i: int, client: str = "alice", t: float | None = None) -> dict:
    return {"time": time.time() if t is None else t, "client": client, "model_version": "1", "request_id": f"r{i}",
            "input_sha256": f"{i:064x}", "input_mean": 0.1, "input_std": 0.2, "input_min": 0.0, "input_max": 1.0,
            "prediction": i % 10, "confidence": 0.9, "latency_ms": 1.0, "detector_score": 0.0, "flagged": False,
            "extraction_flagged": False, "outcome": "answered"}


def test_store_keeps_rows_while_the_database_is_locked_and_writes_them_after(tmp_path):
    db = tmp_path / "t.db"
    health = []
    store = TelemetryStore(f"sqlite:///{db}", queue_max=1000, retention_s=3600,
                           on_health=lambda ok, err: health.append((ok, err))).start()
    store.submit("predictions", [_row(0)])
    assert store.flush()
    blocker = sqlite3.connect(db, timeout=10)          # waits out the writer's own idle-time prune, if it runs now
    blocker.execute("BEGIN EXCLUSIVE")
    assert store.submit("predictions", [_row(i) for i in range(1, 51)])
    deadline = time.time() + 20
    while store.healthy and time.time() < deadline:
        time.sleep(0.1)
    assert not store.healthy and health and health[0][0] is False and "locked" in health[0][1]
    assert store.backlog() == 50                      # kept, not dropped
    blocker.rollback()
    blocker.close()
    assert store.flush(timeout=30)
    assert store.healthy and health[-1] == (True, None)
    assert store.rows_since(0) == 51
    store.close()


def test_store_keeps_rows_when_the_database_is_full_and_refuses_only_when_its_queue_is(tmp_path):
    db = tmp_path / "full.db"
    store = TelemetryStore(f"sqlite:///{db}", queue_max=40, retention_s=3600)
    page_count = sqlite3.connect(db).execute("PRAGMA page_count").fetchone()[0]

    @__import__("sqlalchemy").event.listens_for(store.engine, "connect")
    def _cap(conn, _rec):
        conn.execute(f"PRAGMA max_page_count={page_count + 1}")

    store.engine.dispose()
    store.start()
    big = [_row(i) for i in range(30)]
    assert store.submit("predictions", big)
    deadline = time.time() + 20
    while store.healthy and time.time() < deadline:
        time.sleep(0.1)
    assert not store.healthy and "full" in store.last_error
    assert store.submit("predictions", [_row(100 + i) for i in range(20)]) is False   # no room: refused, nothing half-queued
    assert store.backlog() == 30
    store._stop.set()
    store._thread.join(timeout=5)


def test_rows_given_by_column_are_stored_as_the_same_rows_and_a_malformed_batch_queues_nothing(tmp_path):
    store = TelemetryStore(f"sqlite:///{tmp_path / 'c.db'}", queue_max=100, retention_s=3600).start()
    by_row = [_row(i, client="alice") for i in range(3)]
    by_column = [_row(10 + i, client="bob") for i in range(3)]
    assert store.submit("predictions", by_row)
    assert store.submit_columns("predictions", {c: [r[c] for r in by_column] for c in by_column[0]})
    assert store.submit_columns("flagged_inputs", {      # a column added later (raw_row) may be left out
        "input_sha256": ["f" * 64], "time": [time.time()], "client": ["bob"], "model_version": ["1"], "prediction": [3],
        "detector_score": [2.5], "shape": ["[64]"], "data": [b"\0" * 4]})
    lacking = {k: v for k, v in _row(20).items() if k != "confidence"}
    with pytest.raises(ValueError, match="confidence"):
        store.submit("predictions", [_row(21), lacking])
    with pytest.raises(ValueError, match="confidence"):
        store.submit_columns("predictions", {c: [v] for c, v in lacking.items()})
    with pytest.raises(ValueError, match="unequal"):
        store.submit_columns("predictions", {c: [v] * (2 if c == "client" else 1) for c, v in _row(22).items()})
    assert store.backlog() == 7 and store.flush()
    with store.engine.connect() as conn:
        got = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM predictions ORDER BY id"))]
        flagged = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM flagged_inputs"))]
    assert [{k: v for k, v in r.items() if k != "id"} for r in got] == [
        {**r, "flagged": 0, "extraction_flagged": 0} for r in by_row + by_column]
    assert len(flagged) == 1 and flagged[0]["raw_row"] is None and flagged[0]["prediction"] == 3
    store.close()


def test_the_store_does_not_index_digests_and_drops_an_older_stores_index(tmp_path):
    url = f"sqlite:///{tmp_path / 't.db'}"
    with sqlite3.connect(tmp_path / "t.db") as con:          # a store from before: the digest indexed
        con.execute("CREATE TABLE predictions (id INTEGER PRIMARY KEY, time FLOAT NOT NULL, input_sha256 VARCHAR(64))")
        con.execute("CREATE INDEX ix_predictions_input_sha256 ON predictions (input_sha256)")
    store = TelemetryStore(url, queue_max=10, retention_s=3600)
    names = {ix["name"] for ix in sa.inspect(store.engine).get_indexes("predictions")}
    assert "ix_predictions_input_sha256" not in names
    store.close()


def test_retention_deletes_only_old_rows(tmp_path):
    store = TelemetryStore(f"sqlite:///{tmp_path / 'r.db'}", queue_max=100, retention_s=3600).start()
    store.submit("predictions", [_row(0, t=time.time() - 7200), _row(1)])
    store.submit("alerts", [{"time": time.time() - 7200, "kind": "drift", "severity": "warning", "message": "m",
                             "payload": json.dumps({})}])
    assert store.flush()
    store.prune()                                    # the writer also prunes on its own when idle
    assert store.rows_since(0) == 1 and store.alerts() == [] and store.predictions()[0]["request_id"] == "r1"
    store.close()


# -- detectors --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_model():
    """A small CNN trained on digits the way the train stage does (a few epochs)."""
    from stages.core.params import load_params
    from stages.data.io import load_source
    from stages.data.prepared import split_indices
    from stages.ml.training.loop import fit
    from tests.support import ROOT

    params = load_params(ROOT / "params.yaml", ["train.mode=standard", "train.epochs=6", "train.device=cpu"])
    d = load_source("sklearn:digits")
    X, y = d.X.astype(np.float32), d.y.astype(np.int64)
    train, held = split_indices(y, test_fraction=0.2, seed=0)
    model = fit(X[train], y[train], params=params.train, num_classes=10, progress=False).model
    return model, X, y, train, held


def test_detector_catches_pgd_and_noise_at_the_false_positive_rate_it_promises(digits_model):
    from stages.monitoring.detector import calibrate_detector

    model, X, y, train, held = digits_model
    det = calibrate_detector(model, X_train=X[train], y_train=y[train], X_held=X[held], y_held=y[held], num_classes=10,
                             epsilons=[0.1, 0.3], target_fpr=0.05)
    r = det.report                                     # measured on held-out rows calibration did not see
    assert r["false_positive_rate"] <= 0.1
    assert r["pgd_detection_rate"]["0.3"] >= 0.9 and r["noise_detection_rate"] >= 0.95
    _, score, flagged = det.score(model, torch.from_numpy(X[held][:50]))
    assert score.shape == (50,) and flagged.float().mean() <= 0.2


def test_prada_flags_a_synthetic_sweep_but_not_natural_clients(digits_model):
    model, X, y, train, held = digits_model
    rng = np.random.default_rng(1)
    ex = ExtractionDetector(min_queries=60, delta=0.9, ood_fraction=0.5)
    with torch.no_grad():
        labels = model(torch.from_numpy(X)).argmax(1).numpy()
    for c in range(10):                                # natural traffic: draws of real digits
        idx = rng.choice(len(X), size=400)
        for s in range(0, 400, 20):
            ex.observe(f"normal{c}", X[idx[s:s + 20]], labels[idx[s:s + 20]], np.zeros(20, bool))
        assert not ex.state(f"normal{c}")["flagged"], ex.state(f"normal{c}")
    # a sweep: small signed steps around a few seeds, as Jacobian augmentation makes them
    seeds = X[rng.choice(len(X), size=20, replace=False)]
    sweep = [seeds]
    for _ in range(20):
        step = np.sign(rng.standard_normal(seeds.shape)).astype(np.float32) * 0.05
        sweep.append(np.clip(sweep[-1] + step, 0, 1))
    Q = np.concatenate(sweep)[:500]
    with torch.no_grad():
        q_labels = model(torch.from_numpy(Q)).argmax(1).numpy()
    for s in range(0, len(Q), 20):
        if ex.observe("sweeper", Q[s:s + 20], q_labels[s:s + 20], np.zeros(len(Q[s:s + 20]), bool)):
            break
    state = ex.state("sweeper")
    assert state["flagged"] and state["flagged_at"] <= 500, state
    ex.observe("noisy", rng.random((100, 1, 8, 8)).astype(np.float32), np.zeros(100, int), np.ones(100, bool))
    assert ex.state("noisy")["flagged"] and "input detector" in ex.state("noisy")["reason"]


def test_a_client_repeating_its_queries_is_not_flagged_and_repeats_do_not_hide_a_sweep(digits_model):
    """A client that polls the same few inputs learns nothing new; its zero distances must not
    read as a sweep. An attacker who mixes repeats into a sweep must still be caught."""
    model, X, y, train, held = digits_model
    with torch.no_grad():
        labels = model(torch.from_numpy(X)).argmax(1).numpy()
    rng = np.random.default_rng(2)
    a, b = rng.choice(np.flatnonzero(labels == 3), size=2, replace=False)   # two of one class: one real distance
    c, d = np.flatnonzero(labels == 5)[0], np.flatnonzero(labels == 7)[0]
    polled = X[[a, b, c, d]]
    ex = ExtractionDetector(min_queries=60, delta=0.9, ood_fraction=0.5)
    for _ in range(200):
        ex.observe("poller", polled, labels[[a, b, c, d]], np.zeros(4, bool))
    assert not ex.state("poller")["flagged"], ex.state("poller")
    # the sweep of the test above, each batch followed by a repeat of the seeds it started from
    seeds = X[rng.choice(len(X), size=20, replace=False)]
    with torch.no_grad():
        seed_labels = model(torch.from_numpy(seeds)).argmax(1).numpy()
    batch = seeds
    for _ in range(25):
        batch = np.clip(batch + np.sign(rng.standard_normal(seeds.shape)).astype(np.float32) * 0.05, 0, 1)
        with torch.no_grad():
            q_labels = model(torch.from_numpy(batch)).argmax(1).numpy()
        ex.observe("sweeper", batch, q_labels, np.zeros(20, bool))
        if ex.observe("sweeper", seeds, seed_labels, np.zeros(20, bool)):
            break
    state = ex.state("sweeper")
    assert state["flagged"] and state["flagged_at"] <= 1000, state


def _prada_by_definition(flat: np.ndarray, labels: np.ndarray) -> list[float]:
    """PRADA's distances as the paper defines them, one query at a time: the distance to the
    nearest earlier query of the same class in the class's set, which grows with queries
    farther than the mean minus one standard deviation of the distances that grew it. A repeat
    of an earlier query (distance zero) adds no distance."""
    sets: dict[int, list[np.ndarray]] = {}
    grew: dict[int, list[float]] = {}
    out = []
    for x, c in zip(flat.astype(np.float64), labels.tolist()):
        members = sets.setdefault(c, [])
        if not members:
            members.append(x)
            continue
        d = min(float(np.linalg.norm(m - x)) for m in members)
        if d > 0:
            out.append(d)
        g = grew.setdefault(c, [])
        if d > (np.mean(g) - np.std(g) if g else 0.0):
            members.append(x)
            g.append(d)
    return out


@pytest.mark.parametrize("one_product_work", [10**12, 0], ids=["one-product", "class-by-class"])
def test_prada_sees_the_same_distances_however_a_client_batches_its_queries(digits_model, monkeypatch,
                                                                            one_product_work):
    """An extraction client may send its sweep one query at a time or in batches of any size;
    the distances the normality test reads must be those of the paper's definition either way,
    so batching buys it nothing. The stream is long enough that the oldest distances are dropped."""
    import stages.monitoring.extraction as extraction

    monkeypatch.setattr(extraction, "ONE_PRODUCT_WORK", one_product_work)
    model, X, y, train, held = digits_model
    rng = np.random.default_rng(5)
    Q = X[rng.choice(len(X), size=2300)]
    Q[1000:1300] = np.clip(Q[1000:1300] + rng.normal(0, 0.02, Q[1000:1300].shape), 0, 1)   # near-duplicates too
    with torch.no_grad():
        labels = model(torch.from_numpy(Q)).argmax(1).numpy()
    expected = np.sort(_prada_by_definition(Q.reshape(len(Q), -1), labels)[-extraction.MAX_DISTANCES:])
    states = []
    for sizes in ([1], [32], [7, 1, 50, 3]):
        ex = ExtractionDetector(min_queries=60, delta=0.0, ood_fraction=1.0)    # never flags: the whole stream counts
        start, k = 0, 0
        while start < len(Q):
            n = sizes[k % len(sizes)]
            ex.observe("c", Q[start:start + n], labels[start:start + n], np.zeros(len(Q[start:start + n]), bool))
            start, k = start + n, k + 1
        seen = np.sort(ex._streams["c"].distances.values())
        assert seen == pytest.approx(expected, abs=1e-5), sizes
        states.append({c: m.n for c, m in ex._streams["c"].sets.items()})
    assert states[0] == states[1] == states[2]


def test_shapiro_w_is_scipys_statistic():
    from scipy.stats import shapiro

    rng = np.random.default_rng(3)
    for n in [*range(3, 70), 500, 1999, 2000]:
        for x in (rng.random(n), rng.standard_normal(n), rng.exponential(size=n), np.round(rng.random(n), 1) + 5):
            assert shapiro_w(x) == pytest.approx(float(shapiro(x).statistic), abs=1e-8), n
    assert shapiro_w(np.full(100, 2.0)) == 1.0 and shapiro_w(np.array([1.0, 2.0])) == 1.0


# -- drift and alert rules --------------------------------------------------------------
def test_drift_flags_a_shifted_window_and_not_a_fresh_sample_of_the_same_data():
    from stages.data.expectations.statistics import dataset_statistics
    from stages.data.io import load_source

    d = load_source("sklearn:digits")
    order = np.random.default_rng(0).permutation(len(d.y))        # a random split, as screening makes
    X, y = d.X.reshape(len(d.X), -1).astype(np.float32)[order], d.y[order]
    ref, rest = X[:1200], X[1200:]
    stats = dataset_statistics(ref, y[:1200])
    same = drift_test(rest[:400], reference_sample=ref, statistics=stats, p_value=0.01, max_mean_z=6.0)
    assert not same.drifted, same
    brighter = np.clip(rest[:400] * 0.7 + 0.25, 0, 1)
    moved = drift_test(brighter, reference_sample=ref, statistics=stats, p_value=0.01, max_mean_z=6.0)
    assert moved.drifted and moved.mean_z_features > 10 and moved.drifted_features > 10
    monitor = DriftMonitor(reference_sample=ref, statistics=stats, window=100, every=50, p_value=0.01, max_mean_z=6.0)
    assert monitor.add(rest[:60]) is None
    window = monitor.add(brighter[:50])
    assert window is not None and window.shape == (100, 64) and monitor.evaluate(window).drifted


def test_rate_rules_raise_once_per_cooldown():
    rules = RateRules(window=20, low_confidence=0.6, max_low_confidence_rate=0.25, max_detector_rate=0.15, cooldown_s=60)
    assert rules.observe([0.9] * 20, [False] * 20) == []
    alerts = rules.observe([0.3] * 10, [True] * 10)
    assert sorted(a.kind for a in alerts) == ["evasion", "low_confidence"]
    assert rules.observe([0.3] * 10, [True] * 10) == []          # within the cooldown


def test_diagnosis_tells_an_attack_from_drift():
    def rows(n, client, flagged, conf=0.9, extraction=False):
        return [{"client": client, "flagged": flagged, "confidence": conf, "extraction_flagged": extraction}] * n

    attack = diagnose(rows(100, "a", False) + rows(60, "eve", True), [], max_detector_rate=0.15, low_confidence=0.6)
    assert attack["verdict"] == "attack" and attack["evidence"]["flagged_by_top_client"]["client"] == "eve"
    drift = diagnose(rows(50, "a", False, 0.4) + rows(50, "b", False, 0.4) + rows(3, "c", True), [{"kind": "drift"}],
                     max_detector_rate=0.15, low_confidence=0.6)
    assert drift["verdict"] == "drift"
    assert diagnose([], [], max_detector_rate=0.15, low_confidence=0.6)["verdict"] == "inconclusive"
