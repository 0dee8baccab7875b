"""Evaluation core: accuracy under FGSM and PGD with restarts, and a membership-inference audit.

Epsilons are L-inf budgets on the [0, 1] input scale. Everything here is a pure function
of a model and arrays, except ``plot_robustness_curve`` which writes one PNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.attacks import attack_fgsm, attack_pgd, eval_mode
from stages.errors import InvalidInput
from stages.training import predict_logits, small_model_threads


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


def _check_eval_inputs(model: nn.Module, X: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise InvalidInput(f"model must be a torch.nn.Module, got {type(model).__name__}")
    X = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X, dtype=torch.float32).cpu()
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).cpu()
    if X.ndim < 2 or y.ndim != 1 or len(X) != len(y) or len(X) == 0:
        raise InvalidInput(f"X must be N x ... and y of length N > 0, got X {tuple(X.shape)} and y {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise InvalidInput(f"y must hold integer labels, got dtype {y.dtype}")
    if not torch.isfinite(X).all() or X.min() < 0 or X.max() > 1:
        raise InvalidInput(f"X must be finite and lie in [0, 1], got values in [{X.min().item():g}, {X.max().item():g}]")
    return X, y.long()


def evaluate_robustness(model: nn.Module, X: np.ndarray, y: np.ndarray, *, epsilons: list[float], pgd_steps: int,
                        restarts: int, batch_size: int = 256, seed: int = 0) -> RobustnessReport:
    """Clean, FGSM and PGD accuracy of ``model`` on (X, y) at each L-inf epsilon ([0, 1] scale).

    PGD takes ``pgd_steps`` steps of ``2.5 * epsilon / pgd_steps`` from ``restarts`` random
    starts (seeded by ``seed``) and keeps, per sample, the start that fools the model.
    """
    X, y = _check_eval_inputs(model, X, y)
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


def _true_class_stats(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample cross-entropy loss and logit-scaled confidence log(p_y / (1 - p_y))."""
    logits = torch.from_numpy(predict_logits(model, X)).double()
    log_p = F.log_softmax(logits, dim=1)
    log_py = log_p.gather(1, y[:, None]).squeeze(1)
    # log(1 - p_y) = logsumexp over the other classes, stable for confident models
    others = log_p.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -math.inf)
    return (-log_py).numpy(), (log_py - torch.logsumexp(others, dim=1)).numpy()


def _scores(labels: np.ndarray, score: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(labels, score)
    return {"auc": float(roc_auc_score(labels, score)), "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max()),
            "advantage": float(np.max(tpr - fpr))}


def _class_calibrated(conf: np.ndarray, y: np.ndarray, is_member: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Standardise logit-scaled confidence by the non-members of the same class in the other fold.

    An offline LiRA with per-class instead of per-example reference statistics: the
    attacker knows population data (non-members) and asks how far above its class's usual
    confidence a sample sits. Two-fold cross-fitting keeps each non-member out of its own
    calibration.
    """
    score = np.zeros_like(conf)
    for k in (0, 1):
        ref = (fold != k) & ~is_member
        g_mu, g_sd = conf[ref].mean(), conf[ref].std() + 1e-6
        for c in np.unique(y[fold == k]):
            rows = (fold == k) & (y == c)
            ref_c = ref & (y == c)
            mu, sd = (conf[ref_c].mean(), conf[ref_c].std() + 1e-6) if ref_c.sum() >= 3 else (g_mu, g_sd)
            score[rows] = (conf[rows] - mu) / sd
    return score


def membership_inference_audit(model: nn.Module, X_members: np.ndarray, y_members: np.ndarray,
                               X_nonmembers: np.ndarray, y_nonmembers: np.ndarray, *, seed: int = 0) -> dict[str, Any]:
    """Empirical membership-inference audit on balanced members / non-members.

    Two attacks: ``loss`` (the loss-threshold attack of Yeom et al., score = -loss) and
    ``class_calibrated`` (logit-scaled confidence standardised per class against held-out
    non-members). Top-level ``auc`` and ``tpr_at_1pct_fpr`` come from the stronger one
    (higher AUC); 0.5 AUC means the model leaks nothing these attacks can see.
    """
    Xm, ym = _check_eval_inputs(model, X_members, y_members)
    Xn, yn = _check_eval_inputs(model, X_nonmembers, y_nonmembers)
    n = min(len(Xm), len(Xn))
    if n < 2:
        raise InvalidInput(f"need at least 2 members and 2 non-members, got {len(Xm)} and {len(Xn)}")
    rng = np.random.default_rng(seed)
    take_m = torch.from_numpy(np.sort(rng.choice(len(Xm), size=n, replace=False)))
    take_n = torch.from_numpy(np.sort(rng.choice(len(Xn), size=n, replace=False)))
    X, y = torch.cat([Xm[take_m], Xn[take_n]]), torch.cat([ym[take_m], yn[take_n]])
    is_member = np.r_[np.ones(n, dtype=bool), np.zeros(n, dtype=bool)]
    loss, conf = _true_class_stats(model, X, y)
    fold = np.r_[rng.permutation(n) % 2, rng.permutation(n) % 2]
    attacks = {"loss": _scores(is_member, -loss),
               "class_calibrated": _scores(is_member, _class_calibrated(conf, y.numpy(), is_member, fold))}
    strongest = max(attacks, key=lambda name: attacks[name]["auc"])
    return {"attack": strongest, "auc": attacks[strongest]["auc"],
            "tpr_at_1pct_fpr": attacks[strongest]["tpr_at_1pct_fpr"], "attacks": attacks,
            "n_members": n, "n_nonmembers": n, "member_loss_mean": float(loss[:n].mean()),
            "nonmember_loss_mean": float(loss[n:].mean()), "seed": seed}


def plot_robustness_curve(report: RobustnessReport, path: Path | str) -> Path:
    """Accuracy against epsilon ([0, 1] scale) for FGSM, PGD and worst case, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
