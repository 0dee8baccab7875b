"""Catastrophic-overfitting guard for single-step adversarial training (FGSM-RS, N-FGSM).

Single-step training can collapse within an epoch (Wong et al.; Andriushchenko and Flammarion):
the model learns to defeat the one-step attack it is trained against while its accuracy under
a multi-step attack falls to near zero. After every epoch the guard measures FGSM and PGD
accuracy at the full training epsilon on a small fixed batch of training rows.

A collapse, measured against the best good epoch so far (highest PGD accuracy on the batch;
the untrained model counts as epoch 0), is either PGD accuracy down by at least ``guard_drop``
while the gap between FGSM and PGD accuracy widens by at least ``guard_drop`` (the one-step
attack no longer finds what the multi-step one does), or PGD accuracy no higher than the best
epoch's with FGSM accuracy above it by at least twice ``guard_drop`` (a model that overfits
the one-step attack little by little, or before its PGD accuracy ever rose far). An epoch
more robust than every earlier one is never a collapse, whatever its gap: early in a healthy
MNIST run at epsilon 0.3, FGSM accuracy leads PGD accuracy by 0.4 while PGD accuracy climbs
from 0.25 to 0.46, and going back would only lose that. Measuring against the best epoch
rather than the last one also catches a collapse spread over several epochs.

Both rules judge only a model that has had robustness to lose: the best good epoch's PGD
accuracy must be above chance (1 / classes). Before that, the only epoch to go back to is one
no more robust than the current (often the untrained model), and early epochs of small data
show a wide FGSM-PGD gap that is not a collapse: the one-step perturbation of a half-trained
net can even reveal the label (label leaking, Kurakin et al.), so FGSM accuracy exceeds clean
accuracy while PGD accuracy climbs from zero. Such a run trains on; if it never becomes
robust, the robustness gate fails it.

The answers, one per collapse: restore the best good epoch's state (model, optimizer,
schedule, random generators: an in-memory copy, never read back from a file) and train the
lost epochs again, first with the FGSM step ``alpha`` multiplied by ``guard_alpha_factor``,
then, if it collapses again, with ``guard_fallback``: PGD with ``guard_fallback_steps`` steps
of epsilon / steps from a random start (the default: one more gradient per batch, and it held
where FGSM-RS and N-FGSM did not on MNIST at epsilon 0.3), N-FGSM (de Jorge et al.: noise
2 epsilon, step epsilon, no projection) or a smaller step again. After ``guard_max_restores``
restores, training stops.
Whatever happened, the model handed back is the best good epoch's (``selected_epoch``),
never a later, worse one. Every measurement and every event is returned for the train
report, the ledger and MLflow.
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
READINGS = ("guard_fgsm_accuracy", "guard_pgd_accuracy")


class CollapseGuard:
    """Watches one ``fit``; holds the fixed batch, the best good state and the events."""

    def __init__(self, X: np.ndarray, y: np.ndarray, params: TrainParams, *, num_classes: int,
                 device: torch.device):
        adv = params.adversarial
        self.chance = 1.0 / num_classes
        self.enabled = params.mode == "adversarial" and adv.method in SINGLE_STEP and adv.guard_rows > 0
        self.params, self.epsilon = params, adv.epsilon
        self.events: list[dict[str, Any]] = []
        self.restores = 0
        self.best: dict[str, Any] | None = None  # {"epoch", "stats", "state"} of the best good epoch
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
        """Once the best good epoch's PGD accuracy is above chance, and never above it: FGSM
        accuracy above PGD accuracy by twice ``guard_drop``, or PGD accuracy down by
        ``guard_drop`` from that epoch's and the FGSM-PGD gap wider by as much."""
        drop = self.params.adversarial.guard_drop
        fgsm, pgd = stats["guard_fgsm_accuracy"], stats["guard_pgd_accuracy"]
        if self.best is None or self.best["stats"]["guard_pgd_accuracy"] <= self.chance:
            return False  # never robust yet: nothing to lose, nothing better to go back to
        good = self.best["stats"]
        if pgd > good["guard_pgd_accuracy"]:
            return False  # more robust than any earlier epoch: going back would lose robustness
        if fgsm - pgd >= 2 * drop:
            return True
        widened = (fgsm - pgd) - (good["guard_fgsm_accuracy"] - good["guard_pgd_accuracy"])
        return widened >= drop and pgd <= good["guard_pgd_accuracy"] - drop

    def remember(self, epoch: int, stats: dict[str, float], state: dict[str, Any]) -> None:
        """Keep a deep copy of a good epoch's state (``state``: whatever restoring needs) when its
        PGD accuracy is at least the best so far (a tie goes to the later epoch)."""
        if self.best is None or stats["guard_pgd_accuracy"] >= self.best["stats"]["guard_pgd_accuracy"]:
            self.best = {"epoch": epoch, "stats": {k: stats[k] for k in READINGS}, "state": copy.deepcopy(state)}

    def answer(self, *, method: str, alpha: float, steps: int) -> tuple[str, str, float, int]:
        """(action, method, alpha, steps) for the next collapse; action is ``smaller_step``,
        ``pgd``, ``n_fgsm`` or ``stop``."""
        adv = self.params.adversarial
        if self.restores >= adv.guard_max_restores:
            return "stop", method, alpha, steps
        if self.restores == 0 or method != adv.method or adv.guard_fallback == "smaller_step":
            return "smaller_step", method, alpha * adv.guard_alpha_factor, steps
        if adv.guard_fallback == "pgd":
            k = adv.guard_fallback_steps
            return "pgd", "pgd", self.epsilon / k, k
        return "n_fgsm", "n_fgsm", self.epsilon, steps  # N-FGSM's own step: epsilon, with noise 2 epsilon

    def record_collapse(self, epoch: int, stats: dict[str, float], *, method: str, alpha: float, action: str,
                        new_method: str, new_alpha: float, new_steps: int) -> dict[str, Any]:
        good = self.best or {"epoch": 0, "stats": {}}
        stopped = action == "stop"
        text = {"stop": "stopped at the best good epoch",
                "smaller_step": "restored the best good epoch, smaller step",
                "pgd": f"restored the best good epoch, switched to PGD-{new_steps}",
                "n_fgsm": "restored the best good epoch, switched to N-FGSM"}[action]
        event = {"event": "catastrophic_overfitting", "epoch": epoch, **stats,
                 "last_good_epoch": good["epoch"], "last_good": good["stats"], "method": method, "alpha": alpha,
                 "action": text, "new_method": None if stopped else new_method,
                 "new_alpha": None if stopped else new_alpha,
                 "new_steps": None if stopped or new_method == "fgsm_rs" else new_steps}
        self.events.append(event)
        self.restores += 0 if stopped else 1
        return event

    def checkpoint_state(self, *, method: str, alpha: float, steps: int) -> dict[str, Any]:
        """What a resumed run needs to go on guarding: the method and step, the events, the best good state."""
        return {"alpha": alpha, "method": method, "steps": steps, "events": self.events, "restores": self.restores,
                "best": self.best}

    def load_checkpoint_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        """Take back ``checkpoint_state``; returns the trainer's settings to restore (method, alpha, steps)."""
        self.events, self.restores = list(saved["events"]), int(saved["restores"])
        self.best = saved.get("best")
        return {k: saved[k] for k in ("method", "alpha", "steps") if k in saved}

    def report(self, *, method: str, alpha: float, steps: int, last_epoch: int) -> dict[str, Any]:
        adv = self.params.adversarial
        best = self.best or {"epoch": last_epoch, "stats": {}}
        return {"enabled": self.enabled, "rows": int(len(self.X)) if self.enabled else 0,
                "pgd_steps": GUARD_PGD_STEPS, "epsilon": self.epsilon, "drop": adv.guard_drop,
                "alpha_factor": adv.guard_alpha_factor, "max_restores": adv.guard_max_restores,
                "fallback": adv.guard_fallback, "restores": self.restores, "final_method": method,
                "final_alpha": alpha, "final_steps": 1 if method == "fgsm_rs" else steps, "events": self.events, "selected_epoch": best["epoch"],
                "selected": best["stats"], "last_epoch": last_epoch}
