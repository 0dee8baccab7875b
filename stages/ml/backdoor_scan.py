"""Model-level backdoor scan: trigger inversion in the style of Neural Cleanse (Wang et al.,
S&P 2019).

For every class ``t`` the scan looks for the smallest *trigger* that sends clean rows of the
other classes to ``t``: a mask ``m`` (one weight per pixel, shared by the channels, or one
per table column) and a pattern ``p``, applied as ``x' = (1 - m) * x + m * p``. It
minimises ``CE(f(x'), t) + lambda * |m|_1 / D`` (D: pixels or columns) with Adam, raising
``lambda`` while at least ``success`` of the rows reach ``t`` and lowering it otherwise,
and keeps the smallest mask that reached ``t`` (its L1 norm, in pixels or columns). A
backdoored class is reachable with a much smaller trigger than the others: the *anomaly
index* of class ``t`` is how far its log trigger size lies below the median class's, in
robust standard deviations (1.4826 x the median absolute deviation of the log sizes,
floored at ``MIN_SPREAD`` so that classes of near-equal size do not give large indices).
With two classes the index is the log ratio of the two sizes over ``2 * MIN_SPREAD``.

On tables a few strong columns set to their extremes legitimately decide a class (a clean
breast-cancer model reaches "malignant" through under two columns at their maximum), which
trigger inversion cannot tell from a trigger; so a table pattern stays inside each column's
``TABLE_RANGE`` to ``1 - TABLE_RANGE`` quantiles of the clean rows, where a trigger made of a
rare combination of common values still lies. With two classes that are both backdoored
neither stands out: the index is relative.

A pure function of a model and clean rows: ``scan_backdoor(model, X, y, ...)``. Inputs
as everywhere in ``stages.ml``: float32 on the [0, 1] scale, N x C x H x W or N x F.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.core.errors import InvalidInput
from stages.ml.runtime import check_eval_inputs, eval_mode, small_model_threads

MIN_SPREAD = 0.25  # floor of the robust SD of log trigger sizes (a factor of about 1.3)
LAMBDA_START = 1.0  # weight of the mask's share of the input in the loss
LAMBDA_FACTOR = 1.5  # NC's schedule: times this after `PATIENCE` steps at target, divided when below
PATIENCE = 5
TABLE_RANGE = 0.05  # table patterns stay within each column's 5th-95th percentile of the clean rows


def _invert_class(model: nn.Module, X: torch.Tensor, target: int, *, steps: int, batch_size: int, success: float,
                  lo: torch.Tensor, hi: torch.Tensor, generator: torch.Generator) -> dict[str, Any]:
    """Smallest trigger (mask L1, in pixels or columns) that sends ``success`` of X to ``target``."""
    image = X.ndim == 4
    mask_shape = (1, 1) + tuple(X.shape[2:]) if image else (1, X.shape[1])
    D = math.prod(mask_shape)
    device = X.device
    m_raw = torch.full(mask_shape, -2.0, device=device, requires_grad=True)
    p_raw = torch.zeros((1,) + tuple(X.shape[1:]), device=device, requires_grad=True)
    opt = torch.optim.Adam([m_raw, p_raw], lr=0.1, betas=(0.5, 0.9))
    lam = LAMBDA_START
    best = math.inf
    best_success = 0.0
    up = down = 0
    want = torch.full((batch_size,), target, dtype=torch.long, device=device)
    for _ in range(steps):
        idx = torch.randint(0, len(X), (min(batch_size, len(X)),), generator=generator).to(device)
        mask = torch.sigmoid(m_raw)
        pattern = lo + (hi - lo) * torch.sigmoid(p_raw)
        out = model((1 - mask) * X[idx] + mask * pattern)
        ce = F.cross_entropy(out, want[: len(idx)])
        size = mask.sum()
        loss = ce + lam * size / D
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            reached = float((out.argmax(1) == target).float().mean())
            best_success = max(best_success, reached)
            if reached >= success:
                best = min(best, float(size))
                up, down = up + 1, 0
            else:
                up, down = 0, down + 1
            if up >= PATIENCE:
                lam *= LAMBDA_FACTOR
                up = 0
            elif down >= PATIENCE:
                lam /= LAMBDA_FACTOR ** 1.5
                down = 0
    return {"class": target, "trigger_size": best if math.isfinite(best) else float(D), "reached": math.isfinite(best),
            "best_success": round(best_success, 4), "input_size": D}


def anomaly_indices(sizes: np.ndarray) -> np.ndarray:
    """How many robust SDs each class's log trigger size lies below the median's (>= 0)."""
    logs = np.log(np.maximum(np.asarray(sizes, dtype=np.float64), 1e-3))
    med = float(np.median(logs))
    spread = max(1.4826 * float(np.median(np.abs(logs - med))), MIN_SPREAD)
    if len(logs) == 2:
        spread = 2 * MIN_SPREAD
        med = float(logs.max())
    return np.maximum(0.0, (med - logs) / spread)


def scan_backdoor(model: nn.Module, X: np.ndarray, y: np.ndarray, *, steps: int, samples: int, success: float = 0.9,
                  batch_size: int = 128, seed: int = 0) -> dict[str, Any]:
    """Neural-Cleanse-style scan of ``model`` on clean rows ``X`` (labels ``y``).

    Parameters
    ----------
    model : logits model (eval mode is set and restored).
    X : float array on the [0, 1] scale, N x C x H x W or N x F: rows the screen accepted.
    y : int labels (N,); every class needs at least one row of another class.
    steps : optimisation steps per class; samples : at most this many rows of other
        classes per class (a seeded subset); success : share of rows that must reach the
        class for a trigger to count.

    Returns
    -------
    dict with ``classes`` (per class: trigger size in pixels or columns, whether the
    success rate was reached, anomaly index), ``max_anomaly_index``, ``suspect_class``
    (the class with the largest index) and the settings.
    """
    if not (isinstance(steps, int) and steps >= 1 and isinstance(samples, int) and samples >= 1 and 0 < success <= 1):
        raise InvalidInput(f"backdoor scan needs steps >= 1, samples >= 1 and 0 < success <= 1, got {steps!r}, {samples!r}, {success!r}")
    Xt, yt = check_eval_inputs(model, X, y)
    device = next(model.parameters()).device
    with torch.no_grad(), eval_mode(model):
        K = int(model(Xt[:1].to(device)).shape[1])
    if K < 2:
        raise InvalidInput(f"backdoor scan needs a model with at least 2 classes, got {K}")
    image = Xt.ndim == 4
    if image:
        lo, hi = torch.zeros(1, device=device), torch.ones(1, device=device)
    else:
        lo, hi = (torch.quantile(Xt, q, dim=0).to(device)[None] for q in (TABLE_RANGE, 1 - TABLE_RANGE))
        hi = torch.where(hi > lo, hi, lo + 1e-3)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    results = []
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with eval_mode(model), small_model_threads(device, tuple(Xt.shape[1:])):
            for t in range(K):
                rows = np.where(yt.numpy() != t)[0]
                if len(rows) == 0:
                    raise InvalidInput(f"backdoor scan needs rows of other classes than {t}")
                if len(rows) > samples:
                    rows = np.sort(rng.choice(rows, samples, replace=False))
                results.append(_invert_class(model, Xt[rows].to(device), t, steps=steps, batch_size=batch_size,
                                             success=success, lo=lo, hi=hi, generator=gen))
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    sizes = np.array([r["trigger_size"] for r in results])
    index = anomaly_indices(sizes)
    for r, a in zip(results, index):
        r["trigger_size"] = round(float(r["trigger_size"]), 3)
        r["anomaly_index"] = round(float(a), 3)
    top = int(np.argmax(index))
    return {"method": "trigger inversion (Neural Cleanse style)", "classes": results,
            "max_anomaly_index": round(float(index[top]), 4), "suspect_class": top,
            "median_trigger_size": round(float(np.median(sizes)), 3), "steps": steps, "samples": samples,
            "success": success, "size_unit": "pixels" if image else "columns"}
