"""Reading sources into one in-memory form, and the prepared on-disk form.

Sources (``data.source`` or ``mlsec run --data``):
    ``sklearn:digits``         scikit-learn's bundled 8x8 digits (pixel values 0..16, scaled by /16)
    ``*.npz``                  ``X`` (N x H x W, N x C x H x W or N x F), ``y`` (N integer labels),
                               optional ``annotator_labels`` (N x A, -1 = no label); read without pickle
    ``*.csv`` / ``*.parquet``  one row per sample, a label column (``data.label_column``), numeric features
    a folder of MNIST IDX      ``train-images-idx3-ubyte[.gz]`` + ``train-labels-idx1-ubyte[.gz]``

Normal form: ``X`` float32 on the [0, 1] scale (uint8 is divided by 255), images as
N x C x H x W, tabular rows as N x F; ``y`` int64; ``annotator_labels`` int64 or absent.
Every input check lives in :func:`check_arrays`; all run before anything is written.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.core.errors import InvalidInput


@dataclass(frozen=True)
class Dataset:
    X: np.ndarray
    y: np.ndarray
    annotator_labels: np.ndarray | None
    source: str
    scaled_from: str

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.X.shape[1:])


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import (
        load_digits,  # slow to import; only the readers that need it pay
    )

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise InvalidInput(f"{path} is not an NPZ archive")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            if not {"X", "y"} <= names:
                raise InvalidInput(f"{path} must hold arrays 'X' and 'y', found {sorted(names)}")
            return {k: archive[k] for k in ("X", "y", "annotator_labels") if k in names}
    except InvalidInput:
        raise
    except ValueError as err:
        raise InvalidInput(f"{path}: cannot read arrays without pickle ({str(err).splitlines()[0]})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise InvalidInput(f"{path} is not a readable NPZ archive ({err})") from None


def _load_table(path: Path, label_column: str, image_shape: tuple[int, ...] | None) -> dict[str, np.ndarray]:
    import pandas as pd  # slow to import; only the readers that need it pay

    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as err:  # noqa: BLE001 - pandas raises many kinds
        raise InvalidInput(f"{path}: cannot read table ({str(err).splitlines()[0]})") from None
    if label_column not in frame.columns:
        raise InvalidInput(f"{path}: label column {label_column!r} not found; columns are {list(frame.columns)[:10]}")
    features = frame.drop(columns=[label_column])
    non_numeric = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if non_numeric:
        raise InvalidInput(f"{path}: non-numeric feature columns {non_numeric[:5]}")
    X = features.to_numpy()
    if image_shape:
        if int(np.prod(image_shape)) != X.shape[1]:
            raise InvalidInput(f"{path}: data.image_shape {list(image_shape)} does not fit {X.shape[1]} features")
        X = X.reshape((len(X), *image_shape))
    return {"X": X, "y": frame[label_column].to_numpy()}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 8:
        raise InvalidInput(f"{path}: too short for an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise InvalidInput(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(raw) - offset != count:
        raise InvalidInput(f"{path}: header says {count} values, file holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise InvalidInput(f"{folder}: no {stem}[.gz] found")


def _load_idx_folder(folder: Path) -> dict[str, np.ndarray]:
    return {"X": _read_idx(_find(folder, "train-images-idx3-ubyte")), "y": _read_idx(_find(folder, "train-labels-idx1-ubyte"))}


def check_arrays(X: np.ndarray, y: np.ndarray, annotator_labels: np.ndarray | None, *, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """Check and normalise arrays; every rejection is one line that names what was seen."""
    if X.dtype == object or y.dtype == object:
        raise InvalidInput(f"{where}: object arrays are not accepted")
    if X.ndim not in (2, 3, 4):
        raise InvalidInput(f"{where}: X must be N x F, N x H x W or N x C x H x W, got shape {X.shape}")
    if y.ndim != 1:
        raise InvalidInput(f"{where}: y must be one label per row, got shape {y.shape}")
    if len(X) != len(y):
        raise InvalidInput(f"{where}: X and y must be the same length, but X has {len(X)} rows and y has {len(y)}")
    if len(X) == 0:
        raise InvalidInput(f"{where}: the dataset is empty")
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == np.bool_):
        raise InvalidInput(f"{where}: X must be numeric, got dtype {X.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        finite = np.isfinite(y)
        if not finite.all() or not np.all(np.mod(y, 1) == 0):
            bad = y[~finite | (np.mod(np.where(finite, y, 0), 1) != 0)][:3]
            raise InvalidInput(f"{where}: labels must be integers, found {bad.tolist()}")
    elif not np.issubdtype(y.dtype, np.integer):
        raise InvalidInput(f"{where}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise InvalidInput(f"{where}: labels must be >= 0, found {int(y.min())}")
    if X.dtype == np.uint8:
        Xf, scaled = X.astype(np.float32) / 255.0, "uint8/255"
    else:
        Xf, scaled = X.astype(np.float32), "none"
    if not np.isfinite(Xf).all():
        n_bad = int((~np.isfinite(Xf)).reshape(len(Xf), -1).any(axis=1).sum())
        raise InvalidInput(f"{where}: X holds NaN or infinite values in {n_bad} rows")
    if Xf.ndim == 3:
        Xf = Xf[:, None, :, :]
    if annotator_labels is not None:
        if annotator_labels.ndim != 2 or len(annotator_labels) != len(y):
            raise InvalidInput(f"{where}: annotator_labels must be N x A with N={len(y)}, got shape {annotator_labels.shape}")
        if not np.issubdtype(annotator_labels.dtype, np.integer):
            raise InvalidInput(f"{where}: annotator_labels must be integers (-1 = no label), got dtype {annotator_labels.dtype}")
        annotator_labels = annotator_labels.astype(np.int64)
        if annotator_labels.min() < -1:
            raise InvalidInput(f"{where}: annotator_labels must be >= -1, found {int(annotator_labels.min())}")
    return np.ascontiguousarray(Xf), y, annotator_labels, scaled


def load_source(source: str, *, label_column: str = "label", image_shape: tuple[int, ...] | None = None) -> Dataset:
    """Read a source into the normal form, or raise InvalidInput."""
    if source == "sklearn:digits":
        X, y = _load_digits()
        return Dataset(X[:, None], y, None, source, "pixel/16")
    path = Path(source)
    if not path.exists():
        raise InvalidInput(f"data source not found: {source}")
    if path.is_dir():
        arrays = _load_idx_folder(path)
    elif path.suffix == ".npz":
        arrays = _load_npz(path)
    elif path.suffix in (".csv", ".parquet"):
        arrays = _load_table(path, label_column, image_shape)
    elif path.name.endswith(("-ubyte", "-ubyte.gz")):
        arrays = _load_idx_folder(path.parent)
    else:
        raise InvalidInput(f"unsupported data source {source}: use .npz, .csv, .parquet, an MNIST IDX folder or sklearn:digits")
    X, y, ann, scaled = check_arrays(np.asarray(arrays["X"]), np.asarray(arrays["y"]), arrays.get("annotator_labels"), where=str(path))
    return Dataset(X, y, ann, str(path.resolve()), scaled)
