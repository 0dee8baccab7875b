"""The gate fails closed: no thresholds, a missing input or a regression each reject."""

from __future__ import annotations

from stages.gate import decide
from stages.core.params import GateParams, RegressionTolerance

GOOD = {"metrics": {"clean_accuracy": 0.97, "robust_accuracy": 0.7, "robust_accuracy_eps_0.1": 0.7, "mia_auc": 0.52},
        "validation_passed": True, "integrity_verified": True, "flagged_fraction": 0.02}


def policy(**kw):
    base = dict(min_clean_accuracy=0.9, min_robust_accuracy={0.1: 0.5}, max_mia_auc=0.6, max_flagged_fraction=0.1,
                no_regression=RegressionTolerance(clean_accuracy=0.02, robust_accuracy=0.05))
    base.update(kw)
    return GateParams(**base)


def test_good_model_passes():
    verdict = decide(GOOD, policy(), champion=None)
    assert verdict["passed"], verdict


def test_no_thresholds_rejects():
    verdict = decide(GOOD, GateParams(), champion=None)
    assert not verdict["passed"] and "policy" in verdict["failed"]


def test_missing_metric_fails_the_check():
    evidence = {**GOOD, "metrics": {"clean_accuracy": 0.97}}
    verdict = decide(evidence, policy(), champion=None)
    assert not verdict["passed"] and "robust_accuracy@0.1" in verdict["failed"] and "mia_auc" in verdict["failed"]


def test_dp_epsilon_required_when_policy_says_so():
    verdict = decide(GOOD, policy(max_dp_epsilon=3.0), champion=None)
    assert "dp_epsilon" in verdict["failed"]
    ok = decide({**GOOD, "metrics": {**GOOD["metrics"], "dp_epsilon": 2.9}}, policy(max_dp_epsilon=3.0), champion=None)
    assert ok["passed"]


def test_threshold_raised_rejects():
    assert not decide(GOOD, policy(min_clean_accuracy=0.99), champion=None)["passed"]


def test_regression_against_champion_rejects():
    champion = {"version": "3", "metrics": {"clean_accuracy": 0.995, "robust_accuracy": 0.8}}
    verdict = decide(GOOD, policy(), champion=champion)
    assert not verdict["passed"] and "no_regression.clean_accuracy" in verdict["failed"]
    assert "no_regression.robust_accuracy" in verdict["failed"]


def test_validation_or_integrity_not_verified_rejects():
    assert not decide({**GOOD, "validation_passed": False}, policy(), champion=None)["passed"]
    assert not decide({**GOOD, "integrity_verified": None}, policy(), champion=None)["passed"]


def test_unscreened_accuracy_and_held_out_drop_are_gated():
    """Screening cannot lift the gated figure by leaving out the held-out rows a model gets wrong."""
    strict = policy(min_clean_accuracy_all_test=0.9, max_test_flagged_fraction=0.1)
    good = {**GOOD, "metrics": {**GOOD["metrics"], "clean_accuracy_all_test": 0.95, "test_flagged_fraction": 0.03}}
    assert decide(good, strict, champion=None)["passed"]
    lifted = {**GOOD, "metrics": {**GOOD["metrics"], "clean_accuracy": 0.98, "clean_accuracy_all_test": 0.868,
                                  "test_flagged_fraction": 0.12}}
    verdict = decide(lifted, strict, champion=None)
    assert set(verdict["failed"]) == {"clean_accuracy_all_test", "test_flagged_fraction"}
    missing = decide(GOOD, strict, champion=None)  # figures absent: the checks cannot run, so they fail
    assert {"clean_accuracy_all_test", "test_flagged_fraction"} <= set(missing["failed"])


def test_a_revoked_champion_is_not_compared_against():
    verdict = decide(GOOD, policy(), champion={"version": "3", "revoked": True, "metrics": None})
    assert verdict["passed"] and "revoked" in next(c for c in verdict["checks"] if c["name"] == "no_regression")["reason"]
