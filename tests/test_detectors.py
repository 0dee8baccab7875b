"""Screening cores: label flips, backdoors, annotators, registry and fail-closed behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from stages import screening as det
from stages.screening import context, evidence, neighbours
from stages.screening.backdoor import stamps
from stages.core.errors import InvalidInput, PipelineError
from stages.core.params import ScreenParams

ALL = ["label_issues", "outliers", "near_duplicates", "annotators", "spectral", "stamps", "shortcuts", "loss_isolation"]


def _params(detectors: list[str], **kw) -> ScreenParams:
    base = dict(folds=3, max_flagged_fraction=0.2, min_annotator_quality=0.6, detectors=detectors, backdoor_epochs=4, seed=0)
    base.update(kw)
    return ScreenParams(**base)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None]
    pick = np.random.default_rng(0).permutation(len(X))[:600]
    return X[pick], d.target[pick].astype(np.int64)


def _flip(y: np.ndarray, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(y), int(rate * len(y)), replace=False)
    yn = y.copy()
    yn[idx] = (yn[idx] + rng.integers(1, 10, len(idx))) % 10
    return yn, yn != y


def _f1(flagged: np.ndarray, truth: np.ndarray) -> float:
    tp = (flagged & truth).sum()
    p, r = tp / max(1, flagged.sum()), tp / max(1, truth.sum())
    return 2 * p * r / (p + r) if p + r else 0.0


def _mask(findings: det.ScreenFindings, n: int) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[findings.flagged_indices] = True
    return m


def test_label_flips_found_with_high_f1(digits):
    X, y = digits
    yn, truth = _flip(y, 0.1, seed=1)
    f = det.screen_dataset(X, yn, params=_params(["label_issues"]))
    assert _f1(_mask(f, len(y)), truth) >= 0.85
    row = f.flags[0]
    assert set(row) == {"index", "detectors", "scores", "reason"} and row["detectors"] == ["label_issues"]


@pytest.mark.parametrize("share", [0.5, 0.7])
def test_targeted_flip_of_most_of_a_class_is_undone(share):
    """Once half a class is relabelled, the out-of-sample models learn the flip and row-level
    rules flag the unflipped rows instead; the lost-class rule must find the flipped ones."""
    d = load_digits()
    X, y = (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)
    ones = np.where(y == 1)[0]
    flipped = np.random.default_rng(3).choice(ones, int(share * len(ones)), replace=False)
    yn = y.copy()
    yn[flipped] = 7
    truth = yn != y
    f = det.screen_dataset(X, yn, params=_params(["label_issues"], folds=5))
    flagged = _mask(f, len(y))
    assert flagged[truth].mean() >= 0.95 and truth[flagged].mean() >= 0.8
    assert flagged[np.setdiff1d(ones, flipped)].mean() <= 0.05, "the 1s still labelled 1 must be kept"
    lost = f.per_detector["label_issues"]["lost_classes"]
    assert [(c["class"], c["absorbed_by"]) for c in lost] == [(1, 7)]


def test_no_lost_class_on_clean_or_randomly_flipped_data(digits):
    X, y = digits
    for labels in (y, _flip(y, 0.2, seed=4)[0]):
        f = det.screen_dataset(X, labels, params=_params(["label_issues"]))
        assert f.per_detector["label_issues"]["lost_classes"] == []


def _unit_scaled(X: np.ndarray) -> np.ndarray:
    return ((X - X.min(0)) / np.ptp(X, 0)).astype(np.float32)


def test_overlapping_classes_of_a_clean_table_are_not_a_lost_class():
    """A clean table whose small class overlaps a large one has the lost-class signature (few
    confident rows, probability given to the large class), but its labels follow the content
    across the pair; read as a relabelling, the rule flagged 297 of these 1,500 rows."""
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=1500, n_features=10, n_informative=5, n_redundant=2, n_classes=3,
                               weights=[0.6, 0.3, 0.1], class_sep=1.2, flip_y=0, random_state=0)
    f = det.screen_dataset(_unit_scaled(X), y, params=_params(["label_issues"], folds=5))
    assert f.per_detector["label_issues"]["lost_classes"] == []
    assert len(f.flags) <= 0.07 * len(y)


def test_half_a_table_class_relabelled_is_a_lost_class():
    """The attacker's side on a table: half of breast cancer's benign rows relabelled
    malignant are a draw of the benign content, so the models cannot rank them below the
    benign rows left (mode AUC near 0.5): the class is lost and the relabelled rows flagged."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    y = d.target.astype(np.int64)
    benign = np.where(y == 1)[0]
    flipped = np.random.default_rng(1).choice(benign, len(benign) // 2, replace=False)
    yn = y.copy()
    yn[flipped] = 0
    f = det.screen_dataset(_unit_scaled(d.data), yn, params=_params(["label_issues"], folds=5))
    lost = f.per_detector["label_issues"]["lost_classes"]
    assert [(c["class"], c["absorbed_by"]) for c in lost] == [(1, 0)] and lost[0]["mode_auc"] < 0.65
    flagged = _mask(f, len(y))
    assert flagged[flipped].mean() >= 0.95
    assert flagged[np.setdiff1d(benign, flipped)].mean() <= 0.02, "the benign rows still labelled benign must be kept"


def test_patch_backdoor_is_flagged(digits):
    X, y = digits
    rng = np.random.default_rng(2)
    idx = rng.choice(np.where(y != 7)[0], 40, replace=False)  # 5% poisoning
    Xp, yp = X.copy(), y.copy()
    Xp[idx, :, :3, :3] = 1.0
    yp[idx] = 7
    f = det.screen_dataset(Xp, yp, params=_params(["spectral"]))
    flagged = _mask(f, len(yp))
    truth = np.zeros(len(yp), dtype=bool)
    truth[idx] = True
    assert flagged[truth].mean() == 1.0
    assert (flagged & ~truth).sum() <= 5


@pytest.mark.parametrize("corner,target", [((slice(5, 8), slice(5, 8)), 0), ((slice(5, 8), slice(0, 3)), 2)])
def test_one_percent_corner_patch_is_flagged(digits, corner, target):
    """At 1% the trigger group is too small for the spectral split; the trimmed-neighbour
    trigger-group rule must still find every poisoned row (two left suffice for a backdoor)."""
    X, y = digits
    rng = np.random.default_rng(4)
    idx = rng.choice(np.where(y != target)[0], 6, replace=False)  # 1% poisoning
    Xp, yp = X.copy(), y.copy()
    Xp[(idx, slice(None)) + corner] = 1.0
    yp[idx] = target
    f = det.screen_dataset(Xp, yp, params=_params(["spectral"]))
    flagged = _mask(f, len(yp))
    truth = np.zeros(len(yp), dtype=bool)
    truth[idx] = True
    assert flagged[truth].all(), f.per_detector["spectral"]
    assert (flagged & ~truth).sum() <= 5
    assert str(target) in f.per_detector["spectral"]["trigger_groups"]


def _padded(X: np.ndarray) -> np.ndarray:
    """Digits upsampled to 16x16 inside a blank 4-pixel border: MNIST-like background."""
    big = np.kron(X, np.ones((1, 1, 2, 2), dtype=X.dtype))
    return np.pad(big, ((0, 0), (0, 0), (4, 4), (4, 4)))


def _sparse(X: np.ndarray) -> np.ndarray:
    X = X.copy()
    X[:, 0, 0, 0] = X[:, 0, 1, 23] = X[:, 0, 23, 1] = 1.0
    return X


def _blend(X: np.ndarray) -> np.ndarray:
    pattern = np.random.default_rng(9).random(X.shape[1:]).astype(np.float32)
    return 0.8 * X + 0.2 * pattern


@pytest.mark.parametrize("trigger", [_sparse, _blend], ids=["three-pixels", "noise-blend"])
def test_background_stamp_is_flagged_at_one_percent(digits, trigger):
    """A trigger on the blank border of 1% of the rows (three stamped pixels, or a 20% noise
    blend, which puts the same faint value on every blank pixel): handwriting dominates
    every distance there, the stamp rule must still find each poisoned row."""
    X, y = digits
    X = _padded(X)
    assert stamps.detect_stamps(context.ScreenContext(X, y, params=_params(["stamps"]), num_classes=10, annotator_labels=None)).indices.size == 0
    rng = np.random.default_rng(5)
    idx = rng.choice(np.where(y != 9)[0], 6, replace=False)
    Xp, yp = X.copy(), y.copy()
    Xp[idx] = trigger(X[idx])
    yp[idx] = 9
    f = det.screen_dataset(Xp, yp, params=_params(["stamps"]))
    truth = np.zeros(len(yp), dtype=bool)
    truth[idx] = True
    flagged = _mask(f, len(yp))
    assert flagged[truth].all(), f.per_detector["stamps"]
    assert not (flagged & ~truth).any()


def test_malicious_annotator_flagged_and_excluded(digits):
    X, y = digits
    rng = np.random.default_rng(3)
    A = np.repeat(y[:, None], 5, axis=1)
    for a, noise in enumerate([0.3, 0.05, 0.05, 0.05, 0.05]):
        m = rng.random(len(y)) < noise
        A[m, a] = (A[m, a] + rng.integers(1, 10, m.sum())) % 10
    given = A[:, 1].copy()
    A[:, 2:][rng.random((len(y), 3)) < 0.1] = -1  # some rows unlabelled by some annotators
    f = det.screen_dataset(X, given, params=_params(["annotators"]), annotator_labels=A)
    flagged = {a["annotator"] for a in f.annotators if a["flagged"]}
    assert flagged == {0}
    assert (f.labels == y).mean() >= 0.98  # consensus of the trusted annotators
    assert f.per_detector["annotators"]["flagged"] > 0


def test_datalab_near_duplicates_and_outliers(digits):
    """Copies are flagged and their originals kept; a random-noise row is an outlier."""
    X, y = digits
    rng = np.random.default_rng(6)
    src = rng.choice(len(X), 5, replace=False)
    copies = X[src] + rng.normal(0, 1e-4, X[src].shape).astype(np.float32).clip(0, None)
    noise = rng.random((1,) + X.shape[1:]).astype(np.float32)
    Xa = np.clip(np.concatenate([X, copies, noise]), 0, 1)
    ya = np.concatenate([y, (y[src] + np.array([0, 0, 1, 2, 3])) % 10, [1]])
    f = det.screen_dataset(Xa, ya, params=_params(["near_duplicates", "outliers"]))
    by = {name: {g["index"] for g in f.flags if name in g["detectors"]} for name in ("near_duplicates", "outliers")}
    n = len(X)
    assert by["near_duplicates"] == set(range(n, n + 5))
    assert n + 5 in by["outliers"] and len(by["outliers"]) <= 3
    conflicting = [g["reason"] for g in f.flags if g["index"] == n + 2]
    assert "conflicting labels" in conflicting[0]
    assert {g["reason"].split(" (")[0] for g in f.flags if g["index"] in range(n, n + 5)} == {f"near copy of row {j}" for j in src}

    # screened in another order (the screen stage: training rows, then test rows), a reason
    # names the original's row in the dataset, not its position in the screen
    order = rng.permutation(len(Xa))
    f = det.screen_dataset(Xa[order], ya[order], params=_params(["near_duplicates"]), row_ids=order)
    named = {int(order[g["index"]]): g["reason"].split(" (")[0] for g in f.flags}
    assert set(named) <= set(range(n, n + 5)) | set(src.tolist())
    for copy, original in zip(range(n, n + 5), src):
        kept = min(copy, int(original), key=lambda r: int(np.flatnonzero(order == r)[0]))  # the first screened is kept
        other = copy if kept == original else int(original)
        assert named[other] == f"near copy of row {kept}"
    with pytest.raises(InvalidInput, match="row_ids"):
        det.screen_dataset(Xa, ya, params=_params(["near_duplicates"]), row_ids=order[:-1])


def test_unknown_detector_raises(digits):
    X, y = digits
    with pytest.raises(InvalidInput, match="unknown detector"):
        det.screen_dataset(X, y, params=_params(["label_issues", "no_such_check"]))


def test_failing_detector_fails_closed(digits, monkeypatch):
    X, y = digits

    def broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setitem(det.DETECTORS, "broken", broken)
    with pytest.raises(PipelineError, match="'broken' could not run"):
        det.screen_dataset(X, y, params=_params(["outliers", "broken"]))


def test_bad_input_rejected(digits):
    X, y = digits
    with pytest.raises(InvalidInput, match=r"\[0, 1\]"):
        det.screen_dataset(X * 2, y, params=_params(["outliers"]))
    with pytest.raises(InvalidInput, match="same length"):
        det.screen_dataset(X, y[:-1], params=_params(["outliers"]))


def test_clean_data_has_few_flags(digits, tmp_path):
    X, y = digits
    f = det.screen_dataset(X, y, params=_params(ALL))
    assert f.flagged_fraction < 0.05, f.per_detector
    assert set(f.per_detector) == set(ALL)
    d = f.to_dict()
    assert d["n_rows"] == len(y) and len(d["labels"]) == len(y)
    out = tmp_path / "suspects.png"
    det.plot_suspects(X, f, str(out), per_detector=4)
    assert out.stat().st_size > 0


def test_svc_is_fitted_on_a_bounded_subset(monkeypatch):
    """The RBF SVC (a table model) costs about n^1.9; above SVC_MAX_ROWS it sees a seeded
    subset and label screening still finds the flips."""
    from sklearn.datasets import load_breast_cancer

    monkeypatch.setattr(evidence, "SVC_MAX_ROWS", 200)
    rows = evidence._svc_rows(np.arange(480), seed=0)
    assert len(rows) == 200 and len(np.unique(rows)) == 200
    assert np.array_equal(rows, evidence._svc_rows(np.arange(480), seed=0))
    d = load_breast_cancer()
    X = ((d.data - d.data.min(0)) / np.ptp(d.data, 0)).astype(np.float32)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(1)
    idx = rng.choice(len(y), int(0.1 * len(y)), replace=False)
    yn = y.copy()
    yn[idx] = 1 - yn[idx]
    f = det.screen_dataset(X, yn, params=_params(["label_issues"]))
    assert _f1(_mask(f, len(y)), yn != y) >= 0.8


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_screen_device_cuda_without_gpu_is_a_clear_error(digits):
    X, y = digits
    with pytest.raises(InvalidInput, match="screen.device is 'cuda'"):
        det.screen_dataset(X, y, params=_params(["label_issues"], device="cuda"))


@pytest.fixture(scope="module")
def digits_24():
    """The digits fixture smoothly upscaled to 24x24: ink with continuous values, as in
    scanned handwriting, so that a centre patch lands on strokes."""
    from scipy.ndimage import zoom

    d = load_digits()
    pick = np.random.default_rng(0).permutation(len(d.images))[:600]
    X = np.clip(zoom(d.images[pick] / 16.0, (1, 3, 3), order=1), 0, 1).astype(np.float32)[:, None]
    return X, d.target[pick].astype(np.int64)


@pytest.mark.parametrize("rate", [0.05, 0.1])
def test_patch_stamped_on_ink_is_flagged(digits_24, rate):
    """A white 3x3 patch in the centre of 24x24 digits overwrites strokes, so the background
    rule cannot see it; the poisoned rows hold its nine pixels at exactly 1.0, which clean
    rows of the other classes rarely do."""
    X, y = digits_24
    rng = np.random.default_rng(5)
    idx = rng.choice(np.where(y != 3)[0], int(rate * len(y)), replace=False)
    Xp, yp = X.copy(), y.copy()
    Xp[idx, :, 10:13, 10:13] = 1.0
    yp[idx] = 3
    f = det.screen_dataset(Xp, yp, params=_params(["stamps"]))
    flagged = _mask(f, len(y))
    truth = np.zeros(len(y), dtype=bool)
    truth[idx] = True
    assert flagged[truth].all()
    assert (flagged & ~truth).sum() <= 0.01 * len(y)
    ink = [g for g in f.per_detector["stamps"]["stamps"] if "other classes' content" in g["stat"]]
    assert [g["class"] for g in ink] == [3]


def test_trimmed_distance_sums_the_smallest_entries_and_keeps_exact_ties():
    """The trimmed distance (the sum of the smallest squared differences) agrees with a sort,
    and two candidates whose differences all fall in the trimmed pixels stay exact ties at
    zero, as with ``np.partition``: the neighbours' order does not move with rounding."""
    rng = np.random.default_rng(0)
    values = rng.random((7, 5, 64)).astype(np.float32) ** 2
    values[0, :2] = 0.0
    values[0, :2, [3, 9]] = 0.5          # two candidates differing in two pixels only
    got = neighbours._smallest_sum(values, 54)
    np.testing.assert_allclose(got, np.sort(values, axis=-1)[..., :54].sum(-1), rtol=1e-5)
    assert got[0, 0] == got[0, 1] == 0.0 and got.shape == (7, 5)


def test_no_ink_stamp_on_clean_images(digits, digits_24):
    for X, y in (digits, digits_24):
        flat = X.reshape(len(X), -1)
        agree, _ = neighbours._trimmed_neighbours(flat, y)
        unusual = np.abs(flat - np.median(flat, axis=0)) >= stamps.STAMP_MARK
        assert stamps._ink_stamps(flat, y, agree, unusual, flat, table=False) == []


def test_no_stamp_on_clean_tables_with_discrete_columns():
    """On a table every value but a column's median counts as unusual, so columns that repeat
    values by nature (one-hot categories tied to the class, small counts, a value clipped at
    zero) are where a class's own style could pass for a stamp; on clean tables none may."""
    from sklearn.datasets import load_breast_cancer, load_iris, load_wine, make_classification

    rng = np.random.default_rng(0)
    Xg, yg = make_classification(n_samples=1200, n_features=8, n_informative=5, n_classes=3, random_state=0)
    category = np.where(rng.random(len(yg)) < 0.95, yg, rng.integers(0, 3, len(yg)))  # 95% tied to the class
    counts = rng.poisson(1.0 + yg)  # small integer counts, their rate set by the class
    clipped = np.maximum(0.0, Xg[:, 0])  # half the rows at exactly zero
    generated = np.column_stack([Xg, np.eye(3)[category], np.eye(3)[(category + 1) % 3], counts, clipped])
    # a category decides a minority class and the other columns are noise: without the stamp's
    # columns its rows' content misleads, but no more than for the rest of their class
    yd = (rng.random(1500) > 0.8).astype(np.int64)
    decided = np.where(rng.random(len(yd)) < 0.95, yd, rng.integers(0, 2, len(yd)))
    noise = np.column_stack([rng.normal(size=(len(yd), 8)), np.eye(2)[decided], np.eye(2)[1 - decided]])
    # iris beside a random three-valued column: setosa's commonest petal values pass for a stamp,
    # and with the petal columns left out its content must be judged on the sepals, not the noise
    iris = load_iris()
    site = np.column_stack([iris.data, np.eye(3)[np.random.default_rng(0).integers(0, 3, len(iris.target))]])
    for X, y in ((load_breast_cancer().data, load_breast_cancer().target), (load_wine().data, load_wine().target), (generated, yg), (noise, yd),
                 (site, iris.target)):
        X = ((X - X.min(0)) / np.ptp(X, 0)).astype(np.float32)
        f = det.screen_dataset(X, y.astype(np.int64), params=_params(["stamps"]))
        assert f.flags == [], f.per_detector["stamps"]


def test_a_fold_network_stops_at_its_sample_budget(digits):
    """``max_samples`` trains on that many rows and no more: a budget of two epochs' rows gives
    the network of two epochs, a few rows more a different one, and a budget the epochs never
    reach changes nothing (so folds below ``FOLD_MAX_SAMPLES`` train as they always did)."""
    X, y = digits

    def weights(**kw) -> list[np.ndarray]:
        model, _ = evidence._train_net(X, y, 10, seed=0, **kw)
        return [p.detach().numpy().copy() for p in model.parameters()]

    def same(a, b) -> bool:
        return all(np.array_equal(u, v) for u, v in zip(a, b))

    two = weights(epochs=2)
    assert same(weights(epochs=5, max_samples=2 * len(X)), two)
    assert not same(weights(epochs=5, max_samples=2 * len(X) + 64), two)
    assert same(weights(epochs=3, max_samples=10**9), weights(epochs=3))
    assert evidence.FOLD_MAX_SAMPLES >= 5 * 8_000  # a 10,000-row sample's folds still train 5 epochs


def test_a_categorical_column_weighs_as_one_column():
    """Two random rows differ by 2 in squared distance on average on every numeric column and
    on every categorical column's one-hot block alike, however many categories it has and
    however rare they are."""
    rng = np.random.default_rng(0)
    numeric = rng.random((400, 2))
    rare = np.eye(4)[rng.choice(4, 400, p=[0.85, 0.1, 0.04, 0.01])]
    even = np.eye(3)[rng.integers(0, 3, 400)]
    Z = evidence.table_features(np.column_stack([numeric, rare, even]).astype(np.float32), [(2, 6), (6, 9)])
    for cols in ([0], [1], [2, 3, 4, 5], [6, 7, 8]):
        part = Z[:, cols].astype(np.float64)
        pairwise = ((part[:, None, :] - part[None, :, :]) ** 2).sum(-1).sum() / (len(Z) * (len(Z) - 1))
        assert pairwise == pytest.approx(2.0 * len(Z) / (len(Z) - 1), rel=1e-4), cols
    # standardised one 0/1 column at a time, the rare category alone weighed as dozens of columns
    alone = evidence.standardised(rare.astype(np.float32)).astype(np.float64)
    assert ((alone[:, None, :] - alone[None, :, :]) ** 2).sum(-1).mean() > 5


def test_a_random_category_beside_iris_is_not_taken_for_poison():
    """Iris beside a random three-valued site code (one-hot, as the screen stage passes a
    table with a categorical column): clean rows stay clean. Weighed one 0/1 column at a
    time, the code decided whose neighbours a row had, and the screen flagged up to nine rows
    of 150 (setosa's commonest petal values taken for a stamp, boundary rows for shortcuts)."""
    from sklearn.datasets import load_iris

    from stages.core.params import load_params
    from tests.support import ROOT

    iris = load_iris()
    X = (iris.data - iris.data.min(0)) / np.ptp(iris.data, 0)
    params = load_params(ROOT / "params.yaml").screen
    flagged = {}
    for seed in range(8):
        site = np.eye(3)[np.random.default_rng(seed).integers(0, 3, len(X))]
        f = det.screen_dataset(np.column_stack([X, site]).astype(np.float32), iris.target, params=params,
                               categorical=[(4, 7)])
        # iris holds an exact duplicate (rows 101 and 142), found when they share the site
        flagged[seed] = {d: n["flagged"] for d, n in f.per_detector.items() if n["flagged"] and d != "near_duplicates"}
    assert not any(flagged.values()), flagged


def test_categorical_blocks_are_checked_and_follow_the_preprocessing():
    from stages.data.preprocessing import categorical_blocks

    spec = {"kind": "table", "columns": [{"name": "a", "type": "numeric"}, {"name": "b", "type": "categorical", "categories": ["x", "y", "z"]},
                                         {"name": "c", "type": "numeric"}, {"name": "d", "type": "categorical", "categories": ["p", "q"]}]}
    assert categorical_blocks(spec) == [(1, 4), (5, 7)]
    assert categorical_blocks({"kind": "image"}) == []
    X = np.zeros((30, 7), dtype=np.float32)
    assert context.check_categorical([(1, 4), (5, 7)], X) == [(1, 4), (5, 7)]
    for bad in ([(1, 4), (3, 6)], [(5, 8)], [(2, 2)]):
        with pytest.raises(InvalidInput, match="categorical blocks"):
            context.check_categorical(bad, X)
    with pytest.raises(InvalidInput, match="for tables"):
        context.check_categorical([(0, 2)], np.zeros((30, 1, 4, 4), dtype=np.float32))
