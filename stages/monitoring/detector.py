"""Adversarial and out-of-distribution input detector, calibrated on the pipeline's own data.

Three scores per input, all from one forward pass, each blind to a different evasion:

* ``mahalanobis``: distance of the model's penultimate features to the nearest class mean
  under a shared covariance fitted on the accepted training rows (Lee et al., 2018);
* ``residual``: the input's squared distance to the principal subspace of the training
  inputs (catches noise and other inputs far from the data manifold);
* ``uncertainty``: entropy of the class probabilities.

Feature squeezing (Xu et al., 2018) was tried as a fourth score: the logistic regression gave
it a weight of -0.04 on digits (it added nothing the others did not catch) while its squeezed
copies tripled the cost of every prediction, so it was left out.

A logistic regression on the standardised log-scores separates clean held-out rows from PGD
samples made on them (at the calibration epsilons) and from uniform noise; the alarm
threshold is the conformal ``1 - target_fpr`` quantile of the combined score on clean held-out rows.
Calibration uses one half of the held-out rows, and the report measures the other half, so
the figures it shows were not fitted. Every score is a differentiable torch function of the input, so an attacker who knows the
detector can follow its gradient (``stages.monitoring.adaptive``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.core.errors import InvalidInput
from stages.ml.attacks import attack_pgd
from stages.ml.runtime import eval_mode

SCORES = ("mahalanobis", "residual", "uncertainty")
PCA_VARIANCE = 0.95     # share of the training inputs' variance the principal subspace keeps
PGD_STEPS = 10


def features_and_logits(model: nn.Module, X: Tensor) -> tuple[Tensor, Tensor]:
    """Penultimate features (``features_of`` when the net has it, else the logits) and logits."""
    if hasattr(model, "features_of") and hasattr(model, "head"):
        feats = model.features_of(X)
        return feats, model.head(feats)
    logits = model(X)
    return logits, logits


@dataclass
class AdversarialDetector:
    """A calibrated detector; ``score`` gives the combined score and the alarm per input."""

    class_means: Tensor          # K x D, penultimate features
    precision: Tensor            # D x D, inverse of the shared (shrunk) covariance
    pca_mean: Tensor             # F, training inputs
    pca_basis: Tensor            # F x r, orthonormal
    score_mean: Tensor           # S, of the log-scores on clean calibration rows
    score_std: Tensor            # S
    coef: Tensor                 # S, logistic regression weights
    intercept: float
    threshold: float             # combined score above this raises the alarm
    target_fpr: float
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # precision = L L^T: squared Mahalanobis distances are Euclidean after whitening by L
        self._whiten = torch.linalg.cholesky(self.precision.double()).float()
        self._means_w = self.class_means @ self._whiten

    def raw_scores(self, model: nn.Module, X: Tensor) -> tuple[Tensor, Tensor]:
        """(logits N x K, log-scores N x S) as differentiable functions of ``X``."""
        feats, logits = features_and_logits(model, X)
        return logits, self.log_scores(feats, logits, X)

    def log_scores(self, feats: Tensor, logits: Tensor, X: Tensor) -> Tensor:
        """Log-scores N x S of inputs ``X`` from their penultimate features and logits."""
        maha = torch.cdist(feats @ self._whiten, self._means_w).min(dim=1).values.pow(2)
        probs = F.softmax(logits, dim=1)
        centred = X.reshape(len(X), -1) - self.pca_mean
        residual = (centred - (centred @ self.pca_basis) @ self.pca_basis.T).pow(2).sum(dim=1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=1)
        raw = torch.stack([maha.clamp_min(0), residual, entropy], dim=1)
        return torch.log1p(raw)

    def combine(self, log_scores: Tensor) -> Tensor:
        return ((log_scores - self.score_mean) / self.score_std) @ self.coef + self.intercept

    @torch.no_grad()
    def score(self, model: nn.Module, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, combined score N, flagged N bool) for a batch on the model's input scale."""
        logits, log_scores = self.raw_scores(model, X)
        combined = self.combine(log_scores)
        return logits, combined, combined > self.threshold

    @torch.no_grad()
    def score_features(self, feats: Tensor, logits: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
        """(combined score N, flagged N bool) from a forward pass already made
        (``features_and_logits``): the same figures as ``score``, computed later and in batches."""
        combined = self.combine(self.log_scores(feats, logits, X))
        return combined, combined > self.threshold


def _fit_statistics(model: nn.Module, X_train: Tensor, y_train: np.ndarray, num_classes: int):
    with torch.no_grad():
        feats, _ = features_and_logits(model, X_train)
    feats = feats.double()
    means = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64)
    centred = []
    for c in range(num_classes):
        rows = feats[torch.as_tensor(y_train == c)]
        if len(rows):
            means[c] = rows.mean(dim=0)
            centred.append(rows - means[c])
    centred = torch.cat(centred)
    cov = centred.T @ centred / max(1, len(centred) - 1)
    shrink = 1e-3 * torch.trace(cov) / cov.shape[0] + 1e-9
    precision = torch.linalg.inv(cov + shrink * torch.eye(cov.shape[0], dtype=torch.float64))
    flat = X_train.reshape(len(X_train), -1).double()
    pca_mean = flat.mean(dim=0)
    _, s, vh = torch.linalg.svd(flat - pca_mean, full_matrices=False)
    share = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(1e-12)
    r = int(min(len(s) - 1, int((share < PCA_VARIANCE).sum()) + 1)) if len(s) > 1 else 1
    return means.float(), precision.float(), pca_mean.float(), vh[:max(1, r)].T.contiguous().float()


