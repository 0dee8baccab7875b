"""The catastrophic-overfitting guard: a collapse (PGD accuracy on the fixed batch falling while
FGSM accuracy rises) is detected, the last good epoch comes back from memory, training goes on
with a smaller step, and everything is reported; N-FGSM trains."""

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


def _scripted(monkeypatch, readings: list[tuple[float, float]]):
    """Replace the guard's measurement by scripted (FGSM, PGD) accuracies, one per epoch, and
    record the weights each epoch starts from."""
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
    (0.95, 0.30, False),   # PGD down by less than guard_drop
    (0.50, 0.05, False),   # PGD down, but FGSM down too: not the single-step overfit
])
def test_detection_rule(fgsm_after, pgd_after, collapse):
    g = guard_module.CollapseGuard(np.zeros((4, 3), np.float32), np.zeros(4, np.int64), _params(),
                                   device=torch.device("cpu"))
    g.remember(1, {"guard_fgsm_accuracy": 0.6, "guard_pgd_accuracy": 0.45}, {})
    assert g.collapsed({"guard_fgsm_accuracy": fgsm_after, "guard_pgd_accuracy": pgd_after}) is collapse


def test_a_collapse_restores_the_last_good_epoch_and_goes_on_with_a_smaller_step(digits, tmp_path, monkeypatch):
    X, y = digits
    starts, ends = _scripted(monkeypatch, [(0.5, 0.4), (0.6, 0.45), (0.95, 0.05), (0.62, 0.47), (0.65, 0.5), (0.7, 0.52)])
    store = CheckpointStore(tmp_path, run_id="guard", key=b"k" * 32)
    result = fit(X, y, params=_params(), num_classes=10, checkpoints=store, progress=False)
    assert len(starts) == 6  # epoch 3 was trained twice
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
    starts, ends = _scripted(monkeypatch, [(0.5, 0.4), (0.6, 0.45), (0.95, 0.05)])
    result = fit(X, y, params=_params(guard_max_restores=0), num_classes=10, progress=False)
    assert len(starts) == 3 and [h["epoch"] for h in result.history] == [1, 2]
    assert _same([t for t in result.model.state_dict().values()], ends[1])  # the model handed back is epoch 2's
    (event,) = result.guard["events"]
    assert event["action"] == "stopped at the last good epoch" and event["new_alpha"] is None


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
