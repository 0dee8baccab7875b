"""Robustness evaluation: accuracy under FGSM and PGD with restarts at each epsilon, and the
robustness curve. Epsilons are L-inf budgets on the [0, 1] input scale. Pure functions of a
model and arrays, except ``plot_robustness_curve`` which writes one PNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.core.errors import InvalidInput
from stages.ml.attacks import attack_fgsm, attack_pgd
from stages.ml.runtime import check_eval_inputs, eval_mode, small_model_threads


@dataclass(frozen=True)
class RobustnessReport:
    """Accuracies on clean inputs and under attack, per epsilon (on the [0, 1] input scale).

    ``correct`` is an N x len(columns) boolean matrix: column ``"clean"``, then
    ``"fgsm@<eps>"`` and ``"pgd@<eps>"`` for each epsilon. ``robust_accuracy[eps]`` counts
    a sample only when it is right on clean input and under every attack at that epsilon.
    """

    clean_accuracy: float
    epsilons: list[float]
    fgsm_accuracy: dict[float, float]
    pgd_accuracy: dict[float, float]
    robust_accuracy: dict[float, float]
    correct: np.ndarray
    columns: list[str]
    pgd_steps: int
    restarts: int
    n_samples: int = field(default=0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; epsilon keys become strings such as ``"0.1"``."""
        keyed = lambda d: {str(float(k)): float(v) for k, v in d.items()}  # noqa: E731
        return {"clean_accuracy": float(self.clean_accuracy), "epsilons": [float(e) for e in self.epsilons],
                "fgsm_accuracy": keyed(self.fgsm_accuracy), "pgd_accuracy": keyed(self.pgd_accuracy),
                "robust_accuracy": keyed(self.robust_accuracy), "columns": list(self.columns),
                "pgd_steps": self.pgd_steps, "pgd_alpha": "2.5 * epsilon / pgd_steps", "restarts": self.restarts,
                "n_samples": self.n_samples, "epsilon_scale": "[0, 1] input scale"}


def evaluate_robustness(model: nn.Module, X: np.ndarray, y: np.ndarray, *, epsilons: list[float], pgd_steps: int,
                        restarts: int, batch_size: int = 256, seed: int = 0) -> RobustnessReport:
    """Clean, FGSM and PGD accuracy of ``model`` on (X, y) at each L-inf epsilon ([0, 1] scale).

    PGD takes ``pgd_steps`` steps of ``2.5 * epsilon / pgd_steps`` from ``restarts`` random
    starts (seeded by ``seed``) and keeps, per sample, the start that fools the model.
    """
    X, y = check_eval_inputs(model, X, y)
    eps_list = [float(e) for e in epsilons]
    if not eps_list or any(not (math.isfinite(e) and 0 < e <= 1) for e in eps_list):
        raise InvalidInput(f"epsilons must be a non-empty list in (0, 1] (the [0, 1] input scale), got {epsilons!r}")
    if pgd_steps < 1 or restarts < 1 or batch_size < 1:
        raise InvalidInput(f"pgd_steps, restarts and batch_size must be >= 1, got {pgd_steps}, {restarts}, {batch_size}")
    device = next(model.parameters()).device
    columns = ["clean"] + [f"{name}@{e:g}" for e in eps_list for name in ("fgsm", "pgd")]
    correct = np.zeros((len(X), len(columns)), dtype=bool)
    generator = torch.Generator(device=device).manual_seed(seed)
    with eval_mode(model), small_model_threads(device, tuple(X.shape[1:])):
        for start in range(0, len(X), batch_size):
            xb, yb = X[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            rows = slice(start, start + len(xb))
            col = 0
            with torch.no_grad():
                correct[rows, col] = (model(xb).argmax(1) == yb).cpu().numpy()
            for eps in eps_list:
                for adv in (attack_fgsm(model, xb, yb, epsilon=eps),
                            attack_pgd(model, xb, yb, epsilon=eps, alpha=2.5 * eps / pgd_steps, steps=pgd_steps,
                                       restarts=restarts, random_start=True, generator=generator)):
                    col += 1
                    with torch.no_grad():
                        correct[rows, col] = (model(adv).argmax(1) == yb).cpu().numpy()
    acc = correct.mean(axis=0)
    fgsm = {e: float(acc[1 + 2 * i]) for i, e in enumerate(eps_list)}
    pgd = {e: float(acc[2 + 2 * i]) for i, e in enumerate(eps_list)}
    robust = {e: float((correct[:, 0] & correct[:, 1 + 2 * i] & correct[:, 2 + 2 * i]).mean())
              for i, e in enumerate(eps_list)}
    return RobustnessReport(clean_accuracy=float(acc[0]), epsilons=eps_list, fgsm_accuracy=fgsm, pgd_accuracy=pgd,
                            robust_accuracy=robust, correct=correct, columns=columns, pgd_steps=pgd_steps,
                            restarts=restarts, n_samples=len(X))


def plot_robustness_curve(report: RobustnessReport, path: Path | str) -> Path:
    """Accuracy against epsilon ([0, 1] scale) for FGSM, PGD and worst case, as a PNG."""
    from matplotlib.backends.backend_agg import (
        FigureCanvasAgg,  # matplotlib: only when a curve is drawn
    )
    from matplotlib.figure import Figure  # matplotlib: only when a curve is drawn

    eps = [0.0] + list(report.epsilons)
    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, values, style in (("FGSM", report.fgsm_accuracy, "o--"), ("PGD", report.pgd_accuracy, "s-"),
                                ("worst case", report.robust_accuracy, "^:")):
        ax.plot(eps, [report.clean_accuracy] + [values[e] for e in report.epsilons], style, label=name)
    ax.set_xlabel("L-inf epsilon ([0, 1] input scale)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"PGD-{report.pgd_steps} x {report.restarts} restarts, n = {report.n_samples}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
