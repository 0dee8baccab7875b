"""Model architectures, registered by name.

Every model takes float32 inputs on the [0, 1] scale (N x C x H x W images of any height,
width and channel count, or N x F scaled table rows) and returns logits; the convolutional
nets size their dense head from the image and pool large images down to a fixed size. They use GroupNorm rather than BatchNorm so that the
same architecture can be trained with Opacus DP-SGD (per-sample gradients).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from stages.core.errors import InvalidInput

ModelFactory = Callable[..., nn.Module]
# Larger images are average-pooled down to this many pixels per side before the dense head
# (28x28 MNIST reaches 7x7 after the MNIST net's two pools: unchanged; 8x8 digits 4x4).
SMALL_CNN_MAX_SIDE = 8
MNIST_CNN_MAX_SIDE = 7
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def deco(factory: ModelFactory) -> ModelFactory:
        MODELS[name] = factory
        return factory

    return deco


def _pooled(height: int, width: int, *, halvings: int, cap: int) -> tuple[int, int]:
    """Spatial size after ``halvings`` 2x2 max-pools, capped at ``cap`` per side (an adaptive
    average pool brings larger images down to it, so the dense head stays small)."""
    h, w = height >> halvings, width >> halvings
    return min(h, cap), min(w, cap)


class _ConvNet(nn.Module):
    def __init__(self, *, in_channels: int, height: int, width: int, num_classes: int, widths: tuple[int, int], hidden: int,
                 dropout: float):
        super().__init__()
        c1, c2 = widths
        pooled = _pooled(height, width, halvings=1, cap=SMALL_CNN_MAX_SIDE)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.GroupNorm(min(8, c1), c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.GroupNorm(min(8, c2), c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(pooled),
        )
        flat = c2 * pooled[0] * pooled[1]
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, num_classes)

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (used by backdoor detectors)."""
        return self.embed(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features_of(x))


class _MnistNet(nn.Module):
    def __init__(self, *, in_channels: int, height: int, width: int, num_classes: int, dropout: float):
        super().__init__()
        pooled = _pooled(height, width, halvings=2, cap=MNIST_CNN_MAX_SIDE)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(pooled),
        )
        flat = 64 * pooled[0] * pooled[1]
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(flat, 200), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(200, num_classes)

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features_of(x))


class _TemperedNet(nn.Module):
    """Papernot et al.'s DP-SGD CNN with tanh ("tempered sigmoid") activations, as used by
    Tramer and Boneh: two strided convolutions, each followed by a stride-1 max pool, and a
    32-unit head. Small activations keep per-sample gradients cheap, and bounded ones keep
    clipped gradients informative."""

    def __init__(self, *, in_channels: int, height: int, width: int, num_classes: int, dropout: float):
        super().__init__()
        sides = []
        for side in (height, width):
            s1 = (side + 2 * 3 - 8) // 2 + 1 - 1
            sides.append(min((s1 - 4) // 2 + 1 - 1, SMALL_CNN_MAX_SIDE))
        if min(sides) < 1:
            raise InvalidInput(f"cnn_dp needs images of at least 16 x 16 pixels, got {height} x {width}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.AdaptiveAvgPool2d(tuple(sides)),  # identity on MNIST; keeps the head small on large images
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(32 * sides[0] * sides[1], 32), nn.Tanh(), nn.Dropout(dropout))
        self.head = nn.Linear(32, num_classes)

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features_of(x))


class _MLP(nn.Module):
    def __init__(self, *, in_features: int, num_classes: int, hidden: int, dropout: float):
        super().__init__()
        self.embed = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        )
        self.head = nn.Linear(hidden, num_classes)

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features_of(x))


def _image_dims(input_shape: tuple[int, ...], *, min_side: int, name: str) -> tuple[int, int, int]:
    """(channels, height, width) of C x H x W images, each side at least ``min_side``."""
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise InvalidInput(f"{name} needs C x H x W images, got input shape {input_shape}")
    channels, height, width = (int(d) for d in input_shape)
    if min(height, width) < min_side:
        raise InvalidInput(f"{name} needs images of at least {min_side} x {min_side} pixels, got {height} x {width}")
    return channels, height, width


@register_model("cnn_small")
def cnn_small(*, input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> nn.Module:
    """Two 3x3 conv layers and a 128-unit head; for small images such as 8x8 digits (any
    height, width and channel count of at least 2 x 2 pixels)."""
    channels, height, width = _image_dims(input_shape, min_side=2, name="cnn_small")
    return _ConvNet(in_channels=channels, height=height, width=width, num_classes=num_classes, widths=(16, 32), hidden=128,
                    dropout=dropout)


@register_model("cnn_mnist")
def cnn_mnist(*, input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> nn.Module:
    """Four conv layers (32-32-64-64) and a 200-unit head; the usual MNIST robustness net (any
    height, width and channel count of at least 4 x 4 pixels)."""
    channels, height, width = _image_dims(input_shape, min_side=4, name="cnn_mnist")
    return _MnistNet(in_channels=channels, height=height, width=width, num_classes=num_classes, dropout=dropout)


@register_model("cnn_dp")
def cnn_dp(*, input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> nn.Module:
    """Two strided tanh conv layers (16-32) and a 32-unit head (about 26k weights on MNIST);
    the DP-SGD net of Papernot et al. / Tramer and Boneh, for images of at least 16 x 16."""
    channels, height, width = _image_dims(input_shape, min_side=16, name="cnn_dp")
    return _TemperedNet(in_channels=channels, height=height, width=width, num_classes=num_classes, dropout=dropout)


@register_model("mlp")
def mlp(*, input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> nn.Module:
    """Two hidden layers of 256 units, for tabular rows (N x F)."""
    in_features = 1
    for dim in input_shape:
        in_features *= dim
    return _MLP(in_features=in_features, num_classes=num_classes, hidden=256, dropout=dropout)


def default_model_name(input_shape: tuple[int, ...], mode: str = "standard") -> str:
    """``cnn_mnist`` for images whose shorter side is at least 20 pixels (``cnn_dp`` when trained
    with DP-SGD), ``cnn_small`` for smaller images (at least 2 x 2), ``mlp`` for table rows and
    anything smaller."""
    if len(input_shape) == 3:
        if min(input_shape[1:]) >= 20:
            return "cnn_dp" if mode == "dp" else "cnn_mnist"
        if min(input_shape[1:]) >= 2:
            return "cnn_small"
    return "mlp"


def build_model(name: str, *, input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> nn.Module:
    """Build a registered architecture; ``name="auto"`` picks one from the input shape."""
    if name == "auto":
        name = default_model_name(tuple(input_shape))
    try:
        factory = MODELS[name]
    except KeyError:
        raise InvalidInput(f"unknown model {name!r}; known: {sorted(MODELS)}") from None
    return factory(input_shape=tuple(input_shape), num_classes=int(num_classes), dropout=float(dropout))
