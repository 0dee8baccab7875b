"""Request inputs: checked at the service boundary, digested and summarised for telemetry.

The service takes float inputs on the [0, 1] scale, one row per sample, either in the
model's input shape (``N x C x H x W``) or flattened (``N x F``). Every check raises
``InvalidInput`` with a message that shows what was seen; nothing here raises anything else
for any JSON value.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from stages.core.errors import InvalidInput
from stages.data.preprocessing import CATEGORICAL, apply_table_preprocessing, check_spec


def _shape_of(value: Any, *, depth: int, limit: int) -> tuple[int, ...]:
    """The rectangular shape of nested lists (InvalidInput when ragged, too deep or not numbers)."""
    shape: list[int] = []
    node = value
    while isinstance(node, list):
        if len(shape) >= depth:
            raise InvalidInput(f"inputs are nested {len(shape) + 1} deep or more; at most {depth} levels are expected")
        shape.append(len(node))
        if not node:
            break
        node = node[0]
    total = math.prod(shape) if shape else 0
    if total > limit:
        raise InvalidInput(f"inputs hold {total} values, more than the {limit} a request may carry")
    return tuple(shape)


def _check_batch(value: Any, *, max_batch: int) -> None:
    """A request's ``inputs``: a non-empty list of at most ``max_batch`` rows (images and tables alike)."""
    if not isinstance(value, list):
        raise InvalidInput(f"'inputs' must be a list of rows, got {type(value).__name__}")
    if not value:
        raise InvalidInput("'inputs' is empty: send at least one row")
    if len(value) > max_batch:
        raise InvalidInput(f"'inputs' has {len(value)} rows, more than the limit of {max_batch} per request")


def check_inputs(value: Any, *, input_shape: tuple[int, ...], max_batch: int) -> np.ndarray:
    """Turn a request's ``inputs`` into a float32 array of shape ``(N, *input_shape)``.

    Parameters
    ----------
    value : nested lists of numbers
        ``N x prod(input_shape)`` or ``N x input_shape``; values on the [0, 1] scale.
    input_shape : tuple of int
        The model's input shape without the batch axis, e.g. ``(1, 8, 8)``.
    max_batch : int
        Most rows one request may carry.

    Raises
    ------
    InvalidInput
        Not a list of rows, ragged rows, wrong shape, non-numbers (booleans and strings
        included), NaN or infinity, values outside [0, 1], an empty batch or too many rows.
    """
    _check_batch(value, max_batch=max_batch)
    features = math.prod(input_shape)
    shape = _shape_of(value, depth=len(input_shape) + 1, limit=max_batch * features)
    flat_ok = shape == (len(value), features)
    full_ok = shape == (len(value), *input_shape)
    if not (flat_ok or full_ok):
        raise InvalidInput(f"each row must have shape {list(input_shape)} or [{features}], got rows of shape {list(shape[1:])}")
    try:
        arr = np.array(value, dtype=object)
    except (ValueError, TypeError):
        raise InvalidInput("inputs are ragged: every row must have the same shape") from None
    if arr.shape != shape:
        raise InvalidInput(f"inputs are ragged: expected shape {list(shape)}, some rows differ")
    flat = arr.reshape(-1)
    kinds = {type(v) for v in flat}
    if not kinds <= {int, float}:
        bad = sorted(k.__name__ for k in kinds - {int, float})
        raise InvalidInput(f"inputs must be numbers, got {', '.join(bad)}")
    try:
        out = flat.astype(np.float64)
    except OverflowError:
        raise InvalidInput("inputs hold an integer too large for a float") from None
    if not np.isfinite(out).all():
        raise InvalidInput(f"inputs hold {int((~np.isfinite(out)).sum())} NaN or infinite values")
    lo, hi = float(out.min()), float(out.max())
    if lo < 0 or hi > 1:
        raise InvalidInput(f"inputs must lie in [0, 1] (the model's input scale), got values in [{lo:g}, {hi:g}]")
    return out.astype(np.float32).reshape(len(value), *input_shape)


