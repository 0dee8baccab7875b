"""The inputs of one screening run, checked once, plus evidence computed on first use and
shared by the detectors."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.core.errors import InvalidInput
from stages.core.fanout import Mapper
from stages.core.params import ScreenParams
from stages.screening.evidence import (
    _oos_probs,
    _train_screening_net,
    combine_folds,
    ensemble,
    fold_probs,
    oos_folds,
    screening_view,
    table_features,
)
from stages.screening.backdoor.trigger_groups import _trigger_groups
from stages.screening.neighbours import _cross_class_residuals, _trimmed_neighbours, datalab_issues


def check_categorical(categorical: Sequence[Sequence[int]] | None, X: np.ndarray) -> list[tuple[int, int]]:
    """The one-hot blocks of a table's categorical columns, as [start, stop) pairs: inside
    the row, in order, not overlapping; none for images."""
    blocks = [(int(a), int(b)) for a, b in (categorical or ())]
    if blocks and X.ndim != 2:
        raise InvalidInput("categorical column blocks are for tables (N x F), not images")
    end = 0
    for start, stop in blocks:
        if not end <= start < stop <= X.shape[1]:
            raise InvalidInput(f"categorical blocks must be increasing [start, stop) pairs within {X.shape[1]} columns, got {blocks}")
        end = stop
    return blocks


def check_screen_inputs(X: np.ndarray, y: np.ndarray, annotator_labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
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


class ScreenContext:
    """Inputs plus lazily computed evidence that several detectors share.

    Expensive pieces (out-of-sample probabilities, the screening network and its loss
    curves, the cross-class residual splits) are computed once on first use.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, *, params: ScreenParams, num_classes: int, annotator_labels: np.ndarray | None,
                 mapper: Mapper | None = None, categorical: Sequence[tuple[int, int]] = (),
                 row_ids: np.ndarray | None = None):
        self.X = X
        self.row_ids = row_ids  # what a reason calls each row (the dataset's row numbers); None: positions
        self.categorical = list(categorical)  # one-hot blocks of a table's categorical columns
        self.mapper = mapper    # when given, the K-fold refits run their folds through it (workers, a Dask cluster)
        self.y_given = y
        self.labels = y.copy()  # labels to screen and train with (consensus when annotated)
        self.params = params
        self.num_classes = num_classes
        self.annotator_labels = annotator_labels
        self.annotator_report: list[dict[str, Any]] | None = None
        self.consensus_disagrees: np.ndarray | None = None
        self._cache: dict[str, Any] = {}

    def row_id(self, position: int) -> int:
        """The number a reason gives the row at ``position``: its row in the dataset when the
        caller screens rows in another order (the screen stage: training rows, then test)."""
        return int(position if self.row_ids is None else self.row_ids[position])

    @property
    def flat(self) -> np.ndarray:
        if "flat" not in self._cache:
            self._cache["flat"] = self.X.reshape(len(self.X), -1)
        return self._cache["flat"]

    @property
    def is_table(self) -> bool:
        return self.X.ndim == 2

    @property
    def features(self) -> np.ndarray:
        """Rows as vectors for distances and the screening models: the pixels of images; the
        columns of tables, each numeric column and each categorical one weighing alike
        (``table_features``)."""
        return self.cached("features", lambda: table_features(self.flat, self.categorical) if self.is_table else self.flat)

    @property
    def view(self) -> tuple[np.ndarray, np.ndarray]:
        """What the screening models learn from: (inputs, vectors for nearest neighbours):
        images pooled to at most 16 pixels per side and their pixels; table rows and their
        columns as ``features`` weighs them."""

        def make() -> tuple[np.ndarray, np.ndarray]:
            if self.is_table:
                return self.X, self.features
            small = screening_view(self.X)
            return small, small.reshape(len(small), -1)

        return self.cached("view", make)

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # ---- out-of-sample probabilities
    def model_probs(self, exclude: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Each screening model's K-fold out-of-sample probabilities; rows in ``exclude``
        (a mask) are never trained on. Cached per mask."""
        if exclude is not None:
            return self.cached(self.refit_key(exclude), lambda: self._oos(exclude))
        return self.cached("model_probs", lambda: self._oos(None))

    @staticmethod
    def refit_key(exclude: np.ndarray) -> str:
        """The cache key of the probabilities refitted without the rows in ``exclude``."""
        return "model_probs-without-" + hashlib.sha256(np.packbits(exclude.astype(bool)).tobytes()).hexdigest() + f"-{len(exclude)}"

    def _oos(self, exclude: np.ndarray | None) -> dict[str, np.ndarray]:
        if self.mapper is None:
            return _oos_probs(*self.view, self.labels, self.num_classes, self.params, exclude=exclude)
        # the refits without doubted rows (label issues, shortcuts) are most of a screen's time: the
        # same seeded folds as the serial path, one item per fold
        folds, jobs = self.fold_jobs(exclude)
        return combine_folds(self.mapper(compute_evidence, jobs, label="screen-refit"), folds, len(self.X), self.num_classes)

    def fold_jobs(self, exclude: np.ndarray | None = None) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[Any, ...]]]:
        """The seeded K folds and, per fold, one fan-out item ``("fold", *arguments of
        fold_probs)`` that ``compute_evidence`` runs (``combine_folds`` puts the results back
        in row order)."""
        folds = oos_folds(self.labels, self.num_classes, self.params)
        X_view, features = self.view
        return folds, [("fold", X_view, features, self.labels, tr, te, self.num_classes, self.params, i, exclude)
                       for i, (tr, te) in enumerate(folds)]

    def pred_probs(self) -> np.ndarray:
        """The models' mean out-of-sample probabilities (N x K)."""
        return self.cached("pred_probs", lambda: ensemble(self.model_probs()))

    @property
    def typical(self) -> np.ndarray:
        """The median row (per feature), the reference for unusual pixel values."""
        return self.cached("typical", lambda: np.median(self.flat, axis=0))

    # ---- evidence with a recipe (``RECIPES``): computed here on first use, or ahead of the
    # detectors on a fan-out worker (``prefetch``), from the same function and arguments
    def evidence(self, key: str) -> Any:
        recipe = RECIPES[key]
        return self.cached(key, lambda: recipe.compute(*recipe.inputs(self)))

    def evidence_job(self, key: str) -> tuple[Any, ...]:
        """``(key, *arguments)``: one fan-out item that computes the evidence ``key``
        (``compute_evidence`` runs it)."""
        return (key, *RECIPES[key].inputs(self))

    def trimmed(self) -> tuple[np.ndarray, np.ndarray]:
        """Trimmed nearest neighbours in input space: the share agreeing with each row's
        label, and the residuals."""
        return self.evidence("trimmed")

    def screening_net(self) -> dict[str, np.ndarray]:
        """A briefly trained network on all rows: its loss curves."""
        return self.evidence("net")


@dataclass(frozen=True)
class Recipe:
    """How one piece of shared evidence is computed: a module-level function (so that a
    worker process or a Dask cluster can run it) and the context's inputs it takes."""

    compute: Callable[..., Any]
    inputs: Callable[[ScreenContext], tuple[Any, ...]]


# evidence key -> its recipe; the one description of each, read by ``ScreenContext.evidence``
# (serial, on first use) and by ``prefetch`` (ahead, through a mapper); the K-fold
# probabilities have their own path (``fold_jobs``), shared the same way
RECIPES: dict[str, Recipe] = {
    "net": Recipe(_train_screening_net, lambda ctx: (ctx.view[0], ctx.labels, ctx.num_classes, ctx.params)),
    "trimmed": Recipe(_trimmed_neighbours, lambda ctx: (ctx.features, ctx.labels)),
    "residuals": Recipe(_cross_class_residuals, lambda ctx: (ctx.flat, ctx.labels)),
    "datalab": Recipe(datalab_issues, lambda ctx: (ctx.features, ctx.labels)),
    # on the trimmed neighbours: after them, in a second wave
    "trigger_groups": Recipe(_trigger_groups, lambda ctx: (ctx.flat, ctx.labels, ctx.typical, ctx.trimmed(),
                                                           "table" if ctx.is_table else "image")),
}


def compute_evidence(job: tuple[Any, ...]) -> Any:
    """Run one fan-out item of a screen: a fold of the out-of-sample probabilities
    (``fold_jobs``) or the recipe named by ``job[0]`` (``evidence_job``), on the arguments
    after it."""
    key, args = job[0], job[1:]
    if key == "fold":
        return fold_probs(*args)
    if key not in RECIPES:
        raise ValueError(f"unknown evidence {key!r}")
    return RECIPES[key].compute(*args)
