"""The benchmark's datasets, one split per seed.

Images: scikit-learn's digits (8x8) and a 10,000-row subset of MNIST (28x28, read from
``../shared/data/mnist`` when present). Tables: scikit-learn's breast cancer (30 columns,
binary) and wine (13 columns, 3 classes), min-max scaled on the training rows (test rows
clipped to the training range), as the screen receives them after preprocessing.

Every seed draws its own split (and its own MNIST subset), so thresholds calibrated on
some seeds are measured on rows they never saw.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np



def _find_mnist() -> Path:
    """``$MLSEC_MNIST_DIR``, else the first ``shared/data/mnist`` above this checkout."""
    if os.environ.get("MLSEC_MNIST_DIR"):
        return Path(os.environ["MLSEC_MNIST_DIR"])
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "data" / "mnist").is_dir():
            return parent / "shared" / "data" / "mnist"
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


MNIST_DIR = _find_mnist()
IMAGES = ("digits", "mnist")
TABLES = ("breast_cancer", "wine")
DATASETS = IMAGES + TABLES


@dataclass
class Split:
    """One dataset split: training rows (to poison and screen) and test rows (for accuracy and ASR)."""

    name: str
    seed: int
    Xtr: np.ndarray
    ytr: np.ndarray
    Xte: np.ndarray
    yte: np.ndarray
    columns: list[str] | None = None

    @property
    def K(self) -> int:
        return int(max(self.ytr.max(), self.yte.max())) + 1

    @property
    def is_table(self) -> bool:
        return self.Xtr.ndim == 2


def _idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=header)


def mnist_available() -> bool:
    return (MNIST_DIR / "train-images-idx3-ubyte.gz").exists()


def _stratified(y: np.ndarray, *, seed: int, test: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test, stratify=y, random_state=seed)
    return np.sort(tr), np.sort(te)


def load_split(name: str, *, seed: int, mnist_rows: int = 10_000, test: float = 0.2) -> Split:
    """The ``seed``-th split of dataset ``name`` (stratified, ``test`` of the rows held out)."""
    columns = None
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        X, y = (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)
    elif name == "mnist":
        if not mnist_available():
            raise FileNotFoundError(f"MNIST not found in {MNIST_DIR}")
        X = _idx(MNIST_DIR / "train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
        y = _idx(MNIST_DIR / "train-labels-idx1-ubyte.gz", 8).astype(np.int64)
        pick = np.sort(np.random.default_rng(1000 + seed).permutation(len(X))[:mnist_rows])
        X, y = (X[pick] / 255.0).astype(np.float32), y[pick]
    elif name in TABLES:
        from sklearn import datasets

        d = datasets.load_breast_cancer() if name == "breast_cancer" else datasets.load_wine()
        X, y = d.data.astype(np.float64), d.target.astype(np.int64)
        columns = [str(c) for c in d.feature_names]
    else:
        raise ValueError(f"unknown dataset {name!r}; known: {DATASETS}")
    tr, te = _stratified(y, seed=seed, test=test)
    Xtr, Xte = X[tr], X[te]
    if name in TABLES:
        lo, hi = Xtr.min(0), Xtr.max(0)
        span = np.where(hi > lo, hi - lo, 1.0)
        Xtr = ((Xtr - lo) / span).astype(np.float32)
        Xte = np.clip((Xte - lo) / span, 0, 1).astype(np.float32)
    return Split(name, seed, Xtr, y[tr], Xte, y[te], columns)
