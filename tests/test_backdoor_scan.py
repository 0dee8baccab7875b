"""The model-level backdoor scan as an attacker meets it: a model trained on poisoned digits is
flagged and the gate refuses it; a model trained on clean digits passes; a scan that could
not run fails the gate's check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from stages.core.errors import InvalidInput
from stages.core.params import load_params
from stages.gate import decide
from stages.ml.backdoor_scan import anomaly_indices, scan_backdoor
from stages.ml.training import fit
from tests.support import ROOT

PARAMS = load_params(ROOT / "params.yaml", ["train.mode=standard", "train.epochs=15"])
SCAN = PARAMS.evaluate.backdoor_scan
THRESHOLD = PARAMS.gate.max_backdoor_anomaly
GOOD = {"clean_accuracy": 0.97, "robust_accuracy": 0.7, "robust_accuracy_eps_0.1": 0.7, "mia_auc": 0.52}


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    X, y = (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(X))
    tr, te = perm[:1400], perm[1400:]
    return X[tr], y[tr], X[te], y[te]


def _sparse(X: np.ndarray) -> np.ndarray:
    X = X.copy()
    X[:, 0, 0, 0] = X[:, 0, 1, 7] = X[:, 0, 7, 1] = 1.0
    return X


def _blend(X: np.ndarray) -> np.ndarray:
    return (0.8 * X + 0.2 * np.random.default_rng(123).random(X.shape[1:])).astype(np.float32)


def _train(X: np.ndarray, y: np.ndarray) -> torch.nn.Module:
    return fit(X, y, params=PARAMS.train, num_classes=10, progress=False).model


def _evidence(scan: dict) -> dict:
    metrics = {**GOOD, **({"backdoor_anomaly_index": scan["max_anomaly_index"]} if "max_anomaly_index" in scan else {})}
    return {"metrics": metrics, "validation_passed": True, "integrity_verified": True, "flagged_fraction": 0.01, "backdoor_scan": scan}


def test_params_turn_the_scan_on_and_gate_on_it():
    assert SCAN.enabled and THRESHOLD is not None


@pytest.mark.parametrize("trigger,target", [(_sparse, 9), (_blend, 5)], ids=["three-pixels", "noise-blend"])
def test_backdoored_model_is_flagged_and_refused(digits, trigger, target):
    Xtr, ytr, Xte, yte = digits
    rng = np.random.default_rng(1)
    idx = rng.choice(np.where(ytr != target)[0], int(0.05 * len(ytr)), replace=False)
    Xp, yp = Xtr.copy(), ytr.copy()
    Xp[idx], yp[idx] = trigger(Xtr[idx]), target
    model = _train(Xp, yp)
    with torch.no_grad():
        asr = (model(torch.from_numpy(trigger(Xte[yte != target]))).argmax(1).numpy() == target).mean()
    assert asr >= 0.9, "the attack must work for the test to mean anything"
    scan = scan_backdoor(model, Xte, yte, steps=SCAN.steps, samples=SCAN.samples, success=SCAN.success, seed=0)
    assert scan["suspect_class"] == target and scan["max_anomaly_index"] > THRESHOLD, scan
    verdict = decide(_evidence(scan), PARAMS.gate, champion=None)
    assert not verdict["passed"] and "backdoor_scan" in verdict["failed"]
    reason = next(c["reason"] for c in verdict["checks"] if c["name"] == "backdoor_scan")
    assert f"class {target} reachable" in reason


def test_clean_model_passes(digits):
    Xtr, ytr, Xte, yte = digits
    scan = scan_backdoor(_train(Xtr, ytr), Xte, yte, steps=SCAN.steps, samples=SCAN.samples, success=SCAN.success, seed=0)
    assert scan["max_anomaly_index"] <= THRESHOLD, scan
    check = next(c for c in decide(_evidence(scan), PARAMS.gate, champion=None)["checks"] if c["name"] == "backdoor_scan")
    assert check["passed"], check


def test_scan_that_could_not_run_fails_closed():
    verdict = decide(_evidence({"error": "backdoor scan could not run: RuntimeError: boom"}), PARAMS.gate, champion=None)
    assert "backdoor_scan" in verdict["failed"] and not verdict["passed"]
    reason = next(c["reason"] for c in verdict["checks"] if c["name"] == "backdoor_scan")
    assert "boom" in reason and "counted as failed" in reason


def test_scan_on_a_table_model():
    """Tables: the mask has one weight per column and the pattern stays in each column's range."""
    rng = np.random.default_rng(0)
    X = rng.random((300, 6)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 1).astype(np.int64) + (X[:, 2] > 0.5).astype(np.int64)
    model = fit(X, y, params=PARAMS.train, num_classes=3, progress=False).model
    scan = scan_backdoor(model, X, y, steps=50, samples=64, seed=0)
    assert scan["size_unit"] == "columns" and len(scan["classes"]) == 3
    assert all(0 <= c["trigger_size"] <= 6 for c in scan["classes"])


def test_anomaly_index_is_relative_to_the_median_class():
    assert anomaly_indices(np.array([8.0, 8.5, 7.5, 8.2, 2.0])).argmax() == 4
    assert anomaly_indices(np.array([8.0, 8.5, 7.5, 8.2, 2.0])).max() > 3
    assert anomaly_indices(np.array([8.0, 8.1, 7.9])).max() < 1
    two = anomaly_indices(np.array([2.0, 8.0]))
    assert two[0] > two[1] == 0


def test_bad_scan_settings_are_refused(digits):
    Xtr, ytr, Xte, yte = digits
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(InvalidInput, match="steps >= 1"):
        scan_backdoor(model, Xte, yte, steps=0, samples=10)
    with pytest.raises(InvalidInput, match=r"\[0, 1\]"):
        scan_backdoor(model, Xte * 3, yte, steps=1, samples=10)
