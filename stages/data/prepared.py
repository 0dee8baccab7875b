"""The prepared on-disk form: plain ``.npy`` arrays (deterministic bytes) plus ``meta.json``,
and the fixed, stratified held-out split."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stages.data.io import Dataset
from stages.trust.hashing import merkle_root

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
            "dtype": "float32", "scale": "[0, 1]" if dataset.kind == "image" else "user units",
            "scaled_from": dataset.scaled_from, "has_annotator_labels": dataset.annotator_labels is not None,
            **data_schema(dataset)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    written.append(folder / "meta.json")
    return written


def data_schema(dataset: Dataset) -> dict[str, Any]:
    """What the data declares about itself, recorded in ``meta.json`` and the signed manifest:
    the kind of data, the class list, the table's columns (name, type, categories) or the
    images' layout."""
    schema: dict[str, Any] = {"kind": dataset.kind, "classes": list(dataset.classes)}
    if dataset.columns is not None:
        schema["columns"] = [dict(c) for c in dataset.columns]
        schema["missing"] = dataset.missing
    else:
        schema["layout"] = dataset.layout
    return schema


def class_name(meta: dict[str, Any], position: int) -> Any:
    """The user's label for class position ``position`` (the position itself without a class list)."""
    classes = meta.get("classes")
    return classes[position] if classes and 0 <= position < len(classes) else position


def row_values(X: np.ndarray, meta: dict[str, Any], i: int) -> dict[str, Any]:
    """``{"values": {column name: value as given}}`` for a table row (categories as text,
    missing cells as None); ``{}`` for images."""
    columns = meta.get("columns")
    if X.ndim != 2 or not columns:
        return {}
    values: dict[str, Any] = {}
    for column, v in zip(columns, X[i].tolist()):
        if v != v:  # NaN: a missing cell
            values[column["name"]] = None
        elif column["type"] == "categorical":
            values[column["name"]] = column["categories"][int(v)]
        else:
            values[column["name"]] = float(f"{v:.7g}")  # float32 holds about 7 significant digits
    return {"values": values}


def load_npy_bytes(data: bytes) -> np.ndarray:
    """An array from the bytes of one ``.npy`` file (never pickle)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def load_npz_bytes(data: bytes) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive given as bytes (never pickle)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def parse_prepared(files: Mapping[str, bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(X, y, annotator labels or None, meta) from the prepared files' bytes.

    ``files`` maps a file name to bytes that were checked against the signed manifest as
    they were read (``RunContext.dataset_bytes``): nothing here opens a file.
    """
    meta = json.loads(files["meta.json"])
    X = load_npy_bytes(files["X.npy"])
    y = load_npy_bytes(files["y.npy"])
    ann = load_npy_bytes(files["annotator_labels.npy"]) if "annotator_labels.npy" in files else None
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


def row_digest(X: np.ndarray, y: int, i: int) -> str:
    """SHA-256 of row ``i``'s bytes followed by its label (int64, little-endian)."""
    return hashlib.sha256(np.ascontiguousarray(X[i]).tobytes() + int(y).to_bytes(8, "little", signed=True)).hexdigest()


def accepted_rows_digest(X: np.ndarray, idx: np.ndarray, labels: np.ndarray) -> str:
    """Merkle root over the rows ``X[idx]`` with the labels they are trained on: the digest
    screening records for the accepted training set and training checks before it fits."""
    return merkle_root([{"path": f"row/{int(i)}", "sha256": row_digest(X, int(lab), int(i)), "size": 1}
                        for i, lab in zip(idx, labels)])
