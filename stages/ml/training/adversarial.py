"""The per-batch loss of each training mode: clean cross-entropy, FGSM with random start, N-FGSM,
PGD, TRADES; with the epsilon warm-up. Epsilons and steps are on the [0, 1] input scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.core.params import TrainParams
from stages.ml.attacks import n_fgsm_delta, pgd_delta
from stages.ml.runtime import eval_mode


def _trades_adversary(model: nn.Module, X: Tensor, *, epsilon: float, alpha: float, steps: int,
                      generator: torch.Generator) -> Tensor:
    """TRADES inner maximisation: PGD on KL(model(X') || model(X)) from a small Gaussian start."""
    with eval_mode(model):
        with torch.no_grad():
            target = F.softmax(model(X), dim=1)
        noise = torch.randn(X.shape, generator=generator, device=generator.device, dtype=X.dtype).to(X.device)
        X_adv = torch.clamp(X + 0.001 * noise, 0, 1)
        for _ in range(steps):
            X_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(X_adv), dim=1), target, reduction="sum")
            (grad,) = torch.autograd.grad(kl, X_adv)
            X_adv = torch.min(torch.max(X_adv.detach() + alpha * grad.sign(), X - epsilon), X + epsilon).clamp(0, 1)
    return X_adv.detach()


class BatchLoss:
    """One mode's per-batch loss; holds the attack generator and the epsilon warm-up."""

    def __init__(self, params: TrainParams, *, steps_per_epoch: int, device: torch.device):
        self.params, self.adv = params, params.adversarial
        self.warmup_steps = self.adv.warmup_epochs * steps_per_epoch
        self.generator = torch.Generator(device=device).manual_seed(params.seed + 1)
        # the collapse guard may switch a single-step method to its fallback (method, steps, alpha)
        self.method = method = self.adv.method
        self.steps = self.adv.pgd_steps
        if self.adv.alpha is not None:
            self.alpha = self.adv.alpha
        elif method == "fgsm_rs":
            self.alpha = 1.25 * self.adv.epsilon
        elif method == "n_fgsm":
            self.alpha = self.adv.epsilon
        else:
            self.alpha = 2.5 * self.adv.epsilon / self.adv.pgd_steps

    def epsilon_at(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return self.adv.epsilon
        return self.adv.epsilon * min(1.0, (step + 1) / self.warmup_steps)

    def loss(self, model: nn.Module, xb: Tensor, yb: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(mean loss, logits the accuracy is measured on) for one batch."""
        p = self.params
        if p.mode != "adversarial":
            logits = model(xb)
            return F.cross_entropy(logits, yb), logits
        eps = self.epsilon_at(step)
        alpha = self.alpha * eps / self.adv.epsilon
        if self.method == "trades":
            X_adv = _trades_adversary(model, xb, epsilon=eps, alpha=alpha, steps=self.adv.pgd_steps,
                                      generator=self.generator)
            logits = model(xb)
            robust = F.kl_div(F.log_softmax(model(X_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
            return F.cross_entropy(logits, yb) + self.adv.trades_beta * robust, logits
        with eval_mode(model):
            if self.method == "n_fgsm":
                delta = n_fgsm_delta(model, xb, yb, epsilon=eps, alpha=alpha, noise=2 * eps, generator=self.generator)
            else:
                steps = 1 if self.method == "fgsm_rs" else self.steps
                delta = pgd_delta(model, xb, yb, epsilon=eps, alpha=alpha, steps=steps, random_start=True,
                                  generator=self.generator)
        logits = model(xb + delta)
        return F.cross_entropy(logits, yb), logits
