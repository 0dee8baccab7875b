"""Reading sources into one in-memory form, and the prepared on-disk form.

Sources (``data.source`` or ``mlsec run --data``):
    ``sklearn:digits``         scikit-learn's bundled 8x8 digits (pixel values 0..16, scaled by /16)
    ``*.npz``                  ``X`` (N x H x W, N x C x H x W, N x H x W x C or N x F), ``y`` (N labels:
                               whole numbers or text), optional ``annotator_labels`` (N x A, -1 = no
                               label); read without pickle
    ``*.csv`` / ``*.parquet``  one row per sample, named columns on any scale, a label column
                               (``data.label_column``); see ``stages.data.tables``
    a folder of MNIST IDX      ``train-images-idx3-ubyte[.gz]`` + ``train-labels-idx1-ubyte[.gz]``

Normal form, by kind of data:
    ``image``  ``X`` float32 N x C x H x W on the [0, 1] scale (uint8 is divided by 255,
               uint16 by 65535; channels-last arrays are transposed); any height, width and
               channel count; float images must already lie in [0, 1].
    ``table``  ``X`` float32 N x F in the user's units (categorical columns as category
               codes, missing cells NaN), with the column schema; the preprocessing that
               maps rows onto [0, 1] is fitted later, on the accepted training rows only.
``y`` holds class positions 0..K-1 (int64) into the class list ``classes`` (declared in
``data.classes`` or the labels found, sorted; ``stages.data.labels``); ``annotator_labels``
int64 positions or absent. Every input check runs before anything is written.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.errors import InvalidInput
from stages.data.labels import encode_annotator_labels, encode_labels
from stages.data.tables import read_table

IMAGE, TABLE = "image", "table"
_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


@dataclass(frozen=True)
class Dataset:
    """One dataset in the normal form (see the module docstring)."""

    X: np.ndarray
    y: np.ndarray
    annotator_labels: np.ndarray | None
    source: str
    scaled_from: str
    classes: tuple = ()
    columns: tuple[dict[str, Any], ...] | None = None  # the table schema; None for images
    layout: str = "NCHW"  # images: the layout they came in (NCHW or NHWC)
    missing: str = "refuse"  # tables: the declared policy for missing cells (refuse or impute)

    @property
    def kind(self) -> str:
        return TABLE if self.X.ndim == 2 else IMAGE

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.y.max()) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.X.shape[1:])

    @property
    def feature_names(self) -> list[str] | None:
        return [c["name"] for c in self.columns] if self.columns is not None else None


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import (
        load_digits,  # slow to import; only the readers that need it pay
    )

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if path.stat().st_size == 0:
        raise InvalidInput(f"{path} is empty")
    if not zipfile.is_zipfile(path):
        raise InvalidInput(f"{path} is not an NPZ archive")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            if not {"X", "y"} <= names:
                raise InvalidInput(f"{path} must hold arrays 'X' and 'y', found {sorted(names)}")
            out = {}
            for key in ("X", "y", "annotator_labels"):
                if key not in names:
                    continue
                try:
                    out[key] = archive[key]
                except ValueError as err:
                    if "allow_pickle" in str(err):
                        raise InvalidInput(f"{path}: array {key!r} is stored as Python objects (pickle), which is "
                                           f"refused; store it as one numeric array (images of one size, "
                                           f"mixed image sizes are not accepted)") from None
                    raise
            return out
    except InvalidInput:
        raise
    except ValueError as err:
        raise InvalidInput(f"{path}: cannot read arrays without pickle ({str(err).splitlines()[0]})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise InvalidInput(f"{path} is not a readable NPZ archive ({err})") from None


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


def _to_unit_scale(X: np.ndarray, *, where: str) -> tuple[np.ndarray, str]:
    """Images onto the [0, 1] scale: uint8 / 255, uint16 / 65535, booleans as 0/1, floats as given."""
    if X.dtype == np.uint8:
        return X.astype(np.float32) / 255.0, "uint8/255"
    if X.dtype == np.uint16:
        return X.astype(np.float32) / 65535.0, "uint16/65535"
    if X.dtype == np.bool_:
        return X.astype(np.float32), "bool"
    Xf = X.astype(np.float32)
    if not np.isfinite(Xf).all():
        n_bad = int((~np.isfinite(Xf)).reshape(len(Xf), -1).any(axis=1).sum())
        raise InvalidInput(f"{where}: X holds NaN or infinite values in {n_bad} images")
    lo, hi = float(Xf.min()), float(Xf.max())
    if lo < 0 or hi > 1:
        hint = " (uint8-range pixels stored as numbers: store them as uint8, or divide by 255)" if hi <= 255 and lo >= 0 else ""
        raise InvalidInput(f"{where}: {X.dtype} images must lie on the [0, 1] scale, found values in [{lo:g}, {hi:g}]{hint}")
    return Xf, "none"


def _channels_first(X: np.ndarray) -> tuple[np.ndarray, str]:
    """N x H x W -> N x 1 x H x W; N x H x W x C (C in 1, 3, 4; not channels-first) -> N x C x H x W."""
    if X.ndim == 3:
        return X[:, None, :, :], "NHW"
    if X.shape[-1] in _CHANNELS and X.shape[1] not in _CHANNELS:
        return np.moveaxis(X, -1, 1), "NHWC"
    return X, "NCHW"


def _describe_image(shape: tuple[int, ...]) -> str:
    c = shape[0]
    name = {1: "grayscale", 3: "RGB", 4: "RGBA"}.get(c, f"{c}-channel")
    return f"{c}-channel ({name}) {shape[1]} x {shape[2]}"


def check_image_shape(shape: tuple[int, ...], declared: tuple[int, ...] | None, *, where: str) -> None:
    """The images' C x H x W against ``data.image_shape`` ([H, W] means one channel, grayscale)."""
    if not declared:
        return
    want = (1, *declared) if len(declared) == 2 else tuple(declared)
    if len(want) != 3:
        raise InvalidInput(f"data.image_shape must be [H, W] or [C, H, W], got {list(declared)}")
    if tuple(shape) != want:
        raise InvalidInput(f"{where}: X holds {_describe_image(tuple(shape))} images where data.image_shape "
                           f"{list(declared)} declares {_describe_image(want)}")


