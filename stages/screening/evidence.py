"""Evidence several detectors share: K-fold out-of-sample probabilities (an RBF SVC and a small
network) and a briefly trained screening network's loss curves and penultimate features.

The data stay on the CPU; the networks run on ``screen.device`` (CUDA when present)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import SVC

from stages.core.errors import InvalidInput
from stages.core.params import ScreenParams
from stages.ml.nets import build_model
from stages.ml.runtime import resolve_device

SVC_MAX_ROWS = 10_000  # rows an RBF SVC is fitted on (a seeded random subset above this)


def _torch_seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _net_for(X: np.ndarray, num_classes: int) -> torch.nn.Module:
    """The screening network: the small CNN for images of any size, the MLP for rows.

    Screening only needs a network that learns what the data teaches (shortcuts included),
    not the final architecture; on 28x28 images the small CNN costs a quarter of the MNIST
    net per epoch."""
    shape = tuple(X.shape[1:])
    name = "cnn_small" if len(shape) == 3 and min(shape[1:]) >= 2 else "auto"
    return build_model(name, input_shape=shape, num_classes=num_classes)


def _train_net(X: np.ndarray, y: np.ndarray, num_classes: int, *, epochs: int, seed: int, track_loss: bool = False, lr: float = 3e-3, batch_size: int = 64,
               device: torch.device | None = None) -> tuple[torch.nn.Module, np.ndarray]:
    """Plain Adam training; returns the model (eval mode, on ``device``, CPU by default) and
    per-epoch per-row losses. The data stay on the CPU; each batch moves to ``device``."""
    gen = _torch_seed(seed)
    device = device or torch.device("cpu")
    model = _net_for(X, num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    losses = []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(X), generator=gen)
        for start in range(0, len(X), batch_size):
            b = perm[start : start + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(Xt[b].to(device)), yt[b].to(device)).backward()
            opt.step()
        if track_loss:
            model.eval()
            with torch.no_grad():
                losses.append(_batched(model, Xt, lambda out, sl: F.cross_entropy(out, yt[sl], reduction="none")))
    model.eval()
    return model, np.array(losses, dtype=np.float32)


def _batched(model: torch.nn.Module, Xt: torch.Tensor, fn: Callable[[torch.Tensor, slice], torch.Tensor], batch: int = 1024, *, forward: str = "forward") -> np.ndarray:
    """``fn(model.<forward>(batch) on the CPU, slice)`` over CPU tensor ``Xt``, concatenated."""
    device = next(model.parameters()).device
    call = getattr(model, forward)
    parts = []
    with torch.no_grad():
        for s in range(0, len(Xt), batch):
            sl = slice(s, s + batch)
            parts.append(fn(call(Xt[sl].to(device)).float().cpu(), sl).numpy())
    return np.concatenate(parts)


def _softmax_of(model: torch.nn.Module, X: np.ndarray) -> np.ndarray:
    return _batched(model, torch.from_numpy(X), lambda out, sl: torch.softmax(out, 1))


def _features_of(model: torch.nn.Module, X: np.ndarray) -> np.ndarray:
    return _batched(model, torch.from_numpy(X), lambda out, sl: out, forward="features_of")


def _svc_rows(rows: np.ndarray, seed: int) -> np.ndarray:
    """At most ``SVC_MAX_ROWS`` of ``rows`` (a seeded random subset) for fitting an RBF SVC,
    whose cost grows about as n^1.9 (8,000 MNIST rows: 18 s; 48,000 would take minutes per
    fit). The network still learns from every row."""
    if len(rows) <= SVC_MAX_ROWS:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, SVC_MAX_ROWS, replace=False))


def _fold_probs(X: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray, num_classes: int, params: ScreenParams,
                fold: int) -> np.ndarray:
    """Out-of-sample probabilities of rows ``te`` from an RBF SVC and the screening network
    fitted on rows ``tr`` (one fold; seeded by ``params.seed + fold``, so it gives the same
    answer in any process)."""
    torch.set_num_threads(1)  # tiny networks: one intra-op thread (see screen_dataset)
    flat = X.reshape(len(X), -1)
    sub = _svc_rows(tr, params.seed + fold)
    present = np.unique(y[sub])
    svc = CalibratedClassifierCV(SVC(C=10.0, gamma="scale"), method="sigmoid", cv=3, ensemble=False).fit(flat[sub], y[sub])
    p_svc = np.zeros((len(te), num_classes))
    p_svc[:, present] = svc.predict_proba(flat[te])
    epochs = max(2, min(params.backdoor_epochs, 5))
    model, _ = _train_net(X[tr], y[tr], num_classes, epochs=epochs, seed=params.seed + fold,
                          device=resolve_device(params.device, "screen.device"))
    p_net = _softmax_of(model, X[te])
    return 0.5 * p_svc + 0.5 * p_net


def oos_folds(y: np.ndarray, num_classes: int, params: ScreenParams) -> list[tuple[np.ndarray, np.ndarray]]:
    """The stratified K folds (train rows, held-out rows) of the out-of-sample probabilities."""
    counts = np.bincount(y, minlength=num_classes)
    folds = min(params.folds, int(counts[counts > 0].min()))
    if folds < 2:
        raise InvalidInput("label_issues needs at least 2 rows in every class")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=params.seed)
    return list(splitter.split(np.zeros(len(y)), y))


def combine_folds(parts: list[np.ndarray], folds: list[tuple[np.ndarray, np.ndarray]], n: int, num_classes: int) -> np.ndarray:
    probs = np.zeros((n, num_classes), dtype=np.float64)
    for (_, te), p in zip(folds, parts):
        probs[te] = p
    probs = np.clip(probs, 1e-6, None)
    return probs / probs.sum(1, keepdims=True)


def _oos_pred_probs(X: np.ndarray, y: np.ndarray, num_classes: int, params: ScreenParams) -> np.ndarray:
    """K-fold out-of-sample probabilities: mean of an RBF SVC and the screening network."""
    folds = oos_folds(y, num_classes, params)
    parts = [_fold_probs(X, y, tr, te, num_classes, params, fold) for fold, (tr, te) in enumerate(folds)]
    return combine_folds(parts, folds, len(X), num_classes)


def _train_screening_net(X: np.ndarray, y: np.ndarray, num_classes: int, params: ScreenParams) -> dict[str, np.ndarray]:
    model, losses = _train_net(X, y, num_classes, epochs=params.backdoor_epochs, seed=params.seed, track_loss=True,
                               device=resolve_device(params.device, "screen.device"))
    return {"losses": losses, "features": _features_of(model, X)}
