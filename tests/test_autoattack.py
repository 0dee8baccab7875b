"""APGD-CE, APGD-DLR and APGD-T: inside the ball, pure (model mode and the caller's random state kept),
stronger than the attacks the gate had before, not fooled by saturated logits, and the per-row
worst case over every attack is what evaluation reports."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn


from stages.core.errors import InvalidInput, PipelineError
from stages.ml.attacks import attack_pgd, get_attack
from stages.ml.autoattack import attack_apgd_ce, attack_apgd_dlr, attack_apgd_t
from stages.ml.robustness import evaluate_robustness


def _acc(model, X, y) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


class _Saturated(nn.Module):
    """The same classifier with logits scaled by 1e4: softmax saturates in float32, so
    cross-entropy gradients are exactly zero on confidently right rows (gradient masking)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 1e4 * self.inner(x)


def test_registered_by_name():
    assert get_attack("apgd_ce") is attack_apgd_ce and get_attack("apgd_dlr") is attack_apgd_dlr
    assert get_attack("apgd_t") is attack_apgd_t


@pytest.mark.parametrize("attack", [attack_apgd_ce, attack_apgd_dlr, attack_apgd_t])
def test_apgd_stays_in_the_ball_keeps_mode_and_random_state(trained, attack):
    model, X, y = trained
    model.train()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    try:
        adv = attack(model, X[:64], y[:64], epsilon=0.1, steps=20, seed=0)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    assert torch.equal(torch.rand(3), expected_next), "the attack moved the caller's random generator"
    assert adv.shape == X[:64].shape and not adv.requires_grad
    assert (adv - X[:64]).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())
    again = attack(model, X[:64], y[:64], epsilon=0.1, steps=20, seed=0)
    assert torch.equal(adv, again)


def test_apgd_ce_is_at_least_as_strong_as_pgd(trained):
    model, X, y = trained
    pgd = _acc(model, attack_pgd(model, X, y, epsilon=0.1, alpha=0.025, steps=10, restarts=1,
                                 generator=torch.Generator().manual_seed(0)), y)
    apgd = _acc(model, attack_apgd_ce(model, X, y, epsilon=0.1, steps=50), y)
    assert apgd <= pgd + 0.01 and apgd < _acc(model, X, y) - 0.2, (apgd, pgd)


def test_dlr_sees_through_saturated_logits_where_cross_entropy_does_not(trained):
    model, X, y = trained
    masked = _Saturated(model).eval()
    assert _acc(masked, X, y) == _acc(model, X, y)
    honest = _acc(model, attack_apgd_dlr(model, X, y, epsilon=0.1, steps=50), y)
    ce = _acc(masked, attack_apgd_ce(masked, X, y, epsilon=0.1, steps=50), y)
    pgd = _acc(masked, attack_pgd(masked, X, y, epsilon=0.1, alpha=0.025, steps=10, restarts=1,
                                  generator=torch.Generator().manual_seed(0)), y)
    dlr = _acc(masked, attack_apgd_dlr(masked, X, y, epsilon=0.1, steps=50), y)
    assert min(ce, pgd) > dlr + 0.2, (ce, pgd, dlr)  # the masked model looks robust to CE-based attacks
    assert abs(dlr - honest) <= 0.03, (dlr, honest)  # DLR's figure does not depend on the logit scale


def test_apgd_t_finds_what_the_untargeted_pair_finds_and_more(trained):
    """Targeting each runner-up class in turn is at least as strong as the untargeted DLR
    attack with the same steps, and leaves no row the untargeted pair fools standing."""
    model, X, y = trained
    dlr = attack_apgd_dlr(model, X, y, epsilon=0.1, steps=20)
    ce = attack_apgd_ce(model, X, y, epsilon=0.1, steps=20)
    targeted = attack_apgd_t(model, X, y, epsilon=0.1, steps=20)
    with torch.no_grad():
        survives = {name: (model(a).argmax(1) == y) for name, a in (("ce", ce), ("dlr", dlr), ("t", targeted))}
    assert survives["t"].float().mean() <= survives["dlr"].float().mean(), {k: float(v.float().mean()) for k, v in survives.items()}
    pair = survives["ce"] & survives["dlr"]
    assert (survives["t"] & ~pair).sum() <= 0.01 * len(y), "APGD-T leaves standing rows the untargeted pair fools"


