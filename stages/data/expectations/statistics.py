"""Dataset statistics in numpy, one pass: per-feature aggregates, duplicate rows, class counts."""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any

import numpy as np

from stages.core.errors import InvalidInput

STATISTICS_FORMAT = "mlsec.dataset_statistics/1"


def _as_2d(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes at the boundary; return X as N x K (C order) and y as given."""
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim < 2:
        raise InvalidInput(f"X must have a sample axis and at least one feature axis, got shape {X.shape}")
    if y.ndim != 1:
        raise InvalidInput(f"y must be one label per sample (1-D), got shape {y.shape}")
    if len(X) != len(y):
        raise InvalidInput(f"X and y must be the same length, but X has {len(X)} samples and y has {len(y)}")
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == np.bool_):
        raise InvalidInput(f"X must be numeric, got dtype {X.dtype}")
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
        raise InvalidInput(f"y must be numeric labels, got dtype {y.dtype}")
    return np.ascontiguousarray(X.reshape(len(X), -1)), y


def _chunked_std(Xf: np.ndarray, mean: np.ndarray, rows: int = 8192) -> np.ndarray:
    """Population std per column, squares summed in float64, without a copy of the array."""
    centre = mean.astype(Xf.dtype)
    squares = np.zeros(Xf.shape[1], dtype=np.float64)
    for start in range(0, len(Xf), rows):
        centred = Xf[start:start + rows] - centre
        centred *= centred
        squares += centred.sum(axis=0, dtype=np.float64)
    # sum((x - c)^2) / n = var + (mean - c)^2: remove the rounding of the centre
    return np.sqrt(np.maximum(squares / len(Xf) - (mean - centre.astype(np.float64)) ** 2, 0.0))


def _feature_aggregates(X2: np.ndarray) -> dict[str, np.ndarray]:
    """Per-feature min, max (NaN ignored), NaN and inf counts, mean and std (finite values)."""
    n, k = X2.shape
    Xf = X2 if np.issubdtype(X2.dtype, np.floating) else X2.astype(np.float64)
    if n == 0:
        nan_k = np.full(k, np.nan)
        zeros = np.zeros(k, dtype=np.int64)
        return {"min": nan_k, "max": nan_k, "n_nan": zeros, "n_inf": zeros, "mean": nan_k, "std": nan_k}
    finite = np.isfinite(Xf)
    if finite.all():
        zeros = np.zeros(k, dtype=np.int64)
        return {
            "min": Xf.min(axis=0).astype(np.float64),
            "max": Xf.max(axis=0).astype(np.float64),
            "n_nan": zeros,
            "n_inf": zeros,
            "mean": (mean := Xf.mean(axis=0, dtype=np.float64)),
            "std": _chunked_std(Xf, mean),
        }
    isnan = np.isnan(Xf)
    masked = np.where(finite, Xf, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN features give NaN on purpose
        return {
            "min": np.nanmin(Xf, axis=0).astype(np.float64),
            "max": np.nanmax(Xf, axis=0).astype(np.float64),
            "n_nan": isnan.sum(axis=0).astype(np.int64),
            "n_inf": (~finite & ~isnan).sum(axis=0).astype(np.int64),
            "mean": np.nanmean(masked, axis=0, dtype=np.float64),
            "std": np.nanstd(masked, axis=0, dtype=np.float64),
        }


def _duplicate_fraction(X2: np.ndarray) -> float:
    """Fraction of rows whose feature bytes repeat an earlier row (BLAKE2b-128 per row)."""
    n = len(X2)
    if n == 0:
        return 0.0
    rows = np.ascontiguousarray(X2)
    seen = {hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows}
    return (n - len(seen)) / n


def _class_key(value: Any) -> str:
    """Label as text; a float label keeps its ".0" so it stays visible as a float."""
    return str(value.item() if isinstance(value, np.generic) else value)


def _class_counts(y: np.ndarray, class_names: list[str] | None = None) -> dict[str, int]:
    """Rows per class, keyed by the class name (``class_names[label]``) or the label as text."""
    if y.size == 0:
        return {}
    values, counts = np.unique(y[~np.isnan(y)] if np.issubdtype(y.dtype, np.floating) else y, return_counts=True)
    out = {}
    for v, c in zip(values, counts):
        inside = class_names is not None and np.issubdtype(values.dtype, np.integer) and 0 <= v < len(class_names)
        out[class_names[int(v)] if inside else _class_key(v)] = int(c)
    return out


def _json_float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _statistics(X2: np.ndarray, X_shape: tuple[int, ...], X_dtype: np.dtype, y: np.ndarray,
                agg: dict[str, np.ndarray], duplicate_fraction: float, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    n = len(X2)
    class_names = _class_names(schema)
    counts = _class_counts(y, class_names)
    described: dict[str, Any] = {}
    if schema is not None:
        described = {"kind": schema.get("kind"), "classes": list(schema.get("classes") or [])}
        if schema.get("columns") is not None:
            described["feature_names"] = [c["name"] for c in schema["columns"]]
    return {**described,
        "format": STATISTICS_FORMAT,
        "n": n,
        "shape": [int(s) for s in X_shape],
        "dtype": str(X_dtype),
        "label_dtype": str(y.dtype),
        "n_features": int(X2.shape[1]),
        "feature_mean": [_json_float(v) for v in agg["mean"]],
        "feature_std": [_json_float(v) for v in agg["std"]],
        "class_count": counts,
        "class_fraction": {k: c / n for k, c in counts.items()} if n else {},
        "duplicate_fraction": duplicate_fraction,
    }


def _class_names(schema: dict[str, Any] | None) -> list[str] | None:
    """The declared class list as text (how classes are keyed), or None without one."""
    if schema is None or not schema.get("classes"):
        return None
    return [str(c) for c in schema["classes"]]


def dataset_statistics(X: np.ndarray, y: np.ndarray, *, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Statistics of one dataset, saved as the drift reference for the next run.

    Parameters
    ----------
    X : ndarray, shape (N, ...) such as (N, C, H, W) or (N, F)
        Features on the [0, 1] scale; flattened per sample in C order.
    y : ndarray, shape (N,)
        Integer labels (positions in the class list).
    schema : dict or None
        The data's own description (``stages.data.prepared.data_schema``: kind, classes,
        columns); recorded so the next run can compare names and classes.

    Returns
    -------
    dict (JSON-able)
        ``format``, ``n``, ``shape`` (of X), ``dtype``, ``label_dtype``, ``n_features``,
        ``feature_mean`` and ``feature_std`` (lists of K floats, population std over the
        finite values of each feature; None where a feature has none), ``class_count``
        and ``class_fraction`` (keyed by the class name, or the label as text without a
        schema) and ``duplicate_fraction``; with a schema also ``kind``, ``classes`` and,
        for tables, ``feature_names``.
    """
    X_arr = np.asarray(X)
    X2, y = _as_2d(X_arr, y)
    return _statistics(X2, X_arr.shape, X_arr.dtype, y, _feature_aggregates(X2), _duplicate_fraction(X2), schema)


def _reference_arrays(reference: dict[str, Any], k: int) -> tuple[np.ndarray, np.ndarray, dict[str, float], str]:
    """Reference means, stds and class fractions; NaN where unusable, plus a note why."""
    nan_k = np.full(k, np.nan)
    try:
        mean = np.asarray([np.nan if v is None else float(v) for v in reference["feature_mean"]], dtype=np.float64)
        std = np.asarray([np.nan if v is None else float(v) for v in reference["feature_std"]], dtype=np.float64)
        fractions = {str(c): float(f) for c, f in dict(reference["class_fraction"]).items()}
    except (KeyError, TypeError, ValueError) as err:
        return nan_k, nan_k, {}, f"reference statistics unreadable ({type(err).__name__}: {err})"
    if len(mean) != k or len(std) != k:
        return nan_k, nan_k, fractions, f"reference has {len(mean)} features, this dataset {k}"
    return mean, std, fractions, ""
