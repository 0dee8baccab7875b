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
    if not isinstance(value, list):
        raise InvalidInput(f"'inputs' must be a list of rows, got {type(value).__name__}")
    if not value:
        raise InvalidInput("'inputs' is empty: send at least one row")
    if len(value) > max_batch:
        raise InvalidInput(f"'inputs' has {len(value)} rows, more than the limit of {max_batch} per request")
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


def row_digest(row: np.ndarray) -> str:
    """SHA-256 of one input row as float32, C order (the same bytes for either input layout)."""
    return hashlib.sha256(np.ascontiguousarray(row, dtype=np.float32).tobytes()).hexdigest()


def row_summary(X: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row mean, std, min and max of a batch ``(N, ...)``: what telemetry keeps of an input."""
    flat = X.reshape(len(X), -1)
    return {"mean": flat.mean(axis=1), "std": flat.std(axis=1), "min": flat.min(axis=1), "max": flat.max(axis=1)}
