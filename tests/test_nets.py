"""Networks sized from the data: any height, width and channel count, tables as rows; the
digits and MNIST networks keep their parameter layout (saved models still load)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.core.errors import InvalidInput
from stages.core.params import TrainParams
from stages.ml.nets import build_model, default_model_name
from stages.ml.training import fit


@pytest.mark.parametrize("shape, name", [
    ((1, 8, 8), "cnn_small"), ((1, 28, 28), "cnn_mnist"), ((3, 32, 32), "cnn_mnist"), ((3, 12, 16), "cnn_small"),
    ((4, 5, 7), "cnn_small"), ((3, 96, 64), "cnn_mnist"), ((1, 1, 30), "mlp"), ((30,), "mlp"),
])
def test_default_net_fits_the_shape(shape, name):
    assert default_model_name(shape) == name
    model = build_model("auto", input_shape=shape, num_classes=4).eval()
    with torch.no_grad():
        assert model(torch.rand(3, *shape)).shape == (3, 4)
        assert model.features_of(torch.rand(3, *shape)).ndim == 2


def test_large_images_keep_a_small_head():
    small = sum(p.numel() for p in build_model("cnn_mnist", input_shape=(3, 28, 28), num_classes=10).parameters())
    large = sum(p.numel() for p in build_model("cnn_mnist", input_shape=(3, 224, 160), num_classes=10).parameters())
    assert large == small  # pooled to 7 x 7 before the dense head


def test_digits_and_mnist_parameter_layout_is_unchanged():
    keys = list(build_model("cnn_small", input_shape=(1, 8, 8), num_classes=10).state_dict())
    assert keys[-4:] == ["embed.1.weight", "embed.1.bias", "head.weight", "head.bias"]
    state = build_model("cnn_mnist", input_shape=(1, 28, 28), num_classes=10).state_dict()
    assert state["embed.1.weight"].shape == (200, 64 * 7 * 7)


@pytest.mark.parametrize("shape, name", [((3, 1, 8), "cnn_small"), ((1, 3, 3), "cnn_mnist")])
def test_too_small_images_are_refused_by_name(shape, name):
    with pytest.raises(InvalidInput, match=f"{name} needs images of at least"):
        build_model(name, input_shape=shape, num_classes=2)


@pytest.mark.parametrize("mode", ["adversarial", "dp"])
def test_rgb_non_square_images_train(mode):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    X = rng.random((80, 3, 6, 10)).astype(np.float32) * 0.5
    X[y == 1, 0] += 0.5  # class 1 is redder
    params = TrainParams.model_validate({
        "mode": mode, "epochs": 3, "batch_size": 16, "lr": 0.01, "seed": 0, "device": "cpu", "amp": False,
        "adversarial": {"method": "fgsm_rs", "epsilon": 0.05}, "dp": {"target_epsilon": 8.0, "accountant": "rdp"}})
    result = fit(X, y, params=params, num_classes=2, progress=False)
    assert result.model_name == "cnn_small" and len(result.history) == 3
    with torch.no_grad():
        assert result.model(torch.from_numpy(X)).shape == (80, 2)
