"""APGD-CE, APGD-DLR and APGD-T (Croce and Hein, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks"): AutoAttack's step-size-free PGD with the
cross-entropy loss, with the shift- and scale-invariant difference-of-logits-ratio loss, and
with the targeted DLR loss against each of the next nine most likely classes in turn (the
white-box attack of AutoAttack's standard set that finds the most), from the maintained
implementation in ``torchattacks`` rather than a copy of our own.

Measured on an FGSM-RS model of 2,400 MNIST rows at epsilon 0.3 (200 held-out rows): PGD-20 x 2,
APGD-CE and APGD-DLR left 44% robust, APGD-T alone 41%; AutoAttack's standard set would have
been more than 2 points below a figure logged without APGD-T.

``torchattacks==3.5.1`` declares ``torchvision`` and an old ``requests`` as dependencies, which
would replace the pinned torch, so ``make setup`` installs it with ``--no-deps`` from
``requirements-nodeps.txt`` (hash-pinned); it imports neither. Without it these attacks refuse
to run (``PipelineError``): an evaluation that cannot run its attacks fails closed.

Both functions are pure: they take a model and tensors and return adversarial tensors, leave
the model's mode and the caller's random state as they were (torchattacks seeds the global
generator; that happens inside ``torch.random.fork_rng``), and are safe to fan out per batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from stages.core.errors import InvalidInput, PipelineError
from stages.ml.attacks import check_attack_inputs, register_attack
from stages.ml.runtime import eval_mode

TORCHATTACKS_VERSION = "3.5.1"


class _AsImages(nn.Module):
    """Present inputs of any per-sample shape as N x 1 x 1 x F images (what torchattacks' APGD
    expects) to a model that takes the original shape."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.model, self.shape = model, shape

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.reshape(len(x), *self.shape))


# the fewest classes each attack's loss is defined for (DLR reads the top three logits; the
# targeted DLR the top four)
MIN_CLASSES = {"apgd_dlr": 3, "apgd_t": 4}
# AutoAttack's standard set targets at most the nine classes after the predicted one
APGD_T_TARGETS = 9


def _torchattacks():
    try:
        import torchattacks  # only when an APGD attack runs; installed with --no-deps by make setup
    except ImportError as err:
        raise PipelineError(f"APGD needs torchattacks=={TORCHATTACKS_VERSION} (make setup installs it with --no-deps "
                            f"from requirements-nodeps.txt): {err}") from None
    if torchattacks.__version__ != TORCHATTACKS_VERSION:
        raise PipelineError(f"APGD is pinned to torchattacks=={TORCHATTACKS_VERSION}, found {torchattacks.__version__}")
    return torchattacks


def _apgd(model: nn.Module, X: Tensor, y: Tensor, *, name: str, epsilon: float, steps: int, restarts: int,
          seed: int) -> Tensor:
    check_attack_inputs(X, y, epsilon=epsilon)
    if not (isinstance(steps, int) and steps >= 1 and isinstance(restarts, int) and restarts >= 1):
        raise InvalidInput(f"APGD needs steps >= 1 and restarts >= 1, got {steps!r} and {restarts!r}")
    if len(X) == 0 or epsilon == 0:
        return X.detach().clone()
    torchattacks = _torchattacks()
    shape = tuple(X.shape[1:])
    wrapped = _AsImages(model, shape)
    devices = [X.device] if X.device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=devices):
        if name in MIN_CLASSES:  # only the DLR losses depend on the number of classes
            with torch.no_grad():
                classes = model(X[:1]).shape[1]
            if classes < MIN_CLASSES[name]:
                raise InvalidInput(f"{name} needs at least {MIN_CLASSES[name]} classes (its loss reads the top "
                                   f"{MIN_CLASSES[name]} logits), got {classes}")
        if name == "apgd_t":
            attack = torchattacks.APGDT(wrapped, norm="Linf", eps=float(epsilon), steps=steps, n_restarts=restarts,
                                        seed=int(seed), rho=0.75, verbose=False, n_classes=min(classes, APGD_T_TARGETS + 1))
        else:
            attack = torchattacks.APGD(wrapped, norm="Linf", eps=float(epsilon), steps=steps, n_restarts=restarts,
                                       seed=int(seed), loss={"apgd_ce": "ce", "apgd_dlr": "dlr"}[name], rho=0.75,
                                       verbose=False)
        adv = attack(X.reshape(len(X), 1, 1, math.prod(shape)), y)
    return adv.reshape(X.shape).detach()


@register_attack("apgd_ce")
def attack_apgd_ce(model: nn.Module, X: Tensor, y: Tensor, *, epsilon: float, steps: int = 100, restarts: int = 1,
                   seed: int = 0) -> Tensor:
    """APGD on the cross-entropy loss under L-inf ``epsilon`` (on the [0, 1] input scale).

    ``steps`` iterations (AutoAttack uses 100) from ``restarts`` random starts seeded by
    ``seed``; a sample fooled by one restart keeps that perturbation. Returns ``X + delta``.
    """
    return _apgd(model, X, y, name="apgd_ce", epsilon=epsilon, steps=steps, restarts=restarts, seed=seed)


@register_attack("apgd_dlr")
def attack_apgd_dlr(model: nn.Module, X: Tensor, y: Tensor, *, epsilon: float, steps: int = 100, restarts: int = 1,
                    seed: int = 0) -> Tensor:
    """APGD on the difference-of-logits-ratio loss under L-inf ``epsilon`` ([0, 1] scale).

    The DLR loss is invariant to shifting and rescaling the logits, so it is not fooled by
    models whose cross-entropy gradients vanish (gradient masking). Needs >= 3 classes.
    """
    return _apgd(model, X, y, name="apgd_dlr", epsilon=epsilon, steps=steps, restarts=restarts, seed=seed)


@register_attack("apgd_t")
def attack_apgd_t(model: nn.Module, X: Tensor, y: Tensor, *, epsilon: float, steps: int = 100, restarts: int = 1,
                  seed: int = 0) -> Tensor:
    """Targeted APGD on the DLR loss under L-inf ``epsilon`` ([0, 1] scale): for each of the
    next nine most likely classes in turn (fewer when there are fewer classes), ``steps``
    iterations from ``restarts`` random starts towards that class, on the rows not yet fooled.
    Costs up to nine times APGD-CE. Needs >= 4 classes.
    """
    return _apgd(model, X, y, name="apgd_t", epsilon=epsilon, steps=steps, restarts=restarts, seed=seed)
