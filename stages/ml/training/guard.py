"""Catastrophic-overfitting guard for single-step adversarial training (FGSM-RS, N-FGSM).

Single-step training can collapse within an epoch (Wong et al.; Andriushchenko and Flammarion):
the model learns to defeat the one-step attack it is trained against while its accuracy under
a multi-step attack falls to near zero. After every epoch the guard measures FGSM and PGD
accuracy at the full training epsilon on a small fixed batch of training rows. A collapse is
PGD accuracy falling by at least ``guard_drop`` below that of the last good epoch while FGSM
accuracy rises above it. The answer: restore the last good epoch's state (model, optimizer,
schedule, random generators: an in-memory copy, never read back from a file), multiply the
FGSM step ``alpha`` by ``guard_alpha_factor`` and train the lost epochs again. After
``guard_max_restores`` restores, training stops at the last good state. Every measurement and
every event is returned for the train report, the ledger and MLflow.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.core.params import TrainParams
from stages.ml.attacks import attack_fgsm, attack_pgd
from stages.ml.runtime import eval_mode

SINGLE_STEP = ("fgsm_rs", "n_fgsm")
GUARD_PGD_STEPS = 10  # PGD-10, one restart, step 2.5 * epsilon / 10: cheap and far stronger than FGSM


class CollapseGuard:
    """Watches one ``fit``; holds the fixed batch, the last good state and the events."""

    def __init__(self, X: np.ndarray, y: np.ndarray, params: TrainParams, *, device: torch.device):
        adv = params.adversarial
        self.enabled = params.mode == "adversarial" and adv.method in SINGLE_STEP and adv.guard_rows > 0
        self.params, self.epsilon = params, adv.epsilon
        self.events: list[dict[str, Any]] = []
        self.restores = 0
        self.last_good: dict[str, Any] | None = None
        if self.enabled:
            rows = np.random.default_rng(params.seed + 2).choice(len(X), size=min(adv.guard_rows, len(X)), replace=False)
            self.X = torch.from_numpy(X[np.sort(rows)]).to(device)
            self.y = torch.from_numpy(y[np.sort(rows)]).to(device)

    def measure(self, model: nn.Module) -> dict[str, float]:
        """FGSM and PGD-10 accuracy at the full epsilon on the fixed batch (fixed PGD start)."""
        generator = torch.Generator(device=self.X.device).manual_seed(self.params.seed + 3)
        with eval_mode(model), torch.autocast(self.X.device.type, enabled=False):
            fgsm = attack_fgsm(model, self.X, self.y, epsilon=self.epsilon)
            pgd = attack_pgd(model, self.X, self.y, epsilon=self.epsilon, alpha=2.5 * self.epsilon / GUARD_PGD_STEPS,
                             steps=GUARD_PGD_STEPS, restarts=1, generator=generator)
            with torch.no_grad():
                return {"guard_fgsm_accuracy": float((model(fgsm).argmax(1) == self.y).float().mean()),
                        "guard_pgd_accuracy": float((model(pgd).argmax(1) == self.y).float().mean())}

    def collapsed(self, stats: dict[str, float]) -> bool:
        if self.last_good is None:
            return False
        good = self.last_good["stats"]
        return (stats["guard_pgd_accuracy"] <= good["guard_pgd_accuracy"] - self.params.adversarial.guard_drop
                and stats["guard_fgsm_accuracy"] > good["guard_fgsm_accuracy"])

    def remember(self, epoch: int, stats: dict[str, float], state: dict[str, Any]) -> None:
        """Keep a deep copy of a good epoch's state (``state``: whatever restoring needs)."""
        self.last_good = {"epoch": epoch, "stats": dict(stats), "state": copy.deepcopy(state)}

    def record_collapse(self, epoch: int, stats: dict[str, float], *, alpha: float, new_alpha: float,
                        stopped: bool) -> dict[str, Any]:
        good = self.last_good or {"epoch": 0, "stats": {}}
        event = {"event": "catastrophic_overfitting", "epoch": epoch, **stats,
                 "last_good_epoch": good["epoch"], "last_good": good["stats"], "alpha": alpha,
                 "action": "stopped at the last good epoch" if stopped else "restored the last good epoch",
                 "new_alpha": None if stopped else new_alpha}
        self.events.append(event)
        self.restores += 0 if stopped else 1
        return event

    def report(self, alpha: float) -> dict[str, Any]:
        adv = self.params.adversarial
        return {"enabled": self.enabled, "rows": int(len(self.X)) if self.enabled else 0,
                "pgd_steps": GUARD_PGD_STEPS, "epsilon": self.epsilon, "drop": adv.guard_drop,
                "alpha_factor": adv.guard_alpha_factor, "max_restores": adv.guard_max_restores,
                "restores": self.restores, "final_alpha": alpha, "events": self.events}
