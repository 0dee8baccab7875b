"""Model architectures, registered by name.

Every model takes float32 inputs on the [0, 1] scale (N x C x H x W for images, N x F for
tabular data) and returns logits. They use GroupNorm rather than BatchNorm so that the
same architecture can be trained with Opacus DP-SGD (per-sample gradients).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from stages.core.errors import InvalidInput

ModelFactory = Callable[..., nn.Module]
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def deco(factory: ModelFactory) -> ModelFactory:
        MODELS[name] = factory
        return factory

    return deco


class _ConvNet(nn.Module):
    def __init__(self, *, in_channels: int, side: int, num_classes: int, widths: tuple[int, int], hidden: int, dropout: float):
        super().__init__()
        c1, c2 = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.GroupNorm(min(8, c1), c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.GroupNorm(min(8, c2), c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = c2 * (side // 2) * (side // 2)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, num_classes)

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (used by backdoor detectors)."""
        return self.embed(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features_of(x))


class _MnistNet(nn.Module):
    def __init__(self, *, in_channels: int, side: int, num_classes: int, dropout: float):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 64 * (side // 4) * (side // 4)
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

    def __init__(self, *, in_channels: int, side: int, num_classes: int, dropout: float):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),
        )
        s1 = (side + 2 * 3 - 8) // 2 + 1 - 1
        s2 = (s1 - 4) // 2 + 1 - 1
        if s2 < 1:
            raise InvalidInput(f"cnn_dp needs images of at least 16 x 16 pixels, got side {side}")
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(32 * s2 * s2, 32), nn.Tanh(), nn.Dropout(dropout))
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


def _image_dims(input_shape: tuple[int, ...]) -> tuple[int, int]:
    if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
        raise InvalidInput(f"this model needs square C x H x W images, got input shape {input_shape}")
    return input_shape[0], input_shape[1]


@register_model("cnn_small")
def cnn_small(*, input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> nn.Module:
    """Two 3x3 conv layers and a 128-unit head; for small images such as 8x8 digits."""
    channels, side = _image_dims(input_shape)
    return _ConvNet(in_channels=channels, side=side, num_classes=num_classes, widths=(16, 32), hidden=128, dropout=dropout)


@register_model("cnn_mnist")
def cnn_mnist(*, input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> nn.Module:
    """Four conv layers (32-32-64-64) and a 200-unit head; the usual MNIST robustness net."""
    channels, side = _image_dims(input_shape)
    return _MnistNet(in_channels=channels, side=side, num_classes=num_classes, dropout=dropout)


@register_model("cnn_dp")
def cnn_dp(*, input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> nn.Module:
    """Two strided tanh conv layers (16-32) and a 32-unit head (about 26k weights on MNIST);
    the DP-SGD net of Papernot et al. / Tramer and Boneh, for images of at least 16 x 16."""
    channels, side = _image_dims(input_shape)
    return _TemperedNet(in_channels=channels, side=side, num_classes=num_classes, dropout=dropout)


@register_model("mlp")
def mlp(*, input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> nn.Module:
    """Two hidden layers of 256 units, for tabular rows (N x F)."""
    in_features = 1
    for dim in input_shape:
        in_features *= dim
    return _MLP(in_features=in_features, num_classes=num_classes, hidden=256, dropout=dropout)


def default_model_name(input_shape: tuple[int, ...], mode: str = "standard") -> str:
    """``cnn_small`` for small images, ``cnn_mnist`` for MNIST-sized ones (``cnn_dp`` when
    trained with DP-SGD), ``mlp`` for tabular rows."""
    if len(input_shape) == 3:
        if input_shape[1] >= 20:
            return "cnn_dp" if mode == "dp" else "cnn_mnist"
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