def check_arrays(X: np.ndarray, y: np.ndarray, annotator_labels: np.ndarray | None, *, where: str,
                 classes: list | tuple | None = None, image_shape: tuple[int, ...] | None = None,
                 table: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str, list, str]:
    """Check and normalise arrays; every rejection is one line that names what was seen.

    Returns (X, class positions, annotator positions or None, scaling applied, class list,
    image layout). Labels are mapped onto the class list before anything is sized by them.
    ``table`` marks rows from a table reader (user units, NaN allowed by its policy).
    """
    if X.dtype == object or X.dtype.kind in "USV":
        raise InvalidInput(f"{where}: X must be numeric, got dtype {X.dtype}")
    if X.ndim not in (2, 3, 4):
        raise InvalidInput(f"{where}: X must be N x F, N x H x W, N x C x H x W or N x H x W x C, got shape {X.shape}")
    if y.ndim != 1:
        raise InvalidInput(f"{where}: y must be one label per row, got shape {y.shape}")
    if len(X) != len(y):
        raise InvalidInput(f"{where}: X and y must be the same length, but X has {len(X)} rows and y has {len(y)}")
    if len(X) == 0:
        raise InvalidInput(f"{where}: the dataset is empty")
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == np.bool_):
        raise InvalidInput(f"{where}: X must be numeric, got dtype {X.dtype}")
    if X.ndim > 2 and min(X.shape[1:]) == 0 or X.ndim == 2 and X.shape[1] == 0:
        raise InvalidInput(f"{where}: X has no features, shape {X.shape}")
    codes, class_list = encode_labels(y, declared=classes, where=where)
    if annotator_labels is not None:
        if annotator_labels.ndim != 2 or len(annotator_labels) != len(y):
            raise InvalidInput(f"{where}: annotator_labels must be N x A with N={len(y)}, got shape {annotator_labels.shape}")
        annotator_labels = encode_annotator_labels(annotator_labels, class_list, where=where)
    if X.ndim == 2:
        Xf = X.astype(np.float32)
        if not table and not np.isfinite(Xf).all():
            n_bad = int((~np.isfinite(Xf)).any(axis=1).sum())
            raise InvalidInput(f"{where}: X holds NaN or infinite values in {n_bad} rows")
        return np.ascontiguousarray(Xf), codes, annotator_labels, "none", class_list, "NF"
    X, layout = _channels_first(X)
    check_image_shape(tuple(int(d) for d in X.shape[1:]), image_shape, where=where)
    Xf, scaled = _to_unit_scale(X, where=where)
    return np.ascontiguousarray(Xf), codes, annotator_labels, scaled, class_list, layout


