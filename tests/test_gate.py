"""The gate fails closed: no thresholds, a missing input or a regression each reject."""

from __future__ import annotations

import pytest

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


def _robust(verdict):
    return next(c for c in verdict["checks"] if c["name"] == "robust_accuracy@0.1")


def test_a_robust_figure_measured_on_a_sample_must_clear_the_threshold_with_confidence():
    """An attacker who controls how many rows are attacked (evaluate.attack_rows) cannot pass a
    model on a lucky small sample: the gate judges the sample's lower confidence bound."""
    from scipy.stats import binom

    sampled = {**GOOD, "metrics": {**GOOD["metrics"], "robust_accuracy_eps_0.1": 0.55, "attacked_rows": 40.0},
               "evaluated_rows": 10_000}
    verdict = decide(sampled, policy(), champion=None)
    check = _robust(verdict)
    assert not verdict["passed"] and check["value"] < 0.5 and "sample of 40 of 10000" in check["reason"]
    # the bound is Clopper-Pearson's: at it, 22 or more robust rows of 40 have probability 0.05
    assert binom.sf(22 - 1, 40, check["value"]) == pytest.approx(0.05, abs=1e-6)
    # the same figure on every evaluated row is the figure itself; on a large sample, its bound
    assert decide({**sampled, "evaluated_rows": 40}, policy(), champion=None)["passed"]
    big = {**sampled, "metrics": {**sampled["metrics"], "attacked_rows": 4000.0}}
    assert decide(big, policy(), champion=None)["passed"]
    # an evaluation that does not say how many rows it evaluated is taken as a sample (fail closed)
    assert not decide({**sampled, "evaluated_rows": None}, policy(), champion=None)["passed"]
    # the bound is the policy's: turned off, the sample's own figure is judged
    assert decide(sampled, policy(min_sample_confidence=None), champion=None)["passed"]


def test_a_robust_figure_from_the_curve_attacks_alone_is_not_decided_on():
    """A threshold at an epsilon the evaluation attacked with the curve's cheaper attacks only
    (a policy that names an epsilon the run's settings did not) fails, however high the
    figure: FGSM and PGD alone overstate robustness."""
    cheap = {**GOOD, "metrics": {**GOOD["metrics"], "robust_accuracy_eps_0.05": 0.9}, "full_strength_epsilons": [0.1]}
    verdict = decide(cheap, policy(min_robust_accuracy={0.05: 0.5, 0.1: 0.5}), champion=None)
    checks = {c["name"]: c for c in verdict["checks"]}
    assert not verdict["passed"] and verdict["failed"] == ["robust_accuracy@0.05"]
    assert "curve_attacks only" in checks["robust_accuracy@0.05"]["reason"] and checks["robust_accuracy@0.1"]["passed"]
    assert decide({**cheap, "full_strength_epsilons": [0.05, 0.1]}, policy(min_robust_accuracy={0.05: 0.5, 0.1: 0.5}),
                  champion=None)["passed"]


def test_a_run_that_lowers_the_sample_confidence_weakens_the_policy():
    from stages.core.policy import policy_differences

    signed = {"gate": GateParams(min_sample_confidence=0.95).model_dump(mode="json"), "promotion": {}}
    for lowered in (0.5, None):
        run = {"gate": GateParams(min_sample_confidence=lowered).model_dump(mode="json"), "promotion": {}}
        assert policy_differences(signed, run) == [{"setting": "gate.min_sample_confidence", "signed": 0.95,
                                                    "effective": lowered, "weaker": True}]
