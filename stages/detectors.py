"""Screening cores: label integrity, poisoning and backdoor detection.

``screen_dataset`` runs the detectors named in ``params.detectors`` (a name-keyed registry,
``DETECTORS``) on one dataset and returns ``ScreenFindings``: the labels to train with,
one entry per flagged row with the detectors that flagged it and why, and a per-detector
summary. It is a pure core: no file I/O (``plot_suspects`` is the one exception and only
writes the PNG it is asked for).

Inputs everywhere: ``X`` float32 on the [0, 1] scale, N x C x H x W images or N x F rows;
``y`` int labels in 0..K-1; optional ``annotator_labels`` N x A ints with -1 = no label.

Fail closed: a detector that raises makes ``screen_dataset`` raise ``PipelineError``;
nothing is skipped silently. Unknown detector names raise ``InvalidInput``.

Detectors (names as in ``params.yaml``):

- ``label_issues``: cleanlab ``find_label_issues`` on K-fold out-of-sample probabilities
  averaged over an RBF SVC and the screening network.
  A targeted flip relabels many images of one class as another (rows of 1 marked 7). Once
  a sizeable share of a class is flipped, the out-of-sample models learn the flipped
  mapping: every image of that class gets p(1) and p(7) near the flip ratio, whichever
  label it carries, so row-level rules cannot tell the flipped rows from the rest and
  cleanlab even flags the unflipped 1s as 7s. The class-level evidence is unambiguous:
  class 1 has almost no confident rows and gives its probability to 7, while 7 keeps a
  confident core of its own. Such a *lost class* owns its mode (rows whose probability
  lies on the pair, with more of it on 1 than confident 7s show): rows in it labelled
  otherwise are flagged and its own rows are kept (``_lost_classes``).
- ``outliers``: cleanlab ``Datalab`` outlier (kNN) scores on the inputs; only extreme
  outliers (below Q1 - 2 IQR of the score) are flagged.
- ``near_duplicates``: ``Datalab`` near-duplicate sets: rows (almost) identical to an
  earlier row; the first copy is kept.
- ``annotators``: cleanlab CROWDLAB (``get_label_quality_multiannotator``); annotators below
  ``min_annotator_quality`` are dropped, the consensus is recomputed from the rest, and rows
  whose given label disagrees with that consensus are flagged.
- ``spectral``: spectral signatures (Tran et al. 2018) per class, on two views: the
  penultimate features of a briefly trained network, and the *cross-class residuals*
  ``x_i - mean(k nearest rows of other classes)`` in input space. A dirty-label backdoor
  shares one trigger across samples whose content belongs to other classes, so their
  residuals share one direction; the top singular direction of a class's residuals then
  splits the class in two well separated groups. A class is flagged only when that split
  is strongly bimodal (d' >= ``SPLIT_MIN_DPRIME``), and the side flagged is the one whose
  nearest other-class neighbours agree most on one class (content of another class).
  A third rule catches small poisoning rates (about 1%), where a trigger group is too small
  to move a class's top direction: *trimmed* nearest neighbours (the ``TRIM_FRACTION`` of
  pixels that differ most are left out of each distance, so a local trigger no longer
  counts) show which rows' content belongs to another class (majority of their trimmed
  neighbours carry another label). Among those rows of one class, a trigger group is a set
  of at least ``GROUP_MIN_SIZE`` rows each of whose residuals points the same way as those
  of at least ``GROUP_MIN_PARTNERS`` others (cosine >= ``GROUP_MIN_COS``); ambiguous clean
  rows have residuals that point in unrelated directions. The group's mean residual gives
  the trigger's pixels (mask) and values (pattern). A trigger that overwrites ink moves
  only part of its pixels away from the neighbours' content, so the mask is completed from
  the rows of the class that hold that part: pixels they all hold at one value
  (``TRIGGER_CONSTANT_SPREAD``) far from the median row (``TRIGGER_CONSTANT_UNUSUAL``) are
  stamped, not handwritten. Every row of that class that carries the pattern on the mask
  (on every pixel for a completed, stamped mask; on average otherwise, deviation <=
  ``TRIGGER_MAX_DEVIATION``) is flagged too, so that poisoned rows whose content happens
  to look like the target class are not left behind (two poisoned rows left suffice for a
  working backdoor). When other classes show the pattern too (ink where digits have ink),
  only carriers whose content belongs to another class are flagged: a 0 whose centre a
  trigger fills is read as an 8 and stays.
- ``stamps``: triggers stamped on the background: a set of background pixels (blank in
  almost every row of the other classes) that rows of one class all mark with the same
  exact value; and triggers stamped anywhere, ink included: pixels that rows of one class,
  mostly showing other classes' content, hold at one exact value far more often than other
  classes' rows; see ``detect_stamps``.
- ``activation_clustering``: Chen et al. 2018: per class 2-means on PCA-reduced
  penultimate features; the smaller cluster is confirmed by exclusionary reclassification
  (a model trained without it assigns most of it to other classes).
- ``loss_isolation``: anti-backdoor-learning style (Li et al. 2021): per-sample loss over
  the first epochs of the screening network; rows learned abnormally fast for their class
  (robust z of the log-loss area below ``LOSS_Z``) are flagged.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from stages.errors import InvalidInput, PipelineError
from stages.nets import build_model
from stages.params import ScreenParams
from stages.training import resolve_device

__all__ = [
    "DETECTORS",
    "DetectorResult",
    "ScreenContext",
    "ScreenFindings",
    "plot_suspects",
    "register_detector",
    "screen_dataset",
]

# Decision constants (documented in the module docstring; not tuned per trigger).
SPLIT_MIN_DPRIME = 5.0  # bimodality of a class's top-direction projection, clean digits <= 4.3
SPLIT_MIN_GAP = 6.0  # robust SDs between a small suspect group and the rest, clean digits <= 3.6
SPLIT_DIRECTIONS = 3  # top singular directions examined per class
SPLIT_MIN_SIDE = 3  # smallest group the spectral split may flag
RESIDUAL_NEIGHBOURS = 5
TRIM_FRACTION = 0.15  # pixels left out of trimmed distances; a local trigger hides in them
TRIM_CANDIDATES = 50  # Euclidean nearest rows re-ranked by trimmed distance
TRIM_VOTERS = 10  # trimmed nearest rows that vote on whose content a row shows
GROUP_MIN_COS = 0.6  # residuals of one trigger group point the same way (0.5 linked clean rows on digits)
GROUP_MIN_PARTNERS = 2
GROUP_MIN_SIZE = 4
TRIGGER_MASK_ENERGY = 0.25  # mask = pixels holding >= 25% of the peak squared signature weight
TRIGGER_CONSTANT_SPREAD = 0.02  # median |x - median| across trigger holders on a stamped pixel
TRIGGER_CONSTANT_UNUSUAL = 0.25  # ... at a value this far from the median row there
TRIGGER_MAX_DEVIATION = 0.1  # mean |x - pattern| on the mask for a row to carry the trigger
TRIGGER_MAX_SPREAD = 0.05  # median |x - pattern| of a group's members on its mask: a trigger is stamped alike
TRIGGER_MAX_OTHER_CLASS = 0.01  # share of other-class rows carrying a foreign trigger
TRIGGER_PASSES = 3
STAMP_QUIET_FRACTION = 0.99  # a background pixel: this share of other classes' rows sit at its median
STAMP_QUIET_DEVIATION = 0.05
STAMP_MARK = 0.06  # a row marks a background pixel when it differs this much from the median there
STAMP_MAX_SPREAD = 0.02  # stamped values are exact: median |v - median| among a class's marks
STAMP_MIN_PIXELS = 2  # one saturated stroke pixel is handwriting; a stamp covers two or more
INK_STAMP_MIN_SHARE = 0.2  # share of a row set holding one exact unusual value on a pixel ...
INK_STAMP_ENRICHMENT = 4.0  # ... this many times more often than the other classes' rows do
INK_STAMP_MIN_FOREIGN = 0.5  # carriers mostly show another class's content
INK_STAMP_MAX_OTHER_CLASS = 0.05  # other classes' rows holding the whole stamp (MNIST centre 2x2 at 1.0: 1%)
AC_MAX_RELATIVE_SIZE = 0.35
AC_MIN_SILHOUETTE = 0.25
AC_MAX_SAME_CLASS = 0.2  # exclusionary reclassification: poison when < 20% keeps its label
AC_MAX_ONE_CLASS = 0.6  # ... and no single other class takes over 60% of it
LABEL_MAX_GIVEN_PROB = 0.1  # out-of-sample probability of the given label ...
LABEL_MIN_OTHER_PROB = 0.6  # ... while one other class is this likely: an obvious label error
LOST_CORE = 0.8  # out-of-sample p(label) of a confident member of its class
LOST_MAX_CORE = 0.5  # a class that lost its images to another: under half its rows confident
LOST_MIN_MASS = 0.25  # ... its rows give this mean probability to one other class
LOST_CORE_GAP = 0.2  # ... whose own rows are confident this much more often
LOST_PAIR_MASS = 0.5  # a row of the lost class's mode puts most of its probability on the pair
LOST_ABSORBER_CONFIDENT = 0.9
LOSS_Z = -4.0
SVC_MAX_ROWS = 10_000  # rows an RBF SVC is fitted on (a seeded random subset above this)
ANNOTATOR_MAX_GAP = 0.15  # also drop annotators this far below the median annotator quality
OUTLIER_IQR = 2.0  # clean digits and MNIST: none below; a uniform-noise image in digits: below
DUPLICATE_RELATIVE_DISTANCE = 0.02  # of the median nearest-neighbour distance


# --------------------------------------------------------------------------- results


@dataclass
class DetectorResult:
    """What one detector found: row indices, one score each, a threshold, a reason each."""

    indices: np.ndarray
    scores: np.ndarray
    threshold: float | str
    reasons: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScreenFindings:
    """Outcome of ``screen_dataset``; ``flags[i]["index"]`` is a row of the given X."""

    labels: np.ndarray
    flags: list[dict[str, Any]]
    per_detector: dict[str, dict[str, Any]]
    annotators: list[dict[str, Any]] | None
    seconds: float
    n_rows: int = 0

    @property
    def flagged_indices(self) -> np.ndarray:
        return np.array([f["index"] for f in self.flags], dtype=np.int64)

    @property
    def flagged_fraction(self) -> float:
        return len(self.flags) / self.n_rows if self.n_rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_rows": self.n_rows,
            "n_flagged": len(self.flags),
            "flagged_fraction": self.flagged_fraction,
            "labels": [int(v) for v in self.labels],
            "flags": self.flags,
            "per_detector": self.per_detector,
            "annotators": self.annotators,
            "seconds": self.seconds,
        }


# --------------------------------------------------------------------------- registry

Detector = Callable[["ScreenContext"], DetectorResult]
DETECTORS: dict[str, Detector] = {}


def register_detector(name: str) -> Callable[[Detector], Detector]:
    def deco(fn: Detector) -> Detector:
        DETECTORS[name] = fn
        return fn

    return deco


# --------------------------------------------------------------------------- validation


def _check_inputs(X: np.ndarray, y: np.ndarray, annotator_labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim not in (2, 4):
        raise InvalidInput(f"X must be N x F or N x C x H x W, got shape {X.shape}")
    if y.ndim != 1 or len(y) != len(X):
        raise InvalidInput(f"X and y must be same length, but X has {len(X)} rows and y has shape {y.shape}")
    if len(X) < 20:
        raise InvalidInput(f"screening needs at least 20 rows, got {len(X)}")
    if not np.issubdtype(X.dtype, np.floating):
        raise InvalidInput(f"X must be float on the [0, 1] scale, got dtype {X.dtype}")
    X = X.astype(np.float32, copy=False)
    if not np.isfinite(X).all():
        raise InvalidInput("X contains NaN or inf")
    lo, hi = float(X.min()), float(X.max())
    if lo < 0 or hi > 1:
        raise InvalidInput(f"X must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    if not np.issubdtype(y.dtype, np.integer):
        raise InvalidInput(f"y must hold integer labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise InvalidInput(f"labels must be 0..K-1, got minimum {y.min()}")
    k = int(y.max()) + 1
    if annotator_labels is not None:
        A = np.asarray(annotator_labels)
        if A.ndim != 2 or len(A) != len(X):
            raise InvalidInput(f"annotator_labels must be N x A with N={len(X)}, got shape {A.shape}")
        if not np.issubdtype(A.dtype, np.integer):
            raise InvalidInput(f"annotator_labels must be integers (-1 = no label), got dtype {A.dtype}")
        if A.min() < -1:
            raise InvalidInput(f"annotator_labels must be -1 or 0..K-1, got minimum {A.min()}")
        k = max(k, int(A.max()) + 1)
        annotator_labels = A.astype(np.int64)
    counts = np.bincount(y, minlength=k)
    if (counts < 2).any():
        raise InvalidInput(f"every class needs at least 2 rows, got counts {counts.tolist()}")
    return X, y, annotator_labels, k


# --------------------------------------------------------------------------- shared context


class ScreenContext:
    """Inputs plus lazily computed evidence that several detectors share.

    Expensive pieces (out-of-sample probabilities, the screening network and its loss
    curves, the cross-class residual splits) are computed once on first use.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, *, params: ScreenParams, num_classes: int, annotator_labels: np.ndarray | None):
        self.X = X
        self.y_given = y
        self.labels = y.copy()  # labels to screen and train with (consensus when annotated)
        self.params = params
        self.num_classes = num_classes
        self.annotator_labels = annotator_labels
        self.annotator_report: list[dict[str, Any]] | None = None
        self.consensus_disagrees: np.ndarray | None = None
        self._cache: dict[str, Any] = {}

    @property
    def flat(self) -> np.ndarray:
        if "flat" not in self._cache:
            self._cache["flat"] = self.X.reshape(len(self.X), -1)
        return self._cache["flat"]

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # ---- out-of-sample probabilities
    def pred_probs(self) -> np.ndarray:
        return self.cached("pred_probs", lambda: _oos_pred_probs(self.X, self.labels, self.num_classes, self.params))

    @property
    def typical(self) -> np.ndarray:
        """The median row (per feature), the reference for unusual pixel values."""
        return self.cached("typical", lambda: np.median(self.flat, axis=0))

    # ---- trimmed nearest neighbours in input space (share agreeing with each row's label, residuals)
    def trimmed(self) -> tuple[np.ndarray, np.ndarray]:
        return self.cached("trimmed", lambda: _trimmed_neighbours(self.flat, self.labels))

    # ---- a briefly trained network on all rows: loss curves and penultimate features
    def screening_net(self) -> dict[str, np.ndarray]:
        return self.cached("net", lambda: _train_screening_net(self.X, self.labels, self.num_classes, self.params))


