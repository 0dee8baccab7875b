"""evaluate_robustness, the membership-inference audit and the robustness curve."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from stages.core.errors import InvalidInput
from stages.core.params import TrainParams
from stages.ml.privacy import membership_inference_audit
from stages.ml.robustness import RobustnessReport, evaluate_robustness, plot_robustness_curve
from stages.ml.training import fit


def _params(**overrides) -> TrainParams:
    raw = {"mode": "standard", "epochs": 8, "batch_size": 64, "lr": 0.005, "device": "cpu", "seed": 0,
           "adversarial": {"epsilon": 0.1}, "dp": {}, **overrides}
    return TrainParams.model_validate(raw)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(X))
    return X[order], y[order]


@pytest.fixture(scope="module")
def model(digits):
    X, y = digits
    return fit(X[:900], y[:900], params=_params(weight_decay=5e-4), num_classes=10, progress=False).model


@pytest.fixture(scope="module")
def report(model, digits) -> RobustnessReport:
    X, y = digits
    return evaluate_robustness(model, X[1200:1400], y[1200:1400], epsilons=[0.05, 0.1], pgd_steps=10, restarts=2,
                               batch_size=64, seed=0)


def test_report_columns_matrix_and_accuracies_agree(report):
    assert report.columns == ["clean", "fgsm@0.05", "pgd@0.05", "fgsm@0.1", "pgd@0.1"]
    assert report.correct.shape == (200, 5) and report.correct.dtype == bool
    assert report.clean_accuracy == pytest.approx(report.correct[:, 0].mean()) and report.clean_accuracy > 0.9
    for i, eps in enumerate(report.epsilons):
        assert report.fgsm_accuracy[eps] == pytest.approx(report.correct[:, 1 + 2 * i].mean())
        assert report.pgd_accuracy[eps] <= report.fgsm_accuracy[eps] < report.clean_accuracy
        assert report.robust_accuracy[eps] <= min(report.pgd_accuracy[eps], report.fgsm_accuracy[eps])
    assert report.pgd_accuracy[0.1] < report.pgd_accuracy[0.05]


def test_to_dict_is_json_with_string_epsilon_keys(report):
    body = json.loads(json.dumps(report.to_dict()))
    assert set(body["pgd_accuracy"]) == {"0.05", "0.1"} and body["n_samples"] == 200
    assert body["fgsm_accuracy"]["0.1"] == pytest.approx(report.fgsm_accuracy[0.1])


def test_evaluation_is_reproducible_for_a_seed(model, digits, report):
    X, y = digits
    again = evaluate_robustness(model, X[1200:1400], y[1200:1400], epsilons=[0.05, 0.1], pgd_steps=10, restarts=2,
                                batch_size=64, seed=0)
    assert np.array_equal(again.correct, report.correct)


@pytest.mark.parametrize("epsilons", [[], [0.0], [1.5]])
def test_bad_epsilons_are_refused(model, digits, epsilons):
    X, y = digits
    with pytest.raises(InvalidInput, match="epsilons must be"):
        evaluate_robustness(model, X[:8], y[:8], epsilons=epsilons, pgd_steps=2, restarts=1)


def test_plot_writes_a_png(report, tmp_path):
    path = plot_robustness_curve(report, tmp_path / "sub" / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mia_sees_nothing_between_two_halves_of_unseen_data(model, digits):
    X, y = digits
    audit = membership_inference_audit(model, X[1200:1500], y[1200:1500], X[1500:], y[1500:], seed=0)
    assert audit["n_members"] == audit["n_nonmembers"] == 297
    assert set(audit["attacks"]) == {"loss", "class_calibrated"}
    for attack in audit["attacks"].values():
        assert abs(attack["auc"] - 0.5) < 0.1, audit
    assert audit["auc"] == max(a["auc"] for a in audit["attacks"].values())


def test_mia_detects_an_overfit_model(digits):
    X, y = digits
    overfit = fit(X[:120], y[:120], params=_params(epochs=40, batch_size=16), num_classes=10, progress=False).model
    audit = membership_inference_audit(overfit, X[:120], y[:120], X[1000:1400], y[1000:1400], seed=0)
    assert audit["n_members"] == audit["n_nonmembers"] == 120
    assert audit["member_loss_mean"] < audit["nonmember_loss_mean"]
    assert audit["auc"] > 0.65 and 0 <= audit["tpr_at_1pct_fpr"] <= 1, audit


def test_mia_refuses_too_few_samples(model, digits):
    X, y = digits
    with pytest.raises(InvalidInput, match="need at least 2 members and 2 non-members, got 1 and 50"):
        membership_inference_audit(model, X[:1], y[:1], X[:50], y[:50])


def _counting(monkeypatch):
    """Wrap the registered attacks to record how many rows each call attacks."""
    from stages.ml import robustness

    seen = []
    for name, attack in list(robustness.EVAL_ATTACKS.items()):
        def counted(m, X, y, eps, b, g, _name=name, _attack=attack):
            seen.append((_name, eps, len(X)))
            return _attack(m, X, y, eps, b, g)
        monkeypatch.setitem(robustness.EVAL_ATTACKS, name, counted)
    return seen


def test_early_exit_attacks_only_rows_still_standing_and_keeps_the_worst_case(model, digits, monkeypatch):
    """FGSM is deterministic: with early exit a row's worst case at each epsilon is exactly the
    one of every attack on every row, with the smaller epsilons' findings carried up; only the
    rows still standing are attacked."""
    X, y = digits
    X, y = X[1200:1400], y[1200:1400]
    seen = _counting(monkeypatch)
    kwargs = dict(epsilons=[0.1, 0.05], pgd_steps=2, restarts=1, attacks=["fgsm"], batch_size=64)
    full = evaluate_robustness(model, X, y, early_exit=False, **kwargs)
    attacked_full = sum(n for *_, n in seen)
    seen.clear()
    early = evaluate_robustness(model, X, y, early_exit=True, **kwargs)
    clean = full.correct[:, 0]
    small = clean & full.correct[:, 2]  # right on clean input and under FGSM at 0.05
    assert np.array_equal(early.correct[:, 2], small)
    assert np.array_equal(early.correct[:, 1], small & full.correct[:, 1])  # fooled at 0.05: fooled at 0.1
    assert early.robust_accuracy[0.05] == pytest.approx(full.robust_accuracy[0.05])
    assert early.robust_accuracy[0.1] == pytest.approx(small[full.correct[:, 1]].sum() / len(y))
    # attacked: the rows right on clean input at 0.05 (smallest first), then those FGSM did not fool
    assert [(e, sum(n for _, eps, n in seen if eps == e)) for e in (0.05, 0.1)] == [(0.05, clean.sum()), (0.1, small.sum())]
    assert sum(n for *_, n in seen) < attacked_full
    body = early.to_dict()
    assert body["attack_accuracy_is"].startswith("cumulative") and "each attack alone" in full.to_dict()["attack_accuracy_is"]


def test_early_exit_is_as_strong_with_randomised_attacks(model, digits):
    """PGD's random starts fall differently when fewer rows are attacked, so rows may differ; the
    worst case may not be weaker than attacking every row (within the noise of a restart)."""
    X, y = digits
    early = evaluate_robustness(model, X[1200:1400], y[1200:1400], epsilons=[0.05, 0.1], pgd_steps=10, restarts=2,
                                batch_size=64, seed=0, early_exit=True)
    full = evaluate_robustness(model, X[1200:1400], y[1200:1400], epsilons=[0.05, 0.1], pgd_steps=10, restarts=2,
                               batch_size=64, seed=0, early_exit=False)
    for eps in (0.05, 0.1):
        assert early.robust_accuracy[eps] <= full.robust_accuracy[eps] + 0.02
        # a cumulative column never stands where an earlier one fell
        i = early.epsilons.index(eps)
        assert not (early.correct[:, 2 + 2 * i] & ~early.correct[:, 1 + 2 * i]).any()
    assert not (early.correct[:, 3] & ~early.correct[:, 2]).any()  # 0.1 only where 0.05 held


def test_curve_points_run_the_curve_attacks_and_the_decided_epsilon_every_attack(model, digits, monkeypatch, tmp_path):
    """Full strength where a decision rests, the cheap attacks on the rest of the curve: PGD
    never runs at 0.05, and at 0.1 every attack meets every row still standing after the
    cheap attack at 0.05, so the figure at 0.1 is the worst case over all of them."""
    X, y = digits
    X, y = X[1200:1400], y[1200:1400]
    seen = _counting(monkeypatch)
    report = evaluate_robustness(model, X, y, epsilons=[0.05, 0.1], pgd_steps=5, restarts=1, attacks=["fgsm", "pgd"],
                                 curve_attacks=["fgsm"], full_strength=[0.1], batch_size=64)
    assert {(name, eps) for name, eps, _ in seen} == {("fgsm", 0.05), ("fgsm", 0.1), ("pgd", 0.1)}
    assert report.columns == ["clean", "fgsm@0.05", "fgsm@0.1", "pgd@0.1"]
    assert report.attacks_at == {0.05: ["fgsm"], 0.1: ["fgsm", "pgd"]} and report.full_strength_epsilons == [0.1]
    assert report.robust_accuracy[0.1] == pytest.approx(report.correct.all(axis=1).mean())
    assert report.robust_accuracy[0.05] == pytest.approx(report.correct[:, :2].all(axis=1).mean())
    assert set(report.attack_accuracy["pgd"]) == {0.1} and set(report.attack_accuracy["fgsm"]) == {0.05, 0.1}
    body = json.loads(json.dumps(report.to_dict()))
    assert body["attacks_at"] == {"0.05": ["fgsm"], "0.1": ["fgsm", "pgd"]} and body["full_strength_epsilons"] == [0.1]
    assert plot_robustness_curve(report, tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    # the default: every attack at every epsilon
    assert evaluate_robustness(model, X[:64], y[:64], epsilons=[0.05, 0.1], pgd_steps=2, restarts=1,
                               attacks=["fgsm", "pgd"]).full_strength_epsilons == [0.05, 0.1]


@pytest.mark.parametrize(("curve", "full", "match"), [(["apgd_t"], [0.1], "curve_attacks must name some"),
                                                       (["fgsm"], [0.3], "no epsilon of")])
def test_curve_settings_that_leave_nothing_to_run_are_refused(model, digits, curve, full, match):
    X, y = digits
    with pytest.raises(InvalidInput, match=match):
        evaluate_robustness(model, X[:8], y[:8], epsilons=[0.05, 0.1], pgd_steps=2, restarts=1, attacks=["fgsm", "pgd"],
                            curve_attacks=curve, full_strength=full)
