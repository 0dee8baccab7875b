"""fit(): modes, determinism, DP budget promises, validator refusal and checkpoint resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from opacus.accountants import create_accountant
from sklearn.datasets import load_digits
from torch import nn

from stages.ml import nets
from stages.ml.training import loop as training
from stages.ml.attacks import attack_pgd
from stages.core.errors import InvalidInput
from stages.core.params import TrainParams
from stages.ml.runtime import predict_logits, resolve_device
from stages.ml.training import FitResult, fit
from tests.support import sealed_epoch, sealed_store


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(X))
    return X[order], y[order]


def make_params(**overrides) -> TrainParams:
    raw = {"mode": "standard", "epochs": 2, "batch_size": 64, "lr": 0.005, "weight_decay": 0.0, "dropout": 0.0,
           "seed": 0, "device": "cpu", "amp": False,
           "adversarial": {"method": "fgsm_rs", "epsilon": 0.1, "warmup_epochs": 0},
           "dp": {"target_epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"}}
    for key, value in overrides.items():
        if isinstance(value, dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return TrainParams.model_validate(raw)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInput, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(InvalidInput, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_standard_fit_returns_a_plain_eval_model_on_cpu_with_history(digits, capsys):
    X, y = digits
    result = fit(X[:400], y[:400], params=make_params(epochs=2, dropout=0.2), num_classes=10, progress=True)
    assert isinstance(result, FitResult) and result.model_name == "cnn_small" and result.device == "cpu"
    assert not result.model.training and result.privacy is None
    assert all(p.device.type == "cpu" for p in result.model.parameters())
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert {"epoch", "loss", "accuracy", "seconds", "images_per_s"} <= set(result.history[0])
    json.dumps(result.history)
    assert "train standard" in capsys.readouterr().err
    logits = predict_logits(result.model, X[:10], batch_size=3)
    assert logits.shape == (10, 10) and logits.dtype == np.float32


def test_fit_is_deterministic_on_cpu(digits):
    X, y = digits
    params = make_params(mode="adversarial", epochs=1, dropout=0.1)
    a = fit(X[:300], y[:300], params=params, num_classes=10, progress=False)
    b = fit(X[:300], y[:300], params=params, num_classes=10, progress=False)
    assert all(torch.equal(s, t) for s, t in zip(_weights(a.model), _weights(b.model)))


@pytest.mark.parametrize("X_scale, y_shift, match", [
    (255.0, 0, r"X must be finite and lie in \[0, 1\], got values in \[0, 255\]"),
    (1.0, 5, r"labels must lie in \[0, 9\], got \[5, 14\]"),
])
def test_bad_training_data_is_refused_with_the_values(digits, X_scale, y_shift, match):
    X, y = digits
    with pytest.raises(InvalidInput, match=match):
        fit(X[:50] * X_scale, y[:50] + y_shift, params=make_params(), num_classes=10, progress=False)


def test_adversarial_training_beats_standard_on_robust_accuracy(digits):
    X, y = digits
    Xte, yte = torch.from_numpy(X[1400:1700]), torch.from_numpy(y[1400:1700])
    robust = {}
    for mode in ("standard", "adversarial"):
        model = fit(X[:800], y[:800], params=make_params(mode=mode, epochs=6), num_classes=10,
                    progress=False).model
        adv = attack_pgd(model, Xte, yte, epsilon=0.1, alpha=0.025, steps=10, restarts=1,
                         generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            robust[mode] = float((model(adv).argmax(1) == yte).float().mean())
            assert float((model(Xte).argmax(1) == yte).float().mean()) > 0.9
    assert robust["adversarial"] > robust["standard"] + 0.1, robust


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_other_adversarial_methods_train(digits, method):
    X, y = digits
    params = make_params(mode="adversarial", epochs=1, adversarial={"method": method, "pgd_steps": 2,
                                                                    "warmup_epochs": 1})
    result = fit(X[:200], y[:200], params=params, num_classes=10, progress=False)
    assert np.isfinite(result.history[0]["loss"]) and result.history[0]["epsilon"] == pytest.approx(0.1)


def _recomputed_epsilon(privacy: dict) -> float:
    accountant = create_accountant(privacy["accountant"])
    accountant.history = [(privacy["noise_multiplier"], privacy["sample_rate"], privacy["steps"])]
    return float(accountant.get_epsilon(delta=privacy["delta"]))


@settings(max_examples=4, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.floats(0.5, 10.0), epochs=st.integers(1, 2), batch_size=st.sampled_from([32, 50]),
       accountant=st.sampled_from(["rdp", "prv"]))
def test_dp_spends_at_most_its_target_and_the_accountant_agrees(digits, target, epochs, batch_size, accountant):
    X, y = digits
    params = make_params(mode="dp", epochs=epochs, batch_size=batch_size,
                         dp={"target_epsilon": target, "accountant": accountant})
    result = fit(X[:200], y[:200], params=params, num_classes=10, progress=False)
    privacy = result.privacy
    assert 0 < privacy["epsilon_spent"] <= target
    batches = math.ceil(200 / batch_size)  # Opacus sets sample_rate = 1 / batches per epoch
    assert privacy["steps"] == epochs * batches and privacy["sample_rate"] == pytest.approx(1 / batches)
    assert _recomputed_epsilon(privacy) == pytest.approx(privacy["epsilon_spent"], rel=1e-9)


def test_dp_with_a_fixed_noise_multiplier_returns_a_plain_model(digits):
    from opacus import GradSampleModule

    X, y = digits
    params = make_params(mode="dp", epochs=1, dp={"target_epsilon": None, "noise_multiplier": 1.1,
                                                  "accountant": "prv", "poisson_sampling": False})
    result = fit(X[:200], y[:200], params=params, num_classes=10, progress=False)
    assert result.privacy["noise_multiplier"] == 1.1 and result.privacy["poisson_sampling"] is False
    assert result.privacy["epsilon_spent"] == pytest.approx(_recomputed_epsilon(result.privacy))
    assert not isinstance(result.model, GradSampleModule) and type(result.model).__name__ == "_ConvNet"
    assert not any(m._forward_hooks or m._backward_hooks for m in result.model.modules())
    assert all(not hasattr(p, "grad_sample") for p in result.model.parameters())


def test_dp_refuses_a_model_with_batchnorm(digits, monkeypatch):
    def bn_net(*, input_shape, num_classes, dropout=0.0):
        return nn.Sequential(nn.Conv2d(input_shape[0], 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(num_classes))

    monkeypatch.setitem(nets.MODELS, "bn_net", bn_net)
    X, y = digits
    with pytest.raises(InvalidInput, match="cannot be trained with DP-SGD: .*BatchNorm"):
        fit(X[:100], y[:100], params=make_params(mode="dp", model="bn_net"), num_classes=10, progress=False)


@pytest.mark.parametrize("mode", ["adversarial", "dp"])
def test_resume_continues_from_the_saved_epoch(digits, tmp_path, monkeypatch, mode):
    X, y = digits
    X, y = X[:256], y[:256]
    params = make_params(mode=mode, epochs=3, dropout=0.1,
                         dp={"target_epsilon": None, "noise_multiplier": 1.0, "accountant": "rdp"})
    uninterrupted = fit(X, y, params=params, num_classes=10, progress=False)

    real_epoch = training._run_epoch
    calls = []

    def crash_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "_run_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit(X, y, params=params, num_classes=10, checkpoints=sealed_store(tmp_path), progress=False)
    monkeypatch.setattr(training, "_run_epoch", real_epoch)
    assert sealed_epoch(tmp_path) == 1

    epochs_run = []
    monkeypatch.setattr(training, "_run_epoch", lambda *a, **k: epochs_run.append(1) or real_epoch(*a, **k))
    told = []
    resumed = fit(X, y, params=params, num_classes=10, checkpoints=sealed_store(tmp_path), progress=False,
                  on_epoch=lambda label, done, total, note="": told.append((label, done, total, note)))
    assert len(epochs_run) == 2 and [h["epoch"] for h in resumed.history] == [1, 2, 3]
    # progress counts from the resumed epoch and says what trains
    assert [(label, d, t) for label, d, t, _ in told] == [("epochs", 1, 3), ("epochs", 2, 3), ("epochs", 3, 3)]
    assert "resumed after epoch 1" in told[0][3] and told[0][3].startswith(
        "adversarial fgsm_rs, epsilon 0.1" if mode == "adversarial" else "dp, noise 1")
    assert all("loss" in note and "accuracy" in note for *_, note in told[1:])
    assert sealed_epoch(tmp_path) == 3
    assert all(torch.equal(s, t) for s, t in zip(_weights(uninterrupted.model), _weights(resumed.model)))
    if mode == "dp":
        assert resumed.privacy["steps"] == uninterrupted.privacy["steps"]
        assert resumed.privacy["epsilon_spent"] == pytest.approx(uninterrupted.privacy["epsilon_spent"])