# --------------------------------------------------------------------------- training helpers


def _torch_seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _net_for(X: np.ndarray, num_classes: int) -> torch.nn.Module:
    """The screening network: the small CNN for images of any size, the MLP for rows.

    Screening only needs a network that learns what the data teaches (shortcuts included),
    not the final architecture; on 28x28 images the small CNN costs a quarter of the MNIST
    net per epoch."""
    shape = tuple(X.shape[1:])
    name = "cnn_small" if len(shape) == 3 and shape[1] == shape[2] else "auto"
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


def _oos_pred_probs(X: np.ndarray, y: np.ndarray, num_classes: int, params: ScreenParams) -> np.ndarray:
    """K-fold out-of-sample probabilities: mean of an RBF SVC and the screening network."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import SVC

    folds = min(params.folds, int(np.bincount(y, minlength=num_classes)[np.bincount(y, minlength=num_classes) > 0].min()))
    if folds < 2:
        raise InvalidInput("label_issues needs at least 2 rows in every class")
    flat = X.reshape(len(X), -1)
    probs = np.zeros((len(X), num_classes), dtype=np.float64)
    epochs = max(2, min(params.backdoor_epochs, 5))
    device = resolve_device(params.device, "screen.device")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=params.seed)
    for fold, (tr, te) in enumerate(splitter.split(flat, y)):
        sub = _svc_rows(tr, params.seed + fold)
        present = np.unique(y[sub])
        svc = CalibratedClassifierCV(SVC(C=10.0, gamma="scale"), method="sigmoid", cv=3, ensemble=False).fit(flat[sub], y[sub])
        p_svc = np.zeros((len(te), num_classes))
        p_svc[:, present] = svc.predict_proba(flat[te])
        model, _ = _train_net(X[tr], y[tr], num_classes, epochs=epochs, seed=params.seed + fold, device=device)
        p_net = _softmax_of(model, X[te])
        probs[te] = 0.5 * p_svc + 0.5 * p_net
    probs = np.clip(probs, 1e-6, None)
    return probs / probs.sum(1, keepdims=True)


def _train_screening_net(X: np.ndarray, y: np.ndarray, num_classes: int, params: ScreenParams) -> dict[str, np.ndarray]:
    model, losses = _train_net(X, y, num_classes, epochs=params.backdoor_epochs, seed=params.seed, track_loss=True,
                               device=resolve_device(params.device, "screen.device"))
    return {"losses": losses, "features": _features_of(model, X)}


# --------------------------------------------------------------------------- maths helpers


def _robust_z(v: np.ndarray) -> np.ndarray:
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med))
    return (v - med) / (mad + 1e-12)


def _split_1d(p: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Best two-group split of a 1-D sample (Otsu); returns threshold, d' and the low mask."""
    s = np.sort(p.astype(np.float64))
    n = len(s)
    cs, cs2 = np.cumsum(s), np.cumsum(s**2)
    i = np.arange(1, n)
    within = (cs2[:-1] - cs[:-1] ** 2 / i) + ((cs2[-1] - cs2[:-1]) - (cs[-1] - cs[:-1]) ** 2 / (n - i))
    cut = int(np.argmin(within)) + 1
    thr = 0.5 * (s[cut - 1] + s[cut])
    low = p < thr
    sd = math.sqrt(0.5 * (p[low].var() + p[~low].var())) + 1e-12
    return float(thr), float((p[~low].mean() - p[low].mean()) / sd), low


