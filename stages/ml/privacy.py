"""Privacy audit: empirical membership inference against a trained model (loss threshold and
a class-calibrated confidence attack). The formal guarantee of DP-SGD lives in
``stages.ml.training.dp``; this measures what an attacker can see either way.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from stages.core.errors import InvalidInput
from stages.ml.runtime import check_eval_inputs, predict_logits


def _true_class_stats(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample cross-entropy loss and logit-scaled confidence log(p_y / (1 - p_y))."""
    logits = torch.from_numpy(predict_logits(model, X)).double()
    log_p = F.log_softmax(logits, dim=1)
    log_py = log_p.gather(1, y[:, None]).squeeze(1)
    # log(1 - p_y) = logsumexp over the other classes, stable for confident models
    others = log_p.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -math.inf)
    return (-log_py).numpy(), (log_py - torch.logsumexp(others, dim=1)).numpy()


def _scores(labels: np.ndarray, score: np.ndarray) -> dict[str, float]:

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
    Xm, ym = check_eval_inputs(model, X_members, y_members)
    Xn, yn = check_eval_inputs(model, X_nonmembers, y_nonmembers)
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
