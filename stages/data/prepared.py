"""The prepared on-disk form: plain ``.npy`` arrays (deterministic bytes) plus ``meta.json``,
and the fixed, stratified held-out split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from stages.data.io import Dataset

ARRAY_FILES = ("X.npy", "y.npy", "annotator_labels.npy")


def write_prepared(dataset: Dataset, folder: Path) -> list[Path]:
    """Write the normal form as plain .npy files (deterministic bytes) plus meta.json."""
    folder.mkdir(parents=True, exist_ok=False)
    written = []
    arrays = {"X.npy": dataset.X, "y.npy": dataset.y}
    if dataset.annotator_labels is not None:
        arrays["annotator_labels.npy"] = dataset.annotator_labels
    for name, array in arrays.items():
        np.save(folder / name, array, allow_pickle=False)
        written.append(folder / name)
    meta = {"n": int(len(dataset.y)), "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes,
            "dtype": "float32", "scale": "[0, 1]", "scaled_from": dataset.scaled_from,
            "has_annotator_labels": dataset.annotator_labels is not None}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    written.append(folder / "meta.json")
    return written


def read_prepared(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Read the prepared arrays (callers verify them against the manifest first)."""
    meta = json.loads((folder / "meta.json").read_text())
    X = np.load(folder / "X.npy", allow_pickle=False)
    y = np.load(folder / "y.npy", allow_pickle=False)
    ann_path = folder / "annotator_labels.npy"
    ann = np.load(ann_path, allow_pickle=False) if ann_path.exists() else None
    return X, y, ann, meta


def split_indices(y: np.ndarray, *, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test split of row positions (deterministic for a seed)."""
    from sklearn.model_selection import (
        train_test_split,  # scikit-learn: slow to import, kept off the command line's start
    )

    idx = np.arange(len(y))
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=stratify)
    return np.sort(train), np.sort(test)