def load_source(source: str, *, label_column: str = "label", image_shape: tuple[int, ...] | None = None,
                classes: list | tuple | None = None, columns: dict[str, str] | None = None,
                missing: str = "refuse", max_categories: int = 50) -> Dataset:
    """Read a source into the normal form, or raise InvalidInput (the settings are ``data.*``)."""
    if source == "sklearn:digits":
        X, y = _load_digits()
        codes, class_list = encode_labels(y, declared=classes, where=source)
        return Dataset(X[:, None], codes, None, source, "pixel/16", classes=tuple(class_list))
    path = Path(source)
    if not path.exists():
        raise InvalidInput(f"data source not found: {source}")
    schema = None
    if path.is_dir():
        arrays = _load_idx_folder(path)
    elif path.suffix == ".npz":
        arrays = _load_npz(path)
    elif path.suffix in (".csv", ".parquet"):
        table = read_table(path, label_column=label_column, columns=columns, missing=missing, max_categories=max_categories)
        arrays = {"X": table.X, "y": table.labels}
        if image_shape:
            arrays["X"] = _rows_as_images(table, image_shape, where=str(path))
        else:
            schema = tuple(table.columns)
    elif path.name.endswith(("-ubyte", "-ubyte.gz")):
        arrays = _load_idx_folder(path.parent)
    else:
        raise InvalidInput(f"unsupported data source {source}: use .npz, .csv, .parquet, an MNIST IDX folder or sklearn:digits")
    X = np.asarray(arrays["X"])
    if X.ndim == 2 and schema is None and X.dtype != object:
        schema = tuple({"name": f"f{j}", "type": "numeric"} for j in range(X.shape[1]))
    X, y, ann, scaled, class_list, layout = check_arrays(
        X, np.asarray(arrays["y"]), arrays.get("annotator_labels"), where=str(path), classes=classes,
        image_shape=image_shape if schema is None else None, table=schema is not None and path.suffix in (".csv", ".parquet"))
    return Dataset(X, y, ann, str(path.resolve()), scaled, classes=tuple(class_list), columns=schema, layout=layout,
                   missing=missing)


def _rows_as_images(table, image_shape: tuple[int, ...], *, where: str) -> np.ndarray:
    """Flat table rows (pixel columns) reshaped to images of ``data.image_shape``."""
    if any(c["type"] != "numeric" for c in table.columns):
        raise InvalidInput(f"{where}: data.image_shape reads rows as images, but some columns hold text")
    shape = tuple(image_shape)
    if int(np.prod(shape)) != table.X.shape[1]:
        raise InvalidInput(f"{where}: data.image_shape {list(shape)} does not fit {table.X.shape[1]} features")
    if np.isnan(table.X).any():
        raise InvalidInput(f"{where}: image rows have missing pixels")
    return table.X.reshape((len(table.X), *shape))
