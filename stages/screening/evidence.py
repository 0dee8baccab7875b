"""Evidence several detectors share: K-fold out-of-sample probabilities of a few models (images:
the screening network and nearest neighbours; tables: logistic regression, an RBF SVC and
nearest neighbours on standardised columns) and a briefly trained screening network's loss
curves.

The data stay on the CPU; the networks run on ``screen.device`` (CUDA when present)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC

from stages.core.errors import InvalidInput
from stages.core.params import ScreenParams
from stages.ml.nets import build_model
from stages.ml.runtime import one_intra_op_thread, resolve_device

SVC_MAX_ROWS = 10_000  # rows an RBF SVC is fitted on (a seeded random subset above this)
# rows a fold network trains on (epochs x rows) at most. Up to 20,000 rows a fold, all 5 epochs
# (digits: 7,200; a 10,000-row MNIST sample, where detection is measured: 40,000); full
# MNIST's 48,000-row folds train about 2 epochs, in which a backdoor's poisoned rows still pass
# through the network more often in all than in that sample. The folds were two thirds of a
# full-MNIST screen.
FOLD_MAX_SAMPLES = 100_000
KNN_NEIGHBOURS = 10
IMAGE_MODELS = ("net", "knn")  # an RBF SVC added nothing on digits (F1 0.970 without, 0.971 with) and dominated MNIST's cost
TABLE_MODELS = ("logreg", "svc", "knn")
VIEW_MAX_SIDE = 16


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
               device: torch.device | None = None, max_samples: int | None = None) -> tuple[torch.nn.Module, np.ndarray]:
    """Plain Adam training; returns the model (eval mode, on ``device``, CPU by default) and
    per-epoch per-row losses. The data stay on the CPU; each batch moves to ``device``.
    ``max_samples``: stop once this many rows were trained on (the last epoch on the first
    rows of its shuffled order), whatever ``epochs`` says."""
    if max_samples is not None and track_loss:
        raise ValueError("max_samples cuts epochs short: per-epoch losses would not be comparable")
    gen = _torch_seed(seed)
    device = device or torch.device("cpu")
    model = _net_for(X, num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    losses = []
    budget = epochs * len(X) if max_samples is None else min(epochs * len(X), max_samples)
    seen = 0
    for _ in range(epochs):
        if seen >= budget:
            break
        model.train()
        perm = torch.randperm(len(X), generator=gen)
        for start in range(0, min(len(X), budget - seen), batch_size):
            b = perm[start : min(start + batch_size, budget - seen)]
            opt.zero_grad()
            F.cross_entropy(model(Xt[b].to(device)), yt[b].to(device)).backward()
            opt.step()
        seen += min(len(X), budget - seen)
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


def _svc_rows(rows: np.ndarray, seed: int) -> np.ndarray:
    """At most ``SVC_MAX_ROWS`` of ``rows`` (a seeded random subset) for fitting an RBF SVC,
    whose cost grows about as n^1.9 (8,000 MNIST rows: 18 s; 48,000 would take minutes per
    fit). The other models still learn from every row."""
    if len(rows) <= SVC_MAX_ROWS:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, SVC_MAX_ROWS, replace=False))


def screening_view(X: np.ndarray) -> np.ndarray:
    """The images the screening models learn from: average-pooled to at most
    ``VIEW_MAX_SIDE`` pixels per side (28x28 MNIST: 14x14, a quarter of the cost; a 3x3
    trigger stays visible); smaller images and table rows as they are."""
    if X.ndim != 4 or max(X.shape[2:]) <= VIEW_MAX_SIDE:
        return X
    factor = -(-max(X.shape[2:]) // VIEW_MAX_SIDE)
    pooled = F.avg_pool2d(torch.from_numpy(np.ascontiguousarray(X)), factor, ceil_mode=True)
    return pooled.numpy().astype(np.float32)


def standardised(flat: np.ndarray) -> np.ndarray:
    """Columns shifted to mean 0 and scaled to standard deviation 1 (constant columns: 0), so
    that no table column weighs in a distance by its scale alone."""
    sd = flat.std(0)
    return ((flat - flat.mean(0)) / np.where(sd > 0, sd, 1.0)).astype(np.float32)


def table_features(flat: np.ndarray, categorical: Sequence[tuple[int, int]] = ()) -> np.ndarray:
    """Table rows as the screen compares them: one column, one vote. Numeric columns are
    standardised (two random rows differ by 2 in squared distance on average); the one-hot
    block of a categorical column (``categorical``: [start, stop) of each block) is centred
    and scaled by 1 / sqrt(1 - sum of its categories' squared shares), so that it weighs the
    same 2 on average. Standardised one 0/1 column at a time, a three-valued category
    weighed as four and a half numeric columns (a rare category far more): on iris beside
    a random site code, rows' nearest neighbours were those of the same site."""
    out = standardised(flat)
    for start, stop in categorical:
        block = flat[:, start:stop].astype(np.float64)
        share = block.mean(0)
        spread = 1.0 - float((share**2).sum())
        out[:, start:stop] = ((block - share) / np.sqrt(spread) if spread > 1e-12 else 0.0)
    return out.astype(np.float32)


def _fit_predict(name: str, X: np.ndarray, features: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray, K: int, *,
                 epochs: int, seed: int, device: torch.device) -> np.ndarray:
    """Probabilities (len(te) x K) for rows ``te`` of the model ``name`` fitted on rows ``tr``."""
    if name == "net":
        model, _ = _train_net(X[tr], y[tr], K, epochs=epochs, seed=seed, device=device, max_samples=FOLD_MAX_SAMPLES)
        return _softmax_of(model, X[te])
    if name == "knn":
        clf = KNeighborsClassifier(n_neighbors=int(min(KNN_NEIGHBOURS, len(tr))), algorithm="brute")
    elif name == "logreg":
        clf = LogisticRegression(C=1.0, max_iter=2000)
    elif name == "svc":
        tr = _svc_rows(tr, seed)
        clf = SVC(C=1.0, gamma="scale", probability=True, random_state=seed)
    else:
        raise InvalidInput(f"unknown screening model {name!r}")
    clf.fit(features[tr], y[tr])
    out = np.zeros((len(te), K))
    out[:, clf.classes_] = clf.predict_proba(features[te])
    return out


def oos_folds(y: np.ndarray, num_classes: int, params: ScreenParams) -> list[tuple[np.ndarray, np.ndarray]]:
    """The stratified K folds (training rows, held-out rows) of the out-of-sample probabilities."""
    counts = np.bincount(y, minlength=num_classes)
    folds = min(params.folds, int(counts[counts > 0].min()))
    if folds < 2:
        raise InvalidInput("label screening needs at least 2 rows in every class")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=params.seed)
    return list(splitter.split(np.zeros(len(y)), y))


