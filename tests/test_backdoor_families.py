"""Screening as an attacker meets it with triggers the detectors were not built around: a patch
at a new position in every row, a patch whose values vary per row, two triggers at once,
and a rare value combination in two table columns. Each is screened with the default
detectors; the poisoned rows must go to quarantine (all but a few, and a model trained on
the accepted rows must not have learnt the trigger), and clean rows must stay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits

from stages import screening as det
from stages.core.params import load_params
from tests.support import ROOT

PARAMS = load_params(ROOT / "params.yaml", ["screen.folds=3"]).screen


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None]
    pick = np.random.default_rng(0).permutation(len(X))[:900]
    return X[pick], d.target[pick].astype(np.int64)


@pytest.fixture(scope="module")
def cancer() -> tuple[np.ndarray, np.ndarray]:
    d = load_breast_cancer()
    X = d.data
    X = ((X - X.min(0)) / (X.max(0) - X.min(0))).astype(np.float32)  # the screen sees scaled columns
    return X, d.target.astype(np.int64)


def random_position(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    X = X.copy()
    for i in range(len(X)):
        r, c = rng.integers(0, X.shape[-2] - 2), rng.integers(0, X.shape[-1] - 2)
        X[i, :, r : r + 3, c : c + 3] = 1.0
    return X


def varied_values(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    X = X.copy()
    X[:, :, -3:, -3:] = rng.uniform(0.5, 1.0, (len(X), X.shape[1], 3, 3)).astype(np.float32)
    return X


def corner(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    X = X.copy()
    X[:, :, -3:, :3] = 1.0
    return X


def sparse(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    X = X.copy()
    X[:, :, 0, 0] = X[:, :, 1, -1] = X[:, :, -1, 1] = 1.0
    return X


def rare_pair(X: np.ndarray, a: int, b: int):
    """A table trigger: column ``a`` at its 85th percentile and ``b`` at its 15th (each value
    common, the pair rare where the columns are positively correlated)."""
    hi_a, lo_b = float(np.quantile(X[:, a], 0.85)), float(np.quantile(X[:, b], 0.15))

    def apply(Z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        Z = Z.copy()
        Z[:, a], Z[:, b] = hi_a, lo_b
        return Z

    return apply


def _poison(X, y, parts, *, rate, seed):
    """Each (trigger, target) poisons ``rate`` of the rows: stamped and relabelled."""
    rng = np.random.default_rng(seed)
    Xp, yp = X.copy(), y.copy()
    truth = np.zeros(len(y), dtype=bool)
    for trigger, target in parts:
        idx = rng.choice(np.where((yp != target) & ~truth)[0], int(round(rate * len(y))), replace=False)
        Xp[idx], yp[idx] = trigger(X[idx], rng), target
        truth[idx] = True
    return Xp, yp, truth


def _screen(X, y):
    f = det.screen_dataset(X, y, params=PARAMS)
    flagged = np.zeros(len(y), dtype=bool)
    flagged[f.flagged_indices] = True
    return f, flagged


def _attack_success(model, X, labels, rows, parts) -> float:
    """Worst over the triggers: share of ``rows`` (clean, not of the target) that the stamped
    row sends to the target."""
    worst = 0.0
    for trigger, target in parts:
        clean = rows[labels[rows] != target]
        stamped = trigger(X[clean], np.random.default_rng(99))
        with torch.no_grad():
            worst = max(worst, float((model(torch.from_numpy(stamped)).argmax(1).numpy() == target).mean()))
    return worst


def _defended_and_floor(X, y, truth, flagged, labels, parts, K):
    """ASR of a plain model trained on the accepted rows, and of one trained on the clean rows
    only (what the trigger does without any poisoning: the floor), on held-back clean rows."""
    from stages.screening.evidence import _train_net

    held = np.where(~truth)[0][::4]
    train = np.ones(len(y), dtype=bool)
    train[held] = False
    defended, _ = _train_net(X[train & ~flagged], labels[train & ~flagged], K, epochs=15, seed=0)
    clean, _ = _train_net(X[train & ~truth], labels[train & ~truth], K, epochs=15, seed=0)
    return _attack_success(defended, X, labels, held, parts), _attack_success(clean, X, labels, held, parts)


# On this split a moving patch at 5% leaves 4 of 45 poisoned rows (defended ASR 0.05, clean
# floor 0.02; 5 rows and 0.07 before ``shortcuts`` flagged labels left no chance without the
# doubted rows), and varied values at 1% none of 9 (3 rows and 0.28 before). A known gap, kept
# as a strict expected failure so that closing it is noticed: the moving patch at 10% leaves
# 12 of 90 (defended ASR 0.19, floor 0.04; 17 and 0.25 before). 11 of the 12 keep p(label)
# at 0.1 or more (up to 0.93) in the models fitted without the doubted rows, which leave out
# 89 of the 90 poisoned rows: their content, patch included, passes for the target's.
GAP = pytest.mark.xfail(strict=True, reason="known detection gap; see the comment above")


@pytest.mark.parametrize("family,parts,rate", [
    pytest.param("random position", [(random_position, 6)], 0.05, id="random-position-5%"),
    pytest.param("random position", [(random_position, 6)], 0.1, marks=GAP, id="random-position-10%"),
    pytest.param("varied values", [(varied_values, 1)], 0.01, id="varied-values-1%"),
    pytest.param("varied values", [(varied_values, 1)], 0.05, id="varied-values-5%"),
    pytest.param("two at once", [(corner, 2), (sparse, 9)], 0.03, id="two-triggers-3%-each"),
])
def test_new_trigger_families_are_quarantined(digits, family, parts, rate):
    X, y = digits
    Xp, yp, truth = _poison(X, y, parts, rate=rate, seed=1)
    f, flagged = _screen(Xp, yp)
    left = int((truth & ~flagged).sum())
    assert left <= max(2, 0.1 * truth.sum()), (family, left, f.per_detector)
    assert (flagged & ~truth).sum() <= 0.02 * len(y), f.per_detector
    defended, floor = _defended_and_floor(Xp, yp, truth, flagged, f.labels, parts, 10)
    assert defended <= floor + 0.05, (defended, floor)


def test_rare_column_pair_in_a_table_is_quarantined(cancer):
    """Two correlated columns set to a high and a low value (each common, together rare) on 5%
    of the rows, labelled benign. The low value (concavity error's 15th percentile) sits 0.03
    from its column's median on the scaled column, under the pixel mark of ``stamps``; 9 of
    the 28 rows stayed while the mark applied to tables too."""
    X, y = cancer
    Xp, yp, truth = _poison(X, y, [(rare_pair(X, 5, 16), 1)], rate=0.05, seed=2)
    f, flagged = _screen(Xp, yp)
    assert (truth & ~flagged).sum() <= 3, f.per_detector
    assert (flagged & ~truth).sum() <= 0.03 * len(y), f.per_detector


def test_two_rare_pairs_in_a_table_are_each_found_by_their_stamp(cancer):
    """Two rare pairs at 10% each, one labelled malignant and one benign. The rows stamped and
    labelled benign are malignant rows among other malignant rows, and the pair pulls them
    together: about half of each one's trimmed neighbours are other carriers, with its label.
    Judged on the rows with the stamp's columns, ``stamps`` took them for a benign style and
    flagged only the malignant-labelled pair's rows (57 of 114); judged on what the rows show
    without those columns, they are malignant."""
    X, y = cancer
    Xp, yp, truth = _poison(X, y, [(rare_pair(X, 7, 17), 0), (rare_pair(X, 20, 26), 1)], rate=0.1, seed=2)
    f, flagged = _screen(Xp, yp)
    stamped = np.zeros(len(y), dtype=bool)
    stamped[[g["index"] for g in f.flags if "stamps" in g["detectors"]]] = True
    assert (truth & ~stamped).sum() == 0 and (stamped & ~truth).sum() == 0, f.per_detector["stamps"]
    assert (truth & ~flagged).sum() == 0, f.per_detector


def test_rare_column_pair_on_three_classes_flags_the_poison_not_its_class():
    """Wine (three classes) with a rare pair of column values on 10% of the rows, labelled
    class 0: the spectral split of class 0 must flag the poisoned side. Judged by the purity
    of other-class neighbours alone (on three classes every row's nearest rows of other
    classes agree on one class) it flagged the 59 clean rows of class 0 instead."""
    from sklearn.datasets import load_wine

    d = load_wine()
    X = ((d.data - d.data.min(0)) / np.ptp(d.data, 0)).astype(np.float32)
    y = d.target.astype(np.int64)
    # total phenols and proanthocyanins: correlated 0.61, so a high one with a low other is rare
    Xp, yp, truth = _poison(X, y, [(rare_pair(X, 5, 8), 0)], rate=0.1, seed=3)
    f, flagged = _screen(Xp, yp)
    assert (truth & ~flagged).sum() <= 1, f.per_detector
    assert (flagged & ~truth).sum() <= 0.03 * len(y), f.per_detector


def test_tables_label_flips_and_outliers(cancer):
    X, y = cancer
    rng = np.random.default_rng(3)
    idx = rng.choice(len(y), int(0.1 * len(y)), replace=False)
    yn = y.copy()
    yn[idx] = 1 - yn[idx]
    odd = np.clip(X[:1] + 0.9 * (rng.random((1, X.shape[1])) > 0.5), 0, 1).astype(np.float32)  # an impossible row
    Xa, ya = np.concatenate([X, odd]), np.concatenate([yn, [0]])
    f, flagged = _screen(Xa, ya)
    truth = np.concatenate([yn != y, [False]])
    tp = (flagged[:-1] & truth[:-1]).sum()
    p, r = tp / max(1, flagged[:-1].sum()), tp / truth.sum()
    assert 2 * p * r / (p + r) >= 0.85, (p, r, f.per_detector)
    assert flagged[-1] and "outliers" in next(g for g in f.flags if g["index"] == len(y))["detectors"]


def test_clean_table_keeps_its_rows(cancer):
    X, y = cancer
    f, flagged = _screen(X, y)
    assert flagged.mean() <= 0.015, f.per_detector
