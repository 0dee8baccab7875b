"""The catastrophic-overfitting guard: a collapse (PGD accuracy on the fixed batch falling from the
best good epoch while the FGSM-PGD gap widens) is detected, the best good epoch comes back from
memory, training goes on with a smaller step and then with N-FGSM, the model handed back is the
best good epoch's, and everything is reported; N-FGSM trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from stages.core.params import TrainParams
from stages.ml.training import fit
from stages.ml.training import guard as guard_module
from stages.ml.training import loop
from stages.ml.training.checkpoints import CheckpointStore, checkpoint_binding


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None][:256], d.target.astype(np.int64)[:256]


def _params(**adv) -> TrainParams:
    return TrainParams.model_validate({
        "mode": "adversarial", "epochs": 5, "batch_size": 64, "lr": 0.005, "device": "cpu", "seed": 0, "amp": False,
        "adversarial": {"method": "fgsm_rs", "epsilon": 0.1, "warmup_epochs": 0, "guard_rows": 64, **adv}, "dp": {}})


def _guard(num_classes: int = 10) -> guard_module.CollapseGuard:
    return guard_module.CollapseGuard(np.zeros((4, 3), np.float32), np.zeros(4, np.int64), _params(),
                                      num_classes=num_classes, device=torch.device("cpu"))


def _scripted(monkeypatch, readings: list[tuple[float, float]]):
    """Replace the guard's measurement by scripted (FGSM, PGD) accuracies, one for the untrained
    model and one per epoch, and record the weights each epoch starts and ends with."""
    calls = iter(readings)
    monkeypatch.setattr(guard_module.CollapseGuard, "measure", lambda self, model: dict(
        zip(("guard_fgsm_accuracy", "guard_pgd_accuracy"), next(calls))))
    starts: list[list[torch.Tensor]] = []
    ends: list[list[torch.Tensor]] = []
    real = loop._run_epoch

    def run_epoch(model, *args, **kwargs):
        starts.append([t.detach().clone() for t in model.state_dict().values()])
        out = real(model, *args, **kwargs)
        ends.append([t.detach().clone() for t in model.state_dict().values()])
        return out

    monkeypatch.setattr(loop, "_run_epoch", run_epoch)
    return starts, ends


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(s, t) for s, t in zip(a, b))


@pytest.mark.parametrize("fgsm_after, pgd_after, collapse", [
    (0.95, 0.05, True),    # FGSM up, PGD down by 0.4: the collapse signature
    (0.55, 0.05, True),    # FGSM a little down, PGD down by 0.4: the gap widened by 0.35
    (0.65, 0.30, False),   # PGD down by less than guard_drop, FGSM less than twice guard_drop above it
    (0.97, 0.40, True),    # PGD barely down but FGSM 0.57 above it: overfit to FGSM
    (0.95, 0.50, False),   # FGSM 0.45 above PGD, but PGD up from 0.45: still gaining robustness
    (0.20, 0.05, False),   # everything down together (divergence): not the single-step overfit
])
def test_detection_rule(fgsm_after, pgd_after, collapse):
    g = _guard()
    g.remember(1, {"guard_fgsm_accuracy": 0.6, "guard_pgd_accuracy": 0.45}, {})
    assert g.collapsed({"guard_fgsm_accuracy": fgsm_after, "guard_pgd_accuracy": pgd_after}) is collapse


def test_a_collapse_spread_over_epochs_is_measured_from_the_best_epoch():
    g = _guard()
    for epoch, (fgsm, pgd) in enumerate([(0.9, 0.85), (0.93, 0.75)], start=1):  # each step down less than 0.2
        stats = {"guard_fgsm_accuracy": fgsm, "guard_pgd_accuracy": pgd}
        assert not g.collapsed(stats)
        g.remember(epoch, stats, {})
    assert g.best["epoch"] == 1  # the weaker epoch 2 is not the reference
    assert g.collapsed({"guard_fgsm_accuracy": 0.95, "guard_pgd_accuracy": 0.62})


def test_a_model_that_overfits_fgsm_before_it_is_robust_counts_as_collapsed():
    g = _guard()
    g.remember(1, {"guard_fgsm_accuracy": 0.39, "guard_pgd_accuracy": 0.14}, {})
    assert g.collapsed({"guard_fgsm_accuracy": 0.72, "guard_pgd_accuracy": 0.14})  # PGD did not fall; gap 0.58


def test_a_model_never_robust_beyond_chance_is_not_judged():
    """Three classes, the untrained model at PGD 0 (epoch 0 is the only reference): a half-trained
    net whose FGSM accuracy is far above its PGD accuracy (the label-leaking first epochs of small
    data) trains on, since the only epoch to go back to is no more robust. Once an epoch has been
    above chance, the same reading is a collapse."""
    g = _guard(num_classes=3)
    g.remember(0, {"guard_fgsm_accuracy": 0.03, "guard_pgd_accuracy": 0.0}, {})
    leaking = {"guard_fgsm_accuracy": 1.0, "guard_pgd_accuracy": 0.08}
    assert not g.collapsed(leaking)
    g.remember(1, leaking, {})
    g.remember(2, {"guard_fgsm_accuracy": 0.5, "guard_pgd_accuracy": 0.33}, {})  # at chance: still nothing to lose
    assert not g.collapsed(leaking)
    g.remember(3, {"guard_fgsm_accuracy": 0.6, "guard_pgd_accuracy": 0.45}, {})
    assert g.collapsed(leaking)


def test_an_epoch_more_robust_than_every_earlier_one_is_not_a_collapse():
    """The reading that made the first guard restore a healthy full-MNIST FGSM-RS run at epoch
    2: FGSM accuracy 0.4 above PGD accuracy, PGD accuracy up from 0.25 to 0.46."""
    g = _guard()
    g.remember(1, {"guard_fgsm_accuracy": 0.55, "guard_pgd_accuracy": 0.248}, {})
    assert not g.collapsed({"guard_fgsm_accuracy": 0.87, "guard_pgd_accuracy": 0.463})
    assert g.collapsed({"guard_fgsm_accuracy": 0.87, "guard_pgd_accuracy": 0.248})  # the same gap without the gain


def test_a_collapse_restores_the_last_good_epoch_and_goes_on_with_a_smaller_step(digits, tmp_path, monkeypatch):
    X, y = digits
    starts, ends = _scripted(monkeypatch, [(0.1, 0.1), (0.5, 0.4), (0.6, 0.45), (0.95, 0.05), (0.62, 0.47), (0.65, 0.5), (0.7, 0.52)])
    store = CheckpointStore(tmp_path, run_id="guard", key=b"k" * 32)
    told = []
    result = fit(X, y, params=_params(), num_classes=10, checkpoints=store, progress=False,
                 on_epoch=lambda label, done, total, note="": told.append((label, done, total, note)))
    assert len(starts) == 6  # epoch 3 was trained twice
    # the progress went back with the restore, and said why
    assert [(d, t) for _, d, t, _ in told] == [(0, 5), (1, 5), (2, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert "epoch 3 collapsed, back to epoch 2" in told[3][3]
    assert _same(starts[3], ends[1]) and not _same(starts[3], ends[2])  # the redo starts from epoch 2's weights
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]
    assert result.history[2]["guard_pgd_accuracy"] == 0.47  # the kept epoch 3 is the redo
    report = result.guard
    assert report["restores"] == 1 and report["final_alpha"] == pytest.approx(0.75 * 0.125)
    (event,) = report["events"]
    assert event["epoch"] == 3 and event["last_good_epoch"] == 2 and event["guard_pgd_accuracy"] == 0.05
    assert event["alpha"] == pytest.approx(0.125) and event["new_alpha"] == pytest.approx(0.09375)
    ckpt = store.load(checkpoint_binding(X, y, _params(), 10))
    assert ckpt["epoch"] == 5 and ckpt["guard"]["alpha"] == pytest.approx(0.09375) and ckpt["guard"]["restores"] == 1


def test_after_the_last_allowed_restore_training_stops_at_the_last_good_epoch(digits, monkeypatch):
    X, y = digits
    starts, ends = _scripted(monkeypatch, [(0.1, 0.1), (0.5, 0.4), (0.6, 0.45), (0.95, 0.05)])
    result = fit(X, y, params=_params(guard_max_restores=0), num_classes=10, progress=False)
    assert len(starts) == 3 and [h["epoch"] for h in result.history] == [1, 2]
    assert _same([t for t in result.model.state_dict().values()], ends[1])  # the model handed back is epoch 2's
    (event,) = result.guard["events"]
    assert event["action"] == "stopped at the best good epoch" and event["new_alpha"] is None
    assert result.guard["selected_epoch"] == 2 and result.guard["last_epoch"] == 2


def test_guard_measures_real_accuracies_and_is_off_for_multi_step_methods(digits):
    X, y = digits
    result = fit(X, y, params=_params(), num_classes=10, progress=False)
    for h in result.history:
        assert 0 <= h["guard_pgd_accuracy"] <= h["guard_fgsm_accuracy"] + 0.1 and h["guard_seconds"] > 0
    assert result.guard["rows"] == 64 and result.guard["events"] == []
    pgd_params = TrainParams.model_validate({**_params().model_dump(), "epochs": 1, "adversarial": {
        **_params().adversarial.model_dump(), "method": "pgd", "pgd_steps": 2}})
    pgd = fit(X, y, params=pgd_params, num_classes=10, progress=False)
    assert pgd.guard is None and "guard_pgd_accuracy" not in pgd.history[0]


def test_n_fgsm_trains_and_leaves_the_epsilon_ball_only_by_design(digits):
    from stages.ml.attacks import n_fgsm_delta
    from stages.ml.nets import build_model

    X, y = digits
    model = build_model("cnn_small", input_shape=(1, 8, 8), num_classes=10)
    Xt, yt = torch.from_numpy(X[:32]), torch.from_numpy(y[:32])
    delta = n_fgsm_delta(model, Xt, yt, epsilon=0.1, alpha=0.1, noise=0.2, generator=torch.Generator().manual_seed(0))
    assert delta.abs().max() <= 0.3 + 1e-6 and delta.abs().max() > 0.1  # noise 2 eps + step eps, unprojected
    assert (Xt + delta).min() >= 0 and (Xt + delta).max() <= 1
    result = fit(X, y, params=_params(method="n_fgsm"), num_classes=10, progress=False)
    assert np.isfinite(result.history[-1]["loss"]) and result.guard["final_alpha"] == pytest.approx(0.1)


@pytest.mark.parametrize("fallback", ["pgd", "n_fgsm"])
def test_a_second_collapse_restores_again_and_switches_to_the_fallback(digits, tmp_path, monkeypatch, fallback):
    from stages.ml.training import adversarial

    X, y = digits
    starts, ends = _scripted(monkeypatch, [(0.1, 0.1), (0.5, 0.4), (0.6, 0.45), (0.95, 0.05), (0.96, 0.1), (0.62, 0.47),
                                           (0.65, 0.5), (0.7, 0.52)])
    calls = {"pgd": [], "n_fgsm": []}
    real_pgd, real_n_fgsm = adversarial.pgd_delta, adversarial.n_fgsm_delta
    monkeypatch.setattr(adversarial, "pgd_delta", lambda *a, **k: calls["pgd"].append(k) or real_pgd(*a, **k))
    monkeypatch.setattr(adversarial, "n_fgsm_delta", lambda *a, **k: calls["n_fgsm"].append(k) or real_n_fgsm(*a, **k))
    params = _params(guard_fallback=fallback)
    store = CheckpointStore(tmp_path, run_id="guard", key=b"k" * 32)
    result = fit(X, y, params=params, num_classes=10, checkpoints=store, progress=False)
    assert len(starts) == 7 and _same(starts[3], ends[1]) and _same(starts[4], ends[1])  # epoch 3 redone twice
    first, second = result.guard["events"]
    assert first["new_method"] == "fgsm_rs" and first["new_alpha"] == pytest.approx(0.09375)
    assert second["method"] == "fgsm_rs" and second["alpha"] == pytest.approx(0.09375)
    assert result.guard["final_method"] == second["new_method"] == fallback and result.guard["restores"] == 2
    # every batch of the last three epochs (4 batches each) was trained with the fallback
    if fallback == "pgd":
        assert second["action"] == "restored the best good epoch, switched to PGD-2"
        assert second["new_alpha"] == pytest.approx(0.05) and second["new_steps"] == 2  # 2 steps of epsilon / 2
        fallback_calls = [c for c in calls["pgd"] if c["steps"] == 2]
        assert len(fallback_calls) == 3 * 4 and all(c["alpha"] == pytest.approx(0.05) for c in fallback_calls)
        assert result.guard["final_steps"] == 2
    else:
        assert second["action"] == "restored the best good epoch, switched to N-FGSM"
        assert second["new_alpha"] == pytest.approx(0.1)  # N-FGSM's step: epsilon
        assert len(calls["n_fgsm"]) == 3 * 4 and all(c["noise"] == pytest.approx(0.2) for c in calls["n_fgsm"])
    ckpt = store.load(checkpoint_binding(X, y, params, 10))
    assert ckpt["guard"]["method"] == fallback and ckpt["guard"]["restores"] == 2


def test_the_model_handed_back_is_the_best_good_epoch_also_after_a_resume(digits, tmp_path, monkeypatch):
    X, y = digits
    starts, ends = _scripted(monkeypatch, [(0.1, 0.1), (0.5, 0.4), (0.6, 0.55), (0.62, 0.5)])
    params = TrainParams.model_validate({**_params().model_dump(), "epochs": 3})
    store = CheckpointStore(tmp_path, run_id="guard", key=b"k" * 32)
    result = fit(X, y, params=params, num_classes=10, checkpoints=store, progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and result.guard["events"] == []
    assert _same(list(result.model.state_dict().values()), ends[1]) and not _same(ends[1], ends[2])
    assert result.guard["selected_epoch"] == 2 and result.guard["last_epoch"] == 3
    assert result.guard["selected"]["guard_pgd_accuracy"] == 0.55
    # a finished run read back from its checkpoint hands back the same epoch 2 without training
    again = fit(X, y, params=params, num_classes=10, checkpoints=CheckpointStore(tmp_path, run_id="guard", key=b"k" * 32),
                progress=False)
    assert len(starts) == 3 and _same(list(again.model.state_dict().values()), ends[1])