def fold_probs(X: np.ndarray, features: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray, num_classes: int,
               params: ScreenParams, fold: int, exclude: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each screening model's probabilities (len(te) x K) for the held-out rows ``te`` of one
    fold, fitted on ``tr`` less the rows in ``exclude`` (a mask). Seeded by ``params.seed +
    fold``, so any process (a fan-out worker) gives the same answer."""
    if exclude is not None:
        tr = tr[~exclude[tr]]
    names = TABLE_MODELS if X.ndim == 2 else IMAGE_MODELS
    epochs = max(2, min(params.backdoor_epochs, 5))
    device = resolve_device(params.device, "screen.device")
    with one_intra_op_thread():  # tiny networks, and a fan-out worker shares the cores (see screen_dataset)
        return {name: _fit_predict(name, X, features, y, tr, te, num_classes, epochs=epochs, seed=params.seed + fold,
                                   device=device)
                for name in names}


def combine_folds(parts: list[dict[str, np.ndarray]], folds: list[tuple[np.ndarray, np.ndarray]], n: int,
                  num_classes: int) -> dict[str, np.ndarray]:
    """The folds' held-out probabilities put back in row order: model name -> N x K."""
    out = {name: np.zeros((n, num_classes)) for name in parts[0]}
    for (_, te), part in zip(folds, parts):
        for name, p in part.items():
            out[name][te] = p
    return out


def _oos_probs(X: np.ndarray, features: np.ndarray, y: np.ndarray, num_classes: int, params: ScreenParams, *,
               exclude: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """K-fold out-of-sample probabilities of each screening model (images: the screening
    network and k nearest neighbours on the pixels; tables: logistic regression, an RBF SVC
    and k nearest neighbours on the standardised columns). Rows in ``exclude`` (a mask) are
    predicted but never trained on. One fold after another (``stages.screening.prefetch``
    runs the folds through a mapper instead, with the same result)."""
    folds = oos_folds(y, num_classes, params)
    parts = [fold_probs(X, features, y, tr, te, num_classes, params, fold, exclude) for fold, (tr, te) in enumerate(folds)]
    return combine_folds(parts, folds, len(X), num_classes)


def ensemble(parts: dict[str, np.ndarray]) -> np.ndarray:
    """Mean of the models' probabilities, floored at 1e-6 and renormalised."""
    probs = np.clip(np.mean(list(parts.values()), axis=0), 1e-6, None)
    return probs / probs.sum(1, keepdims=True)


def _train_screening_net(X: np.ndarray, y: np.ndarray, num_classes: int, params: ScreenParams) -> dict[str, np.ndarray]:
    # one intra-op thread, as in the folds: in a fan-out worker, torch's default of one thread per
    # core made this net and the folds beside it 1.5 to 3 times slower (10,000 MNIST rows)
    with one_intra_op_thread():
        model, losses = _train_net(X, y, num_classes, epochs=params.backdoor_epochs, seed=params.seed, track_loss=True,
                                   device=resolve_device(params.device, "screen.device"))
    return {"losses": losses}
