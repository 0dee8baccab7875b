"""An attacker who knows the detector: PGD that fools the model and stays under the alarm.

The loss pushes the true class's margin down and the detector's combined score below its
threshold at once (Carlini and Wagner's recipe for detectors, 2017): maximise
``CE(model(x + delta), y) - weight * relu(score(x + delta) - threshold + margin)``; every
score is differentiable, so no gradient has to be approximated. Used by the benchmark to
report what such an attacker achieves, not by the service.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.ml.attacks import check_attack_inputs
from stages.ml.runtime import eval_mode
from stages.monitoring.detector import AdversarialDetector


def attack_detector_aware(model: nn.Module, detector: AdversarialDetector, X: Tensor, y: Tensor, *, epsilon: float,
                          steps: int = 50, weight: float = 4.0, margin: float = 0.5,
                          generator: torch.Generator | None = None) -> Tensor:
    """L-inf PGD (``epsilon`` on the [0, 1] input scale) against model and detector together.

    Returns the perturbed inputs; per sample it keeps the step that fooled the model while
    scoring below the threshold, else the last step.
    """
    check_attack_inputs(X, y, epsilon=epsilon)
    alpha = 2.5 * epsilon / steps
    with eval_mode(model):
        noise = torch.rand(X.shape, generator=generator).to(X.device)
        delta = torch.clamp((2 * noise - 1) * epsilon, -X, 1 - X)
        best = delta.clone()
        done = torch.zeros(len(X), dtype=torch.bool)
        for _ in range(steps):
            delta = delta.detach().requires_grad_(True)
            logits, log_scores = detector.raw_scores(model, X + delta)
            score = detector.combine(log_scores)
            loss = F.cross_entropy(logits, y, reduction="sum") - weight * F.relu(score - detector.threshold + margin).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                ok = (logits.argmax(1) != y) & (score <= detector.threshold)
                best[ok & ~done] = delta[ok & ~done]
                done |= ok
                delta = torch.clamp(torch.clamp(delta + alpha * grad.sign(), -epsilon, epsilon), -X, 1 - X)
        with torch.no_grad():
            best[~done] = delta[~done]
    return (X + best).detach()