def _pgd(model: nn.Module, X: Tensor, y: Tensor, *, epsilon: float, seed: int) -> Tensor:
    gen = torch.Generator(device=X.device).manual_seed(seed)
    return attack_pgd(model, X, y, epsilon=epsilon, alpha=2.5 * epsilon / PGD_STEPS, steps=PGD_STEPS, restarts=1,
                      generator=gen)


def calibrate_detector(model: nn.Module, *, X_train: np.ndarray, y_train: np.ndarray, X_held: np.ndarray,
                       y_held: np.ndarray, num_classes: int, epsilons: list[float], target_fpr: float,
                       seed: int = 0) -> AdversarialDetector:
    """Fit the detector on the champion's accepted training rows and held-out rows.

    Parameters
    ----------
    X_train, y_train : arrays, shapes (N, ...) and (N,)
        Accepted training rows (float32 on [0, 1], the model's input shape) and labels.
    X_held, y_held : arrays, shapes (M, ...) and (M,)
        Held-out rows the model was not trained on; half calibrate, half measure.
    epsilons : list of float
        PGD budgets (L-inf, [0, 1] input scale) of the adversarial calibration samples.
    target_fpr : float
        Share of clean inputs allowed to raise the alarm.
    """
    from sklearn.linear_model import (
        LogisticRegression,  # scikit-learn: slow to import, only calibration needs it
    )

    if len(X_held) < 20 or len(X_train) < num_classes:
        raise InvalidInput(f"detector calibration needs at least 20 held-out rows and one training row per class, "
                           f"got {len(X_held)} held-out and {len(X_train)} training rows")
    if not epsilons or any(not (0 < e <= 1) for e in epsilons):
        raise InvalidInput(f"calibration epsilons must lie in (0, 1], got {epsilons}")
    torch.manual_seed(seed)
    with eval_mode(model):
        means, precision, pca_mean, basis = _fit_statistics(model, torch.as_tensor(X_train), y_train, num_classes)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(X_held))
        halves = order[: len(order) // 2], order[len(order) // 2:]
        probe = AdversarialDetector(means, precision, pca_mean, basis, torch.zeros(len(SCORES)), torch.ones(len(SCORES)),
                                    torch.zeros(len(SCORES)), 0.0, math.inf, target_fpr)
        sets = []
        for h, idx in enumerate(halves):
            X = torch.as_tensor(X_held[idx])
            y = torch.as_tensor(y_held[idx]).long()
            groups = {"clean": X}
            for e in epsilons:
                groups[f"pgd_{e:g}"] = _pgd(model, X, y, epsilon=e, seed=seed + h)
            gen = torch.Generator().manual_seed(seed + 10 + h)
            groups["noise"] = torch.rand(X.shape, generator=gen)
            with torch.no_grad():
                sets.append({k: (probe.raw_scores(model, v)[1], v, y) for k, v in groups.items()})
    fit = sets[0]
    clean = fit["clean"][0]
    mean, std = clean.mean(dim=0), clean.std(dim=0).clamp_min(1e-6)
    Z = torch.cat([(s[0] - mean) / std for s in fit.values()]).numpy()
    labels = np.concatenate([np.full(len(s[0]), int(k != "clean")) for k, s in fit.items()])
    lr = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000).fit(Z, labels)
    det = AdversarialDetector(means, precision, pca_mean, basis, mean, std,
                              torch.as_tensor(lr.coef_[0], dtype=torch.float32), float(lr.intercept_[0]), math.inf,
                              target_fpr)
    clean_fit = np.sort(det.combine(clean).numpy())
    # the conformal quantile: the ceil((n + 1)(1 - fpr))-th smallest clean score, so a new clean
    # input raises the alarm with probability at most target_fpr (in expectation over calibrations)
    rank = min(len(clean_fit), int(math.ceil((len(clean_fit) + 1) * (1 - target_fpr))))
    det.threshold = float(clean_fit[rank - 1])
    det.report = _report(model, det, sets[1], epsilons, n_fit=len(halves[0]))
    return det


def _report(model: nn.Module, det: AdversarialDetector, held: dict[str, tuple[Tensor, Tensor, Tensor]],
            epsilons: list[float], *, n_fit: int) -> dict[str, Any]:
    """Alarm rates on the half of the held-out rows that calibration did not see."""
    out: dict[str, Any] = {"target_fpr": det.target_fpr, "threshold": det.threshold, "calibration_rows": n_fit,
                           "measured_rows": len(held["clean"][0]), "weights": dict(zip(SCORES, det.coef.tolist()))}
    flags = {k: (det.combine(s[0]) > det.threshold) for k, s in held.items()}
    out["false_positive_rate"] = round(float(flags["clean"].float().mean()), 4)
    out["noise_detection_rate"] = round(float(flags["noise"].float().mean()), 4)
    with torch.no_grad():
        for e in epsilons:
            _, X_adv, y = held[f"pgd_{e:g}"]
            fooled = model(X_adv).argmax(1) != y
            key = f"{e:g}"
            out.setdefault("pgd_detection_rate", {})[key] = round(float(flags[f"pgd_{e:g}"].float().mean()), 4)
            out.setdefault("pgd_success_rate", {})[key] = round(float(fooled.float().mean()), 4)
            undetected = fooled & ~flags[f"pgd_{e:g}"]
            out.setdefault("pgd_evasion_rate", {})[key] = round(float(undetected.float().mean()), 4)
    return out