def _nearest_other_class(flat: np.ndarray, labels: np.ndarray, k: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each class: its rows and their k nearest rows (Euclidean) among other classes."""
    Z = flat.astype(np.float32)
    sq = (Z**2).sum(1)
    out = {}
    for c in np.unique(labels):
        ic = np.where(labels == c)[0]
        io = np.where(labels != c)[0]
        nn = np.empty((len(ic), k), dtype=np.int64)
        for s in range(0, len(ic), 512):
            q = ic[s : s + 512]
            d = sq[q, None] + sq[None, io] - 2.0 * Z[q] @ Z[io].T
            part = np.argpartition(d, k, axis=1)[:, :k]
            nn[s : s + 512] = io[part]
        out[int(c)] = (ic, nn)
    return out


def _cross_class_residuals(flat: np.ndarray, labels: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per class: rows, residuals ``x - mean(k nearest other-class rows)``, neighbour purity."""
    out = {}
    for c, (ic, nn) in _nearest_other_class(flat, labels, RESIDUAL_NEIGHBOURS).items():
        residual = flat[ic] - flat[nn].mean(1)
        nl = labels[nn]
        purity = np.array([np.bincount(r).max() for r in nl]) / RESIDUAL_NEIGHBOURS
        out[c] = (ic, residual, purity)
    return out


def _class_splits(residuals: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[int, dict[str, Any]]:
    """Top singular direction of each class's residuals, split in two; see module docstring."""
    out = {}
    for c, (ic, R, purity) in residuals.items():
        if len(ic) < 2 * SPLIT_MIN_SIDE + 2:
            continue
        Rc = R - R.mean(0)
        _, _, vt = np.linalg.svd(Rc, full_matrices=False)
        candidates = []  # (fires, strength, projection, suspect side, statistic text)
        # rule 1 (large groups): the top direction splits the class in two well separated modes
        p = Rc @ vt[0]
        _, dprime, low = _split_1d(p)
        side = low if purity[low].mean() > purity[~low].mean() else ~low
        candidates.append((dprime >= SPLIT_MIN_DPRIME, dprime / SPLIT_MIN_DPRIME, p, side, f"d'={dprime:.1f}"))
        # rule 2 (small groups, possibly along a later direction): the suspect group lies far
        # outside the rest, measured in robust SDs of the rest
        for v in vt[:SPLIT_DIRECTIONS]:
            p = Rc @ v
            _, _, low = _split_1d(p)
            side = low if purity[low].mean() > purity[~low].mean() else ~low
            if side.sum() < SPLIT_MIN_SIDE or (~side).sum() < SPLIT_MIN_SIDE:
                continue
            rest = p[~side]
            med = np.median(rest)
            mad = 1.4826 * np.median(np.abs(rest - med)) + 1e-12
            gap = float(np.min(np.abs(p[side] - med)) / mad)
            candidates.append((gap >= SPLIT_MIN_GAP, gap / SPLIT_MIN_GAP, p, side, f"gap={gap:.1f} robust SD"))
        fires, strength, proj, suspect, stat = max(candidates, key=lambda t: (t[0], t[1]))
        out[c] = {"rows": ic, "proj": proj, "fires": bool(fires), "strength": float(strength), "stat": stat, "suspect": suspect}
    return out


def _trimmed_neighbours(flat: np.ndarray, labels: np.ndarray, excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row: share of its trimmed nearest rows with its label, and its residual against
    the mean of its trimmed-nearest rows of other classes (zero when none is close).
    Rows in ``excluded`` are never neighbours."""
    Z = flat.astype(np.float32)
    n, f = Z.shape
    cand = int(min(TRIM_CANDIDATES, n - 1))
    voters = int(min(TRIM_VOTERS, cand))
    keep = max(1, f - int(round(TRIM_FRACTION * f)))
    sq = (Z**2).sum(1)
    agree = np.empty(n, dtype=np.float64)
    residual = np.zeros_like(Z)
    step = max(1, min(512, int(2e7 // max(1, cand * f))))
    for s in range(0, n, step):
        q = np.arange(s, min(n, s + step))
        d = sq[q, None] + sq[None, :] - 2.0 * Z[q] @ Z.T
        d[np.arange(len(q)), q] = np.inf
        if excluded is not None:
            d[:, excluded] = np.inf
        nn = np.argpartition(d, cand - 1, axis=1)[:, :cand]
        diff = (Z[q, None, :] - Z[nn]) ** 2
        trimmed = np.partition(diff, keep - 1, axis=2)[:, :, :keep].sum(2) if keep < f else diff.sum(2)
        nn = np.take_along_axis(nn, np.argsort(trimmed, axis=1), 1)
        agree[q] = (labels[nn[:, :voters]] == labels[q, None]).mean(1)
        for j, i in enumerate(q):
            other = nn[j][labels[nn[j]] != labels[i]][:RESIDUAL_NEIGHBOURS]
            if len(other):
                residual[i] = Z[i] - Z[other].mean(0)
    return agree, residual


def _trigger_groups(flat: np.ndarray, labels: np.ndarray, typical: np.ndarray, first: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Small groups of rows per class that share a trigger; see the module docstring.

    At higher rates poisoned rows outvote the clean rows among each other's neighbours; so
    the search is repeated with the rows found so far left out of the neighbours, until a
    pass adds nothing (at most ``TRIGGER_PASSES``)."""
    flagged = np.zeros(len(labels), dtype=bool)
    groups: list[dict[str, Any]] = []
    for _ in range(TRIGGER_PASSES):
        found = _trigger_groups_once(flat, labels, typical, np.where(flagged)[0] if flagged.any() else None, first)
        first = None
        if not found:
            break
        groups = found
        new = np.zeros(len(labels), dtype=bool)
        for g in found:
            new[g["carriers"]] = True
        if not (new & ~flagged).any():
            break
        flagged |= new
    for g in groups:
        g["carriers"] = np.where(flagged & (labels == g["class"]))[0]
    return groups


def _trigger_groups_once(flat: np.ndarray, labels: np.ndarray, typical: np.ndarray, excluded: np.ndarray | None,
                         neighbours: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """One search pass; ``typical`` is the median row; ``neighbours``: this pass's
    ``_trimmed_neighbours`` when already computed."""
    agree, residual = neighbours if neighbours is not None else _trimmed_neighbours(flat, labels, excluded)
    norm = np.linalg.norm(residual, axis=1) + 1e-12
    groups = []
    for c in np.unique(labels):
        in_class = labels == c
        suspects = np.where(in_class & (agree < 0.5))[0]
        if len(suspects) < GROUP_MIN_SIZE:
            continue
        U = residual[suspects] / norm[suspects, None]
        link = (U @ U.T) >= GROUP_MIN_COS
        np.fill_diagonal(link, False)
        core = link.sum(1) >= GROUP_MIN_PARTNERS
        # connected components of the core rows: one per trigger
        left = set(np.where(core)[0].tolist())
        while left:
            todo, comp = [left.pop()], []
            while todo:
                a = todo.pop()
                comp.append(a)
                nxt = [b for b in np.where(link[a] & core)[0].tolist() if b in left]
                left.difference_update(nxt)
                todo.extend(nxt)
            if len(comp) < GROUP_MIN_SIZE:
                continue
            members = suspects[np.array(sorted(comp))]
            signature = residual[members].mean(0)
            weight = signature**2
            mask = weight >= TRIGGER_MASK_ENERGY * weight.max()
            # a stamped trigger gives every poisoned row the same values on its pixels while
            # handwriting varies: the rows of this class that carry the group's core pattern
            # come from many source classes, and the pixels they all hold at one unusual
            # value complete the trigger's mask (the core alone can be a part of it)
            stamped = False
            core_pattern = np.median(flat[members][:, mask], axis=0)
            holders = in_class & (np.abs(flat[:, mask] - core_pattern).max(1) <= TRIGGER_MAX_DEVIATION)
            if holders.sum() >= GROUP_MIN_SIZE:
                centre = np.median(flat[holders], axis=0)
                spread = np.median(np.abs(flat[holders] - centre), axis=0)
                full = (spread <= TRIGGER_CONSTANT_SPREAD) & (mask | (np.abs(centre - typical) >= TRIGGER_CONSTANT_UNUSUAL))
                if full.sum() >= mask.sum() and (full & mask).sum() == mask.sum():
                    mask, stamped = full, True
            pattern = np.median(flat[members][:, mask], axis=0)
            if np.median(np.abs(flat[members][:, mask] - pattern)) > TRIGGER_MAX_SPREAD:
                continue  # the members vary on the mask: a handwriting sub-style, not a stamp
            deviation = np.abs(flat[:, mask] - pattern)
            # a stamped pattern is carried exactly on every pixel; otherwise on average
            carries = (deviation.max(1) if stamped else deviation.mean(1)) <= TRIGGER_MAX_DEVIATION
            # a pattern that other classes also show (ink where digits have ink) is content,
            # not a foreign trigger: then only rows that also show other-class content count
            common = carries[~in_class].mean() > TRIGGER_MAX_OTHER_CLASS
            carriers = np.union1d(members, np.where(in_class & carries & ((agree < 0.5) | (not common)))[0])
            cos = (residual[members] @ signature) / (norm[members] * np.linalg.norm(signature) + 1e-12)
            groups.append({
                "class": int(c),
                "members": members,
                "carriers": carriers,
                "mask_pixels": int(mask.sum()),
                "common_pattern": bool(common),
                "stat": f"{len(members)} of {len(suspects)} rows with other-class content share one residual (mean cosine {cos.mean():.2f}); trigger on {int(mask.sum())} pixels carried by {len(carriers)} rows",
            })
    return groups


# --------------------------------------------------------------------------- detectors


@register_detector("label_issues")
def detect_label_issues(ctx: ScreenContext) -> DetectorResult:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs = ctx.pred_probs()
    issues = find_label_issues(ctx.labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)  # no fork: the flow process has threads
    # prune_by_noise_rate removes as many rows per class pair as it estimates are noisy, and
    # leaves some rows whose given label the out-of-sample model all but rules out (on
    # digits 13 of 71 flips at 5% had p(label) <= 0.13); those are flagged too
    given = probs[np.arange(len(probs)), ctx.labels]
    obvious = (given <= LABEL_MAX_GIVEN_PROB) & (probs.max(1) >= LABEL_MIN_OTHER_PROB)
    quality = get_label_quality_scores(ctx.labels, probs)
    flagged = issues | obvious
    owner = np.full(len(probs), -1)
    lost = _lost_classes(ctx.labels, probs)
    for c in lost:
        owner[c["mode"]] = c["class"]
    in_mode = owner >= 0
    flagged[in_mode] = ctx.labels[in_mode] != owner[in_mode]
    idx = np.where(flagged)[0]
    reasons = [
        f"label {ctx.labels[i]} but it shows class {owner[i]}, whose images were relabelled (p({owner[i]})={probs[i, owner[i]]:.2f})" if owner[i] >= 0
        else f"label {ctx.labels[i]} but out-of-sample model says {int(probs[i].argmax())} (p={probs[i].max():.2f}, p(label)={given[i]:.2f})"
        for i in idx
    ]
    extra = {"lost_classes": [{k: v for k, v in c.items() if k != "mode"} for c in lost]}
    return DetectorResult(idx, 1.0 - quality[idx], f"cleanlab prune_by_noise_rate, or p(label) <= {LABEL_MAX_GIVEN_PROB} with another class >= {LABEL_MIN_OTHER_PROB}, or a lost class's mode", reasons, extra)


def _lost_classes(labels: np.ndarray, probs: np.ndarray) -> list[dict[str, Any]]:
    """Classes whose images were largely relabelled as one other class (targeted flips).

    Class j is lost to d when under ``LOST_MAX_CORE`` of the rows labelled j are confident
    (p(j) >= ``LOST_CORE``), those rows give d a mean probability of at least
    ``LOST_MIN_MASS``, and d keeps a confident core (``LOST_CORE_GAP`` more often
    confident than j). Clean and randomly flipped data have no such pair: random flips
    lower every class's confidence but spread the lost mass over all classes.

    j's mode: rows with p(j) + p(d) >= ``LOST_PAIR_MASS`` whose share of that pair mass on j
    exceeds both half the 5th percentile of the share on j's own rows and the 90th
    percentile of the share on d's confident rows (p(d) >= ``LOST_ABSORBER_CONFIDENT``).
    """
    K = probs.shape[1]
    counts = np.bincount(labels, minlength=K)
    core = np.array([(probs[labels == j, j] >= LOST_CORE).mean() if counts[j] else 1.0 for j in range(K)])
    found = []
    for j in np.where((core < LOST_MAX_CORE) & (counts >= 5))[0]:
        mine = labels == j
        mass = probs[mine].mean(0)
        mass[j] = -1.0
        d = int(mass.argmax())
        if mass[d] < LOST_MIN_MASS or core[d] < core[j] + LOST_CORE_GAP:
            continue
        pair = probs[:, j] + probs[:, d]
        share = probs[:, j] / np.maximum(pair, 1e-12)
        confident_d = (labels == d) & (probs[:, d] >= LOST_ABSORBER_CONFIDENT)
        floor = float(np.quantile(share[confident_d], 0.9)) if confident_d.sum() >= 5 else 0.0
        threshold = max(0.5 * float(np.quantile(share[mine], 0.05)), floor, 0.01)
        mode = (pair >= LOST_PAIR_MASS) & (share >= threshold)
        found.append({"class": int(j), "absorbed_by": d, "confident_share": round(float(core[j]), 3),
                      "absorber_confident_share": round(float(core[d]), 3), "share_threshold": round(threshold, 4),
                      "mode_rows": int(mode.sum()), "mode": mode})
    return found


def _datalab(ctx: ScreenContext) -> Any:
    """One cleanlab ``Datalab`` audit of the inputs (Euclidean kNN graph shared by the
    outlier and near-duplicate checks); its scores are read by ``outliers`` and
    ``near_duplicates``, which apply this module's thresholds."""

    def make() -> Any:
        from cleanlab import Datalab

        k = int(min(10, len(ctx.X) - 1))
        lab = Datalab(data={"label": ctx.labels}, label_name="label", verbosity=0)
        lab.find_issues(features=ctx.flat, issue_types={
            "outlier": {"k": k, "metric": "euclidean"},
            "near_duplicate": {"k": k, "metric": "euclidean", "threshold": DUPLICATE_RELATIVE_DISTANCE},
        })
        return lab

    return ctx.cached("datalab", make)


@register_detector("outliers")
def detect_outliers(ctx: ScreenContext) -> DetectorResult:
    """Datalab's kNN outlier score; only extreme outliers (below Q1 - ``OUTLIER_IQR`` IQR)
    are flagged: Datalab's own threshold flags about 2% of clean digits."""
    scores = _datalab(ctx).get_issues("outlier")["outlier_score"].to_numpy()
    q1, q3 = np.quantile(scores, [0.25, 0.75])
    thr = float(q1 - OUTLIER_IQR * (q3 - q1))
    idx = np.where(scores < thr)[0]
    reasons = [f"far from every other row (kNN outlier score {scores[i]:.3f} < {thr:.3f})" for i in idx]
    return DetectorResult(idx, 1.0 - scores[idx], thr, reasons)


@register_detector("near_duplicates")
def detect_near_duplicates(ctx: ScreenContext) -> DetectorResult:
    """Datalab's near-duplicate sets (distance below ``DUPLICATE_RELATIVE_DISTANCE`` of the
    median nearest-neighbour distance); the first row of each set is kept."""
    issues = _datalab(ctx).get_issues("near_duplicate")
    sets = issues["near_duplicate_sets"].tolist()
    flat = ctx.flat
    idx, scores, reasons = [], [], []
    for i in np.where(issues["is_near_duplicate_issue"].to_numpy())[0]:
        earlier = [int(j) for j in sets[i] if int(j) < i]
        if not earlier:
            continue
        j = min(earlier)
        same = ctx.labels[i] == ctx.labels[j]
        idx.append(int(i))
        scores.append(float(np.linalg.norm(flat[i] - flat[j])))
        reasons.append(f"near copy of row {j} ({'same label' if same else f'conflicting labels {ctx.labels[j]} vs {ctx.labels[i]}'})")
    return DetectorResult(np.array(idx, dtype=np.int64), np.array(scores), f"{DUPLICATE_RELATIVE_DISTANCE} x median nearest-neighbour distance", reasons)


def _crowdlab(A: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    import pandas as pd
    from cleanlab.multiannotator import get_label_quality_multiannotator

    frame = pd.DataFrame(np.where(A < 0, np.nan, A.astype(np.float64)))
    return get_label_quality_multiannotator(frame, probs, verbose=False)


def _analyse_annotators(ctx: ScreenContext) -> None:
    """CROWDLAB once with every annotator, then again with only those above the minimum."""
    A = ctx.annotator_labels
    if A is None:
        return
    has = (A >= 0).any(1)
    probs = ctx.pred_probs()
    rows = np.where(has)[0]
    if len(rows) == 0:
        raise InvalidInput("annotator_labels holds no label at all")
    first = _crowdlab(A[rows], probs[rows])
    stats = first["annotator_stats"]
    quality = {int(a): float(stats.loc[a, "annotator_quality"]) for a in stats.index}
    peer = float(np.median(list(quality.values()))) if quality else 0.0
    good = [a for a in range(A.shape[1]) if quality.get(a, 0.0) >= max(ctx.params.min_annotator_quality, peer - ANNOTATOR_MAX_GAP)]
    ctx.annotator_report = [
        {"annotator": a, "quality": quality.get(a, float("nan")), "flagged": a not in good, "n_labels": int((A[:, a] >= 0).sum())}
        for a in range(A.shape[1])
    ]
    consensus = ctx.y_given.copy()
    if good:
        Ag = A[:, good]
        rows_g = np.where((Ag >= 0).any(1))[0]
        second = _crowdlab(Ag[rows_g], probs[rows_g])
        consensus[rows_g] = second["label_quality"]["consensus_label"].to_numpy().astype(np.int64)
        no_trusted = np.setdiff1d(np.arange(len(A)), rows_g)
    else:
        no_trusted = np.arange(len(A))
    ctx.labels = consensus
    ctx.consensus_disagrees = consensus != ctx.y_given
    ctx._cache["no_trusted_rows"] = no_trusted
    for key in ("residuals", "trimmed", "trigger_groups", "net", "datalab"):
        ctx._cache.pop(key, None)


@register_detector("annotators")
def detect_annotators(ctx: ScreenContext) -> DetectorResult:
    if ctx.annotator_labels is None:
        return DetectorResult(np.array([], dtype=np.int64), np.array([]), "no annotator_labels given", [])
    if ctx.annotator_report is None:
        _analyse_annotators(ctx)
    bad = [a["annotator"] for a in ctx.annotator_report if a["flagged"]]
    idx = np.where(ctx.consensus_disagrees)[0]
    reasons = [f"given label {ctx.y_given[i]} but trusted-annotator consensus is {ctx.labels[i]}" for i in idx]
    no_trusted = ctx._cache.get("no_trusted_rows", np.array([], dtype=np.int64))
    if bad and len(no_trusted):
        extra = np.setdiff1d(no_trusted, idx)
        idx = np.concatenate([idx, extra])
        reasons += [f"labelled only by annotators below quality {ctx.params.min_annotator_quality}" for _ in extra]
    return DetectorResult(idx, np.ones(len(idx)), ctx.params.min_annotator_quality, reasons, {"flagged_annotators": bad})


def _spectral_on(groups: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], view: str) -> tuple[list[int], list[float], list[str], dict[int, str]]:
    idx, scores, reasons, stats = [], [], [], {}
    for c, split in _class_splits(groups).items():
        stats[c] = split["stat"]
        side = split["suspect"]
        if not split["fires"] or side.sum() > 0.8 * len(side):
            continue
        for r in split["rows"][side]:
            idx.append(int(r))
            scores.append(split["strength"])
            reasons.append(f"class {c}: {view} splits off a distinct group ({split['stat']})")
    return idx, scores, reasons, stats


@register_detector("spectral")
def detect_spectral(ctx: ScreenContext) -> DetectorResult:
    residuals = ctx.cached("residuals", lambda: _cross_class_residuals(ctx.flat, ctx.labels))
    idx, scores, reasons, stats = _spectral_on(residuals, "cross-class residual signature")
    groups = ctx.cached("trigger_groups", lambda: _trigger_groups(ctx.flat, ctx.labels, ctx.typical, ctx.trimmed()))
    seen = set(idx)
    for g in groups:
        for r in g["carriers"]:
            if int(r) in seen:
                continue
            seen.add(int(r))
            idx.append(int(r))
            scores.append(1.0)
            reasons.append(f"class {g['class']}: carries a trigger shared by a small group ({g['stat']})")
    # Tran et al. on learned features, reported per class for the record; on small CNNs it
    # splits clean classes too (measured on digits), so it does not flag on its own.
    feats = ctx.screening_net()["features"]
    feature_stats = {c: s["stat"] for c, s in _class_splits({c: (ic, feats[ic], pur) for c, (ic, _, pur) in residuals.items()}).items()}
    return DetectorResult(np.array(idx, dtype=np.int64), np.array(scores), f"d' >= {SPLIT_MIN_DPRIME} or gap >= {SPLIT_MIN_GAP}", reasons, {"residual_split": stats, "feature_split": feature_stats, "trigger_groups": {str(g["class"]): g["stat"] for g in groups}})


def _background_stamps(flat: np.ndarray, labels: np.ndarray, off: np.ndarray) -> list[dict[str, Any]]:
    """Per class: background pixels that at least ``GROUP_MIN_SIZE`` of its rows mark with one
    exact value, and the rows of that class carrying most of them; see ``stamps``."""
    near = off <= STAMP_QUIET_DEVIATION
    near_total = near.sum(0)
    found = []
    for c in np.unique(labels):
        in_class = labels == c
        others = max(1, int((~in_class).sum()))
        quiet = (near_total - near[in_class].sum(0)) / others >= STAMP_QUIET_FRACTION
        marked = (off >= STAMP_MARK) & quiet
        counts = marked[in_class].sum(0)
        pixels = []
        for j in np.where(counts >= GROUP_MIN_SIZE)[0]:
            v = flat[in_class & marked[:, j], j]
            if np.median(np.abs(v - np.median(v))) <= STAMP_MAX_SPREAD:
                pixels.append(int(j))
        if len(pixels) < STAMP_MIN_PIXELS:
            continue
        need = max(STAMP_MIN_PIXELS, len(pixels) / 2)
        carriers = np.where(in_class & (marked[:, pixels].sum(1) >= need))[0]
        if len(carriers) >= GROUP_MIN_SIZE:
            found.append({"class": int(c), "pixels": pixels, "carriers": carriers,
                          "stat": f"{len(carriers)} rows mark {len(pixels)} background pixels with one exact value each"})
    return found


def _ink_stamps(flat: np.ndarray, labels: np.ndarray, agree: np.ndarray, off: np.ndarray) -> list[dict[str, Any]]:
    """Per class: pixels anywhere (ink included) that the class's rows hold at one exact
    unusual value far more often than other classes' rows, and the rows holding all of them.

    Handwriting gives a pixel many values; a stamped trigger gives every poisoned row the
    same value on the same pixels, even where digits have ink (a centre patch). Candidate
    pixels are read twice per class: on the rows whose trimmed neighbours carry another
    label (``agree`` < 0.5: the poisoned rows' content is another class's) and on all rows
    of the class. A pixel counts when at least ``INK_STAMP_MIN_SHARE`` of those rows hold
    its modal unusual value (>= ``STAMP_MARK`` from the median row) and that is
    ``INK_STAMP_ENRICHMENT`` times the share of other classes' rows holding it. Rows of the
    class holding every such pixel (>= ``STAMP_MIN_PIXELS``) exactly are a stamp group when
    there are ``GROUP_MIN_SIZE`` or more, at most ``INK_STAMP_MAX_OTHER_CLASS`` of the other
    classes' rows hold the same (and the class holds it ``INK_STAMP_ENRICHMENT`` times as
    often), and most carriers (``INK_STAMP_MIN_FOREIGN``) show another class's content: a
    class's own style (0s with a blank centre) fails the last checks."""
    unusual = off >= STAMP_MARK
    found: list[dict[str, Any]] = []
    for c in np.unique(labels):
        in_class = labels == c
        others = flat[~in_class]
        seen: list[frozenset[int]] = []
        for rows in (in_class & (agree < 0.5), in_class):
            if rows.sum() < GROUP_MIN_SIZE:
                continue
            F, U = flat[rows], unusual[rows]
            pixels, values = [], []
            for j in np.where(U.sum(0) >= GROUP_MIN_SIZE)[0]:
                v, n = np.unique(F[U[:, j], j], return_counts=True)
                k = int(n.argmax())
                share = n[k] / len(F)
                if n[k] >= GROUP_MIN_SIZE and share >= INK_STAMP_MIN_SHARE and share >= INK_STAMP_ENRICHMENT * max((others[:, j] == v[k]).mean(), 1e-3):
                    pixels.append(int(j))
                    values.append(v[k])
            if len(pixels) < STAMP_MIN_PIXELS:
                continue
            # candidate pixels can include a class's own style; the stamp is the part that
            # the rows holding most candidates all hold
            holds = flat[:, pixels] == np.array(values, dtype=flat.dtype)
            most = in_class & (holds.sum(1) >= max(STAMP_MIN_PIXELS, len(pixels) / 2))
            if most.sum() < GROUP_MIN_SIZE:
                continue
            core = holds[most].mean(0) >= 0.9
            if core.sum() < STAMP_MIN_PIXELS or frozenset(np.array(pixels)[core].tolist()) in seen:
                continue
            pixels = np.array(pixels)[core].tolist()
            seen.append(frozenset(pixels))
            carries = holds[:, core].all(1)
            carriers = np.where(in_class & carries)[0]
            other = carries[~in_class].mean()
            if (len(carriers) < GROUP_MIN_SIZE or other > INK_STAMP_MAX_OTHER_CLASS
                    or len(carriers) / in_class.sum() < INK_STAMP_ENRICHMENT * other
                    or (agree[carriers] < 0.5).mean() < INK_STAMP_MIN_FOREIGN):
                continue
            found.append({"class": int(c), "pixels": pixels, "carriers": carriers,
                          "stat": f"{len(carriers)} rows, mostly with other classes' content, hold {len(pixels)} pixels at one exact value each"})
    return found


@register_detector("stamps")
def detect_stamps(ctx: ScreenContext) -> DetectorResult:
    """Triggers stamped on the background. Where almost every row of the other classes is
    blank (``STAMP_QUIET_FRACTION`` at the pixel's median), ink is rare and handwritten
    ink varies in value; a trigger puts the same value on the same background pixels of
    every poisoned row, and a blended trigger puts the same faint value (its weight times
    the pattern) on every blank pixel. Rows of one class that carry most of a set of at
    least ``STAMP_MIN_PIXELS`` such pixels are flagged. A pixel-space check: it catches
    small corner triggers and 20% noise blends on 28x28 images at 1%, where neighbours and
    residuals are dominated by handwriting, and blends at 5%, whose rows are each other's
    nearest neighbours.

    Triggers stamped on ink (a centre patch on 28x28 digits: one pixel set in 100, much of
    it already inked) are found by exact values instead (``_ink_stamps``)."""
    off = np.abs(ctx.flat - ctx.typical)  # distance of every pixel from the median row
    groups = _background_stamps(ctx.flat, ctx.labels, off) + _ink_stamps(ctx.flat, ctx.labels, ctx.trimmed()[0], off)
    idx, reasons = [], []
    for g in groups:
        for r in g["carriers"]:
            if int(r) not in idx:
                idx.append(int(r))
                reasons.append(f"class {g['class']}: {g['stat']}")
    return DetectorResult(np.array(idx, dtype=np.int64), np.ones(len(idx)), f"{STAMP_MIN_PIXELS}+ pixels stamped alike by {GROUP_MIN_SIZE}+ rows of one class", reasons,
                          {"stamps": [{"class": g["class"], "stat": g["stat"]} for g in groups]})


@register_detector("activation_clustering")
def detect_activation_clustering(ctx: ScreenContext) -> DetectorResult:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score
    from sklearn.svm import SVC

    feats = ctx.screening_net()["features"]
    idx, scores, reasons = [], [], []
    for c in np.unique(ctx.labels):
        ic = np.where(ctx.labels == c)[0]
        if len(ic) < 20:
            continue
        f = feats[ic] - feats[ic].mean(0)
        dims = int(min(10, f.shape[1], len(ic) - 1))
        Z = PCA(dims, random_state=ctx.params.seed).fit_transform(f)
        lab = KMeans(2, n_init=5, random_state=ctx.params.seed).fit_predict(Z)
        small = int(np.argmin(np.bincount(lab, minlength=2)))
        members = ic[lab == small]
        rel = len(members) / len(ic)
        if len(members) < SPLIT_MIN_SIDE or rel > AC_MAX_RELATIVE_SIZE:
            continue
        sil = float(silhouette_score(Z, lab))
        if sil < AC_MIN_SILHOUETTE:
            continue
        # exclusionary reclassification: train without the cluster, classify the cluster
        keep = np.ones(len(ctx.X), dtype=bool)
        keep[members] = False
        rows = _svc_rows(np.where(keep)[0], ctx.params.seed)
        clf = SVC(C=10.0, gamma="scale", random_state=ctx.params.seed).fit(ctx.flat[rows], ctx.labels[rows])
        pred = clf.predict(ctx.flat[members])
        same = float((pred == c).mean())
        # a legitimate sub-style of class c, once removed, is read as one look-alike class;
        # a dirty-label cluster is read as the several classes its content came from
        top_other = float(np.bincount(pred[pred != c]).max() / len(pred)) if (pred != c).any() else 0.0
        if same < AC_MAX_SAME_CLASS and top_other < AC_MAX_ONE_CLASS:
            for r in members:
                idx.append(int(r))
                scores.append(1.0 - same)
                reasons.append(f"class {c}: small activation cluster ({rel:.0%}, silhouette {sil:.2f}); without it only {same:.0%} of it is classed {c}")
    return DetectorResult(np.array(idx, dtype=np.int64), np.array(scores), f"size <= {AC_MAX_RELATIVE_SIZE}, silhouette >= {AC_MIN_SILHOUETTE}, reclassified < {AC_MAX_SAME_CLASS}", reasons)


@register_detector("loss_isolation")
def detect_loss_isolation(ctx: ScreenContext) -> DetectorResult:
    losses = ctx.screening_net()["losses"]
    early = losses[: max(1, len(losses) // 2)]
    area = np.log(early.mean(0) + 1e-8)
    idx, scores, reasons = [], [], []
    for c in np.unique(ctx.labels):
        ic = np.where(ctx.labels == c)[0]
        z = _robust_z(area[ic])
        hit = z < LOSS_Z
        for r, v in zip(ic[hit], z[hit]):
            idx.append(int(r))
            scores.append(float(-v))
            reasons.append(f"class {c}: learned abnormally fast (robust z of early log-loss {v:.1f})")
    return DetectorResult(np.array(idx, dtype=np.int64), np.array(scores), f"robust z < {LOSS_Z}", reasons)


# --------------------------------------------------------------------------- the core


def screen_dataset(X: np.ndarray, y: np.ndarray, *, params: ScreenParams, annotator_labels: np.ndarray | None = None, progress: bool = False) -> ScreenFindings:
    """Run the detectors in ``params.detectors`` and gather their flags.

    Parameters
    ----------
    X : float array, N x C x H x W or N x F, values on the [0, 1] scale.
    y : int array (N,), labels 0..K-1.
    params : ScreenParams; ``detectors`` names registered detectors, run in that order.
    annotator_labels : optional int array (N, A), -1 = no label. When given, ``labels`` in
        the result is the consensus of annotators whose quality >= ``min_annotator_quality``.

    Raises
    ------
    InvalidInput for bad inputs or unknown detector names; PipelineError when a detector
    fails (fail closed).
    """
    start = time.perf_counter()
    unknown = [d for d in params.detectors if d not in DETECTORS]
    if unknown:
        raise InvalidInput(f"unknown detector(s) {unknown}; known: {sorted(DETECTORS)}")
    if not params.detectors:
        raise InvalidInput("screen.detectors is empty: screening that checks nothing would pass everything")
    X, y, annotator_labels, k = _check_inputs(X, y, annotator_labels)
    ctx = ScreenContext(X, y, params=params, num_classes=k, annotator_labels=annotator_labels)
    threads = torch.get_num_threads()
    # the screening nets are tiny: one intra-op thread is much faster than several
    # competing for a small, shared CPU (17 s vs 0.2 s measured for one digits net)
    torch.set_num_threads(1)
    try:
        return _screen(ctx, params, annotator_labels, progress, start)
    finally:
        torch.set_num_threads(threads)


def _screen(ctx: ScreenContext, params: ScreenParams, annotator_labels: np.ndarray | None, progress: bool, start: float) -> ScreenFindings:
    X = ctx.X

    per_detector: dict[str, dict[str, Any]] = {}
    merged: dict[int, dict[str, Any]] = {}
    if annotator_labels is not None:
        t0 = time.perf_counter()
        try:
            _analyse_annotators(ctx)
        except PipelineError:
            raise
        except Exception as err:  # fail closed
            raise PipelineError(f"screening check 'annotators' could not run: {type(err).__name__}: {err}") from err
        first_seconds = {"annotators": time.perf_counter() - t0}
    else:
        first_seconds = {}

    for name in dict.fromkeys(params.detectors):
        t0 = time.perf_counter()
        if progress:
            print(f"[screen] {name} ...", file=sys.stderr, flush=True)
        try:
            res = DETECTORS[name](ctx)
        except PipelineError:
            raise
        except Exception as err:  # fail closed: a check that cannot run is a failed check
            raise PipelineError(f"screening check {name!r} could not run: {type(err).__name__}: {err}") from err
        if not isinstance(res, DetectorResult) or len(res.indices) != len(res.reasons) or len(res.indices) != len(res.scores):
            raise PipelineError(f"screening check {name!r} returned a malformed result")
        seconds = time.perf_counter() - t0 + first_seconds.pop(name, 0.0)
        per_detector[name] = {"flagged": int(len(res.indices)), "threshold": res.threshold, "seconds": round(seconds, 3), **res.extra}
        for i, s, r in zip(res.indices.tolist(), res.scores.tolist(), res.reasons):
            entry = merged.setdefault(int(i), {"index": int(i), "detectors": [], "scores": {}, "reasons": []})
            if name not in entry["detectors"]:
                entry["detectors"].append(name)
                entry["scores"][name] = float(s)
                entry["reasons"].append(r)
        if progress:
            print(f"[screen] {name}: {len(res.indices)} flagged in {seconds:.1f}s", file=sys.stderr, flush=True)

    flags = []
    for i in sorted(merged):
        e = merged[i]
        flags.append({"index": e["index"], "detectors": e["detectors"], "scores": e["scores"], "reason": "; ".join(e["reasons"])})
    return ScreenFindings(
        labels=ctx.labels,
        flags=flags,
        per_detector=per_detector,
        annotators=ctx.annotator_report,
        seconds=round(time.perf_counter() - start, 3),
        n_rows=len(X),
    )


# --------------------------------------------------------------------------- plot


def plot_suspects(X: np.ndarray, findings: ScreenFindings, path: str, *, per_detector: int = 8) -> None:
    """Write a PNG grid: one row per detector, its ``per_detector`` highest-scored rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    X = np.asarray(X)
    names = list(findings.per_detector) or ["(none)"]
    cols = max(1, per_detector)
    fig, axes = plt.subplots(len(names), cols, figsize=(1.4 * cols, 1.6 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        rows = sorted((f for f in findings.flags if name in f["detectors"]), key=lambda f: -f["scores"][name])[:cols]
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
            if c >= len(rows):
                ax.axis("off") if c else None
                continue
            i = rows[c]["index"]
            img = X[i]
            if img.ndim == 3:
                img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
            elif img.ndim == 1:
                side = int(math.isqrt(img.size))
                img = img[: side * side].reshape(side, side)
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"#{i} y={findings.labels[i]}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
