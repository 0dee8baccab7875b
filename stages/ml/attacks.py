"""Evasion attacks under an L-infinity budget, registered by name.

Every attack takes a model that returns logits, images ``X`` (float32, N x C x H x W or
N x F, values on the [0, 1] input scale) and int64 labels ``y``, and returns the
adversarial images: a tensor of the same shape, on the same device, inside the
epsilon ball around ``X`` and inside [0, 1]. Epsilons and step sizes are on the [0, 1]
input scale (epsilon 0.1 = 25.5 grey levels out of 255).

Attacks run the model in eval mode and restore its previous mode afterwards; gradients
are taken with respect to the perturbation only, so nothing accumulates in the model
parameters' ``.grad``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.core.errors import InvalidInput
from stages.ml.runtime import eval_mode

Attack = Callable[..., Tensor]
ATTACKS: dict[str, Attack] = {}


def register_attack(name: str) -> Callable[[Attack], Attack]:
    def deco(fn: Attack) -> Attack:
        ATTACKS[name] = fn
        return fn

    return deco


def get_attack(name: str) -> Attack:
    """The attack registered under ``name``; unknown names raise ``InvalidInput``."""
    try:
        return ATTACKS[name]
    except KeyError:
        raise InvalidInput(f"unknown attack {name!r}; known: {sorted(ATTACKS)}") from None


def check_attack_inputs(X: Tensor, y: Tensor, *, epsilon: float) -> None:
    """Raise ``InvalidInput`` unless X, y and epsilon fit the conventions above."""
    if not isinstance(X, Tensor) or not isinstance(y, Tensor):
        raise InvalidInput(f"X and y must be torch tensors, got {type(X).__name__} and {type(y).__name__}")
    if X.ndim < 2 or y.ndim != 1 or len(X) != len(y):
        raise InvalidInput(f"X must be N x ... and y of length N, got X {tuple(X.shape)} and y {tuple(y.shape)}")
    if not X.is_floating_point() or y.dtype != torch.int64:
        raise InvalidInput(f"X must be float and y int64, got {X.dtype} and {y.dtype}")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and 0 <= epsilon <= 1):
        raise InvalidInput(f"epsilon must lie in [0, 1] (the [0, 1] input scale), got {epsilon!r}")
    if X.numel() and (X.min() < 0 or X.max() > 1):
        raise InvalidInput(f"X must lie in [0, 1], got values in [{X.min().item():g}, {X.max().item():g}]")


def _loss_grad(model: nn.Module, X: Tensor, y: Tensor, delta: Tensor) -> Tensor:
    """Gradient of the summed cross-entropy at ``X + delta`` with respect to ``delta`` only."""
    delta = delta.detach().requires_grad_(True)
    loss = F.cross_entropy(model(X + delta), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, delta)
    return grad


def _clip(delta: Tensor, X: Tensor, epsilon: float) -> Tensor:
    """Project onto the epsilon ball, then onto the [0, 1] box around X."""
    return torch.clamp(torch.clamp(delta, -epsilon, epsilon), -X, 1 - X)


@register_attack("fgsm")
def attack_fgsm(model: nn.Module, X: Tensor, y: Tensor, *, epsilon: float) -> Tensor:
    """Fast gradient sign method (Goodfellow et al.): one signed step of size ``epsilon``.

    ``epsilon`` is the L-inf budget on the [0, 1] input scale. Returns ``X + delta``.
    """
    check_attack_inputs(X, y, epsilon=epsilon)
    with eval_mode(model):
        grad = _loss_grad(model, X, y, torch.zeros_like(X))
    return (X + _clip(epsilon * grad.sign(), X, epsilon)).detach()


def pgd_delta(model: nn.Module, X: Tensor, y: Tensor, *, epsilon: float, alpha: float, steps: int,
              random_start: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """One projected-gradient run; returns the final perturbation (no mode switch, no checks).

    With ``steps=1`` and ``alpha=1.25 * epsilon`` this is FGSM with random start (Wong et al.).
    """
    if random_start:
        device = generator.device if generator is not None else X.device
        noise = torch.rand(X.shape, generator=generator, device=device, dtype=X.dtype).to(X.device)
        delta = _clip((2 * noise - 1) * epsilon, X, epsilon)
    else:
        delta = torch.zeros_like(X)
    for _ in range(steps):
        delta = _clip(delta + alpha * _loss_grad(model, X, y, delta).sign(), X, epsilon)
    return delta.detach()


def n_fgsm_delta(model: nn.Module, X: Tensor, y: Tensor, *, epsilon: float, alpha: float, noise: float,
                 generator: torch.Generator | None = None) -> Tensor:
    """N-FGSM (de Jorge et al., "Make some noise"): a uniform start in [-noise, noise] and one
    signed step of ``alpha``, not projected back onto the epsilon ball (only onto [0, 1]).

    A training-time perturbation (no mode switch, no checks); ``epsilon`` only documents the
    budget it is meant for (the paper's defaults: ``noise = 2 * epsilon``, ``alpha = epsilon``).
    """
    device = generator.device if generator is not None else X.device
    start = (2 * torch.rand(X.shape, generator=generator, device=device, dtype=X.dtype).to(X.device) - 1) * noise
    delta = torch.clamp(start, -X, 1 - X)
    delta = torch.clamp(delta + alpha * _loss_grad(model, X, y, delta).sign(), -X, 1 - X)
    return delta.detach()


@register_attack("pgd")
def attack_pgd(model: nn.Module, X: Tensor, y: Tensor, *, epsilon: float, alpha: float, steps: int, restarts: int,
               random_start: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Projected gradient descent under L-inf (Madry et al.) with random restarts.

    ``epsilon`` (budget) and ``alpha`` (step size) are on the [0, 1] input scale; each
    restart starts uniformly in the epsilon ball when ``random_start``. Per sample, the
    restart kept is the one that fools the model, or failing that the one with the highest
    loss; once a sample is fooled, later restarts skip it. Pass a seeded ``generator`` for
    reproducible starts.
    """
    check_attack_inputs(X, y, epsilon=epsilon)
    if not (alpha > 0 and isinstance(steps, int) and steps >= 1 and isinstance(restarts, int) and restarts >= 1):
        raise InvalidInput(f"PGD needs alpha > 0, steps >= 1 and restarts >= 1, got {alpha!r}, {steps!r}, {restarts!r}")
    with eval_mode(model):
        best = torch.zeros_like(X)
        best_key = torch.full((len(X),), -math.inf, device=X.device)
        for _ in range(restarts):
            # a fooled sample keeps its perturbation, so later restarts attack only the others
            active = torch.nonzero(best_key < math.inf).squeeze(1)
            if len(active) == 0:
                break
            Xa, ya = X[active], y[active]
            delta = pgd_delta(model, Xa, ya, epsilon=epsilon, alpha=alpha, steps=steps,
                              random_start=random_start, generator=generator)
            if restarts == 1:
                return (X + delta).detach()
            with torch.no_grad():
                logits = model(Xa + delta)
                loss = F.cross_entropy(logits, ya, reduction="none").float()
                # fooled samples rank above any loss; among equals, higher loss wins
                key = torch.where(logits.argmax(1) != ya, torch.full_like(loss, math.inf), loss)
                better = key > best_key[active]
                best[active[better]] = delta[better]
                best_key[active] = torch.maximum(best_key[active], key)
    return (X + best).detach()
