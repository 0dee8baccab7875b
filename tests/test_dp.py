"""DP-SGD at a reasonable cost: every grad-sample mode gives the same clipped gradients, large
logical batches split into physical ones train the same model with the same privacy spent, and
the DP net trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import get_gsm_class

from stages.core.params import TrainParams
from stages.ml.nets import build_model, default_model_name
from stages.ml.training import fit

MODES = ["hooks", "functorch", "ew"]


def _params(**dp) -> TrainParams:
    return TrainParams.model_validate({
        "mode": "dp", "epochs": 1, "batch_size": 64, "lr": 0.005, "device": "cpu", "seed": 0, "amp": False,
        "adversarial": {"epsilon": 0.1},
        "dp": {"target_epsilon": None, "noise_multiplier": 1.0, "accountant": "rdp", **dp}})


def _per_sample_grads(name: str, shape: tuple[int, ...], mode: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(name, input_shape=shape, num_classes=10)
    X, y = torch.rand(12, *shape), torch.randint(0, 10, (12,))
    gsm = get_gsm_class(mode)(model, batch_first=True, loss_reduction="sum")
    F.cross_entropy(gsm(X), y, reduction="sum").backward()
    return [p.grad_sample.detach().clone() for p in gsm.parameters() if p.requires_grad]


@pytest.mark.parametrize("name, shape", [("cnn_small", (1, 8, 8)), ("cnn_dp", (1, 28, 28)), ("mlp", (20,))])
def test_every_grad_sample_mode_gives_the_same_per_sample_gradients(name, shape):
    reference = _per_sample_grads(name, shape, "hooks")
    for mode in MODES[1:]:
        grads = _per_sample_grads(name, shape, mode)
        assert len(grads) == len(reference)
        for a, b in zip(grads, reference):
            assert a.shape == b.shape and a.shape[0] == 12
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (mode, float((a - b).abs().max()))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None][:320], d.target.astype(np.int64)[:320]


@pytest.mark.parametrize("mode", MODES)
def test_fit_trains_with_each_grad_sample_mode(digits, mode):
    X, y = digits
    result = fit(X, y, params=_params(grad_sample_mode=mode), num_classes=10, progress=False)
    assert result.privacy["grad_sample_mode"] == mode and result.privacy["steps"] == 5
    assert np.isfinite(result.history[0]["loss"])


def test_physical_batches_train_the_same_model_and_spend_the_same_privacy(digits):
    X, y = digits
    whole = fit(X, y, params=_params(), num_classes=10, progress=False)
    split = fit(X, y, params=_params(max_physical_batch_size=16), num_classes=10, progress=False)
    assert split.privacy["steps"] == whole.privacy["steps"] == 5  # one accountant step per logical batch
    assert split.privacy["epsilon_spent"] == pytest.approx(whole.privacy["epsilon_spent"], rel=1e-12)
    assert split.privacy["max_physical_batch_size"] == 16
    assert split.history[0]["lr"] == pytest.approx(whole.history[0]["lr"])  # the schedule moves per logical step
    for a, b in zip(whole.model.state_dict().values(), split.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_auto_picks_the_dp_net_for_mnist_sized_images_in_dp_mode():
    assert default_model_name((1, 28, 28), "dp") == "cnn_dp"
    assert default_model_name((1, 28, 28), "adversarial") == "cnn_mnist"
    assert default_model_name((1, 8, 8), "dp") == "cnn_small"
    model = build_model("cnn_dp", input_shape=(1, 28, 28), num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 26010  # Papernot et al.'s net
