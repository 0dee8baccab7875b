"""Attacks stay inside the epsilon ball and [0, 1], leave the model as they found it, and
PGD with restarts is at least as strong as FGSM."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.ml.attacks import ATTACKS, attack_fgsm, attack_pgd, get_attack
from stages.core.errors import InvalidInput


def _accuracy(model, X, y) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


@settings(max_examples=12, deadline=None)
@given(epsilon=st.floats(0.0, 0.5), steps=st.integers(1, 4), restarts=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_attacks_stay_in_the_epsilon_ball_and_the_unit_box(trained, epsilon, steps, restarts, seed):
    model, X, y = trained
    X, y = X[:32], y[:32]
    generator = torch.Generator().manual_seed(seed)
    for adv in (attack_fgsm(model, X, y, epsilon=epsilon),
                attack_pgd(model, X, y, epsilon=epsilon, alpha=epsilon / 2 + 1e-3, steps=steps, restarts=restarts,
                           generator=generator)):
        assert adv.shape == X.shape and adv.dtype == X.dtype and not adv.requires_grad
        assert (adv - X).abs().max() <= epsilon + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1


def test_pgd_is_at_least_as_strong_as_fgsm_and_both_beat_clean(trained):
    model, X, y = trained
    clean = _accuracy(model, X, y)
    fgsm = _accuracy(model, attack_fgsm(model, X, y, epsilon=0.1), y)
    pgd = _accuracy(model, attack_pgd(model, X, y, epsilon=0.1, alpha=0.025, steps=10, restarts=2,
                                      generator=torch.Generator().manual_seed(0)), y)
    assert clean > 0.9
    assert pgd <= fgsm < clean


def test_more_restarts_fool_a_superset_of_samples(trained):
    model, X, y = trained
    kwargs = dict(epsilon=0.08, alpha=0.02, steps=5)
    one = attack_pgd(model, X, y, restarts=1, generator=torch.Generator().manual_seed(3), **kwargs)
    three = attack_pgd(model, X, y, restarts=3, generator=torch.Generator().manual_seed(3), **kwargs)
    with torch.no_grad():
        fooled_one, fooled_three = model(one).argmax(1) != y, model(three).argmax(1) != y
    assert bool((fooled_three | ~fooled_one).all())
    assert int(fooled_three.sum()) >= int(fooled_one.sum())


def test_seeded_pgd_is_reproducible(trained):
    model, X, y = trained
    runs = [attack_pgd(model, X[:16], y[:16], epsilon=0.1, alpha=0.03, steps=3, restarts=2,
                       generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_attacks_restore_mode_and_leave_no_gradients(trained):
    model, X, y = trained
    model.train()
    try:
        attack_fgsm(model, X[:8], y[:8], epsilon=0.1)
        attack_pgd(model, X[:8], y[:8], epsilon=0.1, alpha=0.03, steps=2, restarts=2)
        assert model.training and all(m.training for m in model.modules())
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()
    attack_fgsm(model, X[:8], y[:8], epsilon=0.1)
    assert not model.training


def test_zero_epsilon_changes_nothing(trained):
    model, X, y = trained
    assert torch.equal(attack_fgsm(model, X, y, epsilon=0.0), X)
    assert torch.equal(attack_pgd(model, X, y, epsilon=0.0, alpha=0.01, steps=2, restarts=1), X)


def test_registry_names_the_attacks_and_refuses_unknown_ones():
    assert get_attack("fgsm") is attack_fgsm and get_attack("pgd") is attack_pgd
    assert set(ATTACKS) >= {"fgsm", "pgd"}
    with pytest.raises(InvalidInput, match="unknown attack 'cw'"):
        get_attack("cw")


@pytest.mark.parametrize("epsilon", [-0.1, 1.5, float("nan")])
def test_bad_epsilon_is_refused_with_the_value(trained, epsilon):
    model, X, y = trained
    with pytest.raises(InvalidInput, match="epsilon must lie in"):
        attack_fgsm(model, X[:4], y[:4], epsilon=epsilon)


def test_inputs_outside_the_unit_box_are_refused(trained):
    model, X, y = trained
    with pytest.raises(InvalidInput, match=r"X must lie in \[0, 1\], got values in \[0, 255\]"):
        attack_pgd(model, X[:4] * 255, y[:4], epsilon=0.1, alpha=0.01, steps=1, restarts=1)
    with pytest.raises(InvalidInput, match="restarts >= 1"):
        attack_pgd(model, X[:4], y[:4], epsilon=0.1, alpha=0.01, steps=1, restarts=0)