def _cell(value: Any, *, kind: str, row: int, name: str) -> Any:
    """One table cell as JSON gave it: a finite number for a numeric column, text (or a
    number, compared as text) for a categorical one, ``None`` for missing."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidInput(f"row {row}, column {name!r}: expected a {kind} value, got {type(value).__name__}")
    if kind == CATEGORICAL:
        return str(value)
    if isinstance(value, str):
        raise InvalidInput(f"row {row}, column {name!r}: expected a number, got text {value[:40]!r}")
    try:
        number = float(value)
    except OverflowError:
        raise InvalidInput(f"row {row}, column {name!r}: the integer is too large for a float") from None
    if not math.isfinite(number):
        raise InvalidInput(f"row {row}, column {name!r}: NaN and infinity are not values (send null for a missing cell)")
    return number


def check_table_rows(value: Any, *, spec: dict[str, Any], max_batch: int) -> np.ndarray:
    """The scaled features of a request's table rows (:func:`table_request` without the rows)."""
    return table_request(value, spec=spec, max_batch=max_batch)[0]


def table_request(value: Any, *, spec: dict[str, Any], max_batch: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Turn a request's ``inputs`` for a table model into the scaled features the network
    sees (float32, ``N x D`` on [0, 1]), through the model's signed preprocessing ``spec``,
    and the raw rows as the client sent them, keyed by column name in the spec's column order
    (numbers as floats, categories as text, ``None`` for a missing cell): what a review
    queue keeps of a flagged row.

    Parameters
    ----------
    value : list of objects or list of lists
        Raw rows in the user's units: objects keyed by exactly the declared column names,
        or lists in the declared column order; numbers for numeric columns, text for
        categorical ones, ``null`` for a missing cell (refused or imputed as the model
        was trained).
    spec : dict
        The table preprocessing spec from the verified model package.
    max_batch : int
        Most rows one request may carry.

    Raises
    ------
    InvalidInput
        Naming the row and column: an unknown or missing column, a row of the wrong
        length, text or a boolean where a number was declared, NaN or infinity, a missing
        cell the policy refuses; or an empty batch or too many rows.
    """
    check_spec(spec)
    columns = spec["columns"]
    names = [c["name"] for c in columns]
    _check_batch(value, max_batch=max_batch)
    known = set(names)
    cells: list[list[Any]] = []
    for i, row in enumerate(value):
        if isinstance(row, dict):
            unknown = [k for k in row if k not in known]
            if unknown:
                raise InvalidInput(f"row {i}: unknown column(s) {[str(k)[:40] for k in unknown[:5]]}; "
                                   f"the model takes {len(names)} columns: {names[:5]}...")
            absent = [n for n in names if n not in row]
            if absent:
                raise InvalidInput(f"row {i}: missing column(s) {absent[:5]} (send null for a missing cell)")
            raw = [row[n] for n in names]
        elif isinstance(row, list):
            if len(row) != len(names):
                raise InvalidInput(f"row {i} has {len(row)} values; the model takes {len(names)} columns in the order "
                                   f"{names[:5]}...")
            raw = row
        else:
            raise InvalidInput(f"row {i} must be an object keyed by column name or a list, got {type(row).__name__}")
        cells.append([_cell(v, kind=c["type"], row=i, name=c["name"]) for v, c in zip(raw, columns)])
    values = [np.array([r[j] if r[j] is not None else (None if c["type"] == CATEGORICAL else np.nan) for r in cells],
                       dtype=object if c["type"] == CATEGORICAL else np.float64)
              for j, c in enumerate(columns)]
    return apply_table_preprocessing(values, spec), [dict(zip(names, r)) for r in cells]


def row_digest(row: np.ndarray) -> str:
    """SHA-256 of one input row as float32, C order (the same bytes for either input layout)."""
    return hashlib.sha256(np.ascontiguousarray(row, dtype=np.float32).tobytes()).hexdigest()


def row_digests(X: np.ndarray) -> list[str]:
    """``row_digest`` of every row of a batch ``(N, ...)``, with one float32 conversion for the batch."""
    flat = np.ascontiguousarray(X, dtype=np.float32).reshape(len(X), -1)
    return [hashlib.sha256(row.data).hexdigest() for row in flat]


def row_summary(X: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row mean, std, min and max of a batch ``(N, ...)``: what telemetry keeps of an input."""
    flat = X.reshape(len(X), -1)
    return {"mean": flat.mean(axis=1), "std": flat.std(axis=1), "min": flat.min(axis=1), "max": flat.max(axis=1)}