def test_apgd_on_tabular_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    X, y = torch.rand(30, 12), torch.randint(0, 4, (30,))
    for attack in (attack_apgd_ce, attack_apgd_dlr, attack_apgd_t):
        adv = attack(model, X, y, epsilon=0.2, steps=10)
        assert adv.shape == X.shape and (adv - X).abs().max() <= 0.2 + 1e-6


def test_the_dlr_losses_refuse_too_few_classes():
    two = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(InvalidInput, match=r"apgd_dlr needs at least 3 classes \(its loss reads the top 3 logits\), got 2"):
        attack_apgd_dlr(two, torch.rand(5, 4), torch.zeros(5, dtype=torch.int64), epsilon=0.1, steps=5)
    three = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    with pytest.raises(InvalidInput, match=r"apgd_t needs at least 4 classes \(its loss reads the top 4 logits\), got 3"):
        attack_apgd_t(three, torch.rand(5, 4), torch.zeros(5, dtype=torch.int64), epsilon=0.1, steps=5)


def test_without_torchattacks_the_attack_fails_closed(trained, monkeypatch):
    model, X, y = trained
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    with pytest.raises(PipelineError, match="APGD needs torchattacks==3.5.1"):
        attack_apgd_ce(model, X[:4], y[:4], epsilon=0.1)


def test_robust_accuracy_is_the_per_row_worst_case_over_every_attack(trained):
    model, X, y = trained
    report = evaluate_robustness(model, X.numpy(), y.numpy(), epsilons=[0.05, 0.1], pgd_steps=5, restarts=1,
                                 attacks=["fgsm", "pgd", "apgd_ce", "apgd_dlr"], apgd_steps=20, batch_size=64)
    assert report.columns == ["clean"] + [f"{a}@{e}" for e in ("0.05", "0.1") for a in report.attacks]
    for i, eps in enumerate(report.epsilons):
        cols = [0] + [1 + 4 * i + j for j in range(4)]
        assert report.robust_accuracy[eps] == pytest.approx(report.correct[:, cols].all(axis=1).mean())
        assert report.robust_accuracy[eps] <= min(report.attack_accuracy[a][eps] for a in report.attacks)
    # the APGD pair finds rows that FGSM and PGD-5 miss: the worst case is lower than theirs
    fgsm_pgd = report.correct[:, [0, 5, 6]].all(axis=1).mean()
    assert report.robust_accuracy[0.1] < fgsm_pgd
    body = report.to_dict()
    assert body["n_attacked"] == 200 and body["apgd_steps"] == 20 and set(body["attack_accuracy"]) == set(report.attacks)


def test_a_seeded_sample_is_attacked_and_its_size_reported(trained):
    model, X, y = trained
    kwargs = dict(epsilons=[0.1], pgd_steps=3, restarts=1, attacks=["pgd", "apgd_ce"], apgd_steps=10, sample=50)
    a = evaluate_robustness(model, X.numpy(), y.numpy(), **kwargs)
    b = evaluate_robustness(model, X.numpy(), y.numpy(), **kwargs)
    assert a.n_attacked == 50 and a.n_samples == 200 and np.array_equal(a.attacked, b.attacked)
    assert not a.correct[~a.attacked, 1:].any()  # rows outside the sample were not attacked
    assert a.clean_accuracy == pytest.approx(a.correct[:, 0].mean())  # clean accuracy on every row
    assert a.robust_accuracy[0.1] == pytest.approx(a.correct[a.attacked].all(axis=1).mean())


@pytest.mark.parametrize("attacks", [[], ["pgd", "cw"]])
def test_unknown_attacks_are_refused(trained, attacks):
    model, X, y = trained
    with pytest.raises(InvalidInput, match="evaluate.attacks must be a non-empty list of"):
        evaluate_robustness(model, X.numpy()[:8], y.numpy()[:8], epsilons=[0.1], pgd_steps=2, restarts=1,
                            attacks=attacks)
