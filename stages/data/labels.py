"""Labels as users bring them: integers, integral floats or text, mapped onto a class list.

The class list is either declared (``data.classes``, in order: class ``i`` is
``classes[i]``) or, when not declared, the labels found in the data, sorted (numbers
numerically, text alphabetically). Labels become class positions ``0..K-1`` (int64); the
list itself is recorded in the signed manifest, the model's ``model.json`` and the model
card, so a prediction's position maps back to the user's label.

Nothing is ever sized by a label's value: a label of ``10**12`` is one more class name,
and a class with a single row is refused (the stratified split and screening need two).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from stages.core.errors import InvalidInput

ClassName = int | str
MIN_ROWS_PER_CLASS = 2  # the stratified held-out split and the screening folds need two
_SHOWN = 5


def rows_word(n: int) -> str:
    """``1 row``, ``3 rows``."""
    return f"{n} row" if n == 1 else f"{n} rows"  # how many offending values or rows a message names


def shown(values: Sequence[Any]) -> str:
    """The first few values of a list for a message, with how many more there are."""
    values = [int(v) if isinstance(v, np.integer) else v for v in values]
    head = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in list(values)[:_SHOWN])
    return head + (f" (+{len(values) - _SHOWN} more)" if len(values) > _SHOWN else "")


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    if isinstance(value, str):
        return value.strip() == ""
    try:
        import pandas as pd  # pandas' own missing markers (NA, NaT) when a table was read

        return bool(pd.isna(value))
    except (ImportError, TypeError, ValueError):
        return False


def canonical_class(value: Any) -> ClassName:
    """A label as a class name: integral numbers as ``int``, text as stripped ``str``.

    Raises ``ValueError`` for a number that is not integral (2.5) or not finite.
    """
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(value)
        return int(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value).strip()


def _key(name: ClassName) -> str:
    """Labels compare as text, so ``1`` in the data matches ``"1"`` declared in YAML."""
    return str(name)


def _sorted_classes(names: set[ClassName]) -> list[ClassName]:
    if all(isinstance(n, int) for n in names):
        return sorted(names)
    return sorted(names, key=str)


def encode_labels(values: np.ndarray, *, declared: Sequence[Any] | None, where: str,
                  what: str = "labels") -> tuple[np.ndarray, list[ClassName]]:
    """Map labels onto a class list; return (positions as int64, the class list).

    Parameters
    ----------
    values : array, shape (N,)
        Labels as given: integers, integral floats, text or booleans.
    declared : sequence or None
        The declared class list (``data.classes``); None takes the labels found, sorted.
    where : str
        The source, for messages.

    Raises
    ------
    InvalidInput
        A missing label, a non-integral number, a label not in the declared list, a
        declared list with repeated names, or a class with fewer than two rows; each
        message names the values and rows seen.
    """
    values = np.asarray(values)
    if values.ndim != 1:
        raise InvalidInput(f"{where}: {what} must be one per row, got shape {values.shape}")
    flat = values.tolist()
    missing = [i for i, v in enumerate(flat) if _is_missing(v)]
    if missing:
        raise InvalidInput(f"{where}: {rows_word(len(missing))} without a label (rows {shown(missing)}; rows count from 0)")
    names: list[ClassName] = []
    bad: list[Any] = []
    for v in flat:
        try:
            names.append(canonical_class(v))
        except ValueError:
            bad.append(v)
    if bad:
        raise InvalidInput(f"{where}: {what} must be whole numbers or text, found {shown(sorted(set(map(float, bad))))}")
    if declared is not None:
        classes = [canonical_class(c) for c in declared]
        keys = [_key(c) for c in classes]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise InvalidInput(f"data.classes names a class more than once: {shown(repeated)}")
        if len(classes) < 2:
            raise InvalidInput(f"data.classes must name at least 2 classes, got {list(declared)}")
    else:
        classes = _sorted_classes(set(names))
    position = {_key(c): i for i, c in enumerate(classes)}
    unknown: dict[str, int] = {}
    for n in names:
        if _key(n) not in position:
            unknown[_key(n)] = unknown.get(_key(n), 0) + 1
    if unknown:
        listed = ", ".join(f"{k!r} ({rows_word(c)})" for k, c in list(unknown.items())[:_SHOWN])
        raise InvalidInput(f"{where}: {what} outside the declared classes {shown(classes)}: {listed}"
                           + (f" (+{len(unknown) - _SHOWN} more)" if len(unknown) > _SHOWN else ""))
    codes = np.fromiter((position[_key(n)] for n in names), dtype=np.int64, count=len(names))
    if len(classes) < 2 and declared is None:
        raise InvalidInput(f"{where}: {what} hold a single class {shown(classes)}: a classifier needs at least 2")
    counts = np.bincount(codes, minlength=len(classes))  # sized by the number of classes, never by a label value
    thin = [(classes[i], int(c)) for i, c in enumerate(counts) if 0 < c < MIN_ROWS_PER_CLASS]
    if thin:
        listed = ", ".join(f"{name!r} ({rows_word(c)})" for name, c in thin[:_SHOWN])
        hint = "" if declared is not None else "; to check labels against a list, declare data.classes"
        raise InvalidInput(f"{where}: every class needs at least {MIN_ROWS_PER_CLASS} rows, found {listed}"
                           f"{' (+%d more)' % (len(thin) - _SHOWN) if len(thin) > _SHOWN else ''}{hint}")
    return codes, classes


def encode_annotator_labels(A: np.ndarray, classes: Sequence[ClassName], *, where: str) -> np.ndarray:
    """Map annotator labels (N x A integers, -1 = no label) onto the class positions."""
    A = np.asarray(A)
    if A.ndim != 2:
        raise InvalidInput(f"{where}: annotator_labels must be N x A, got shape {A.shape}")
    if not np.issubdtype(A.dtype, np.integer):
        raise InvalidInput(f"{where}: annotator_labels must be integers (-1 = no label), got dtype {A.dtype}")
    if A.size and A.min() < -1:
        raise InvalidInput(f"{where}: annotator_labels must be -1 or a class, found {int(A.min())}")
    position = {_key(c): i for i, c in enumerate(classes)}
    out = np.full(A.shape, -1, dtype=np.int64)
    given = A != -1
    found = np.unique(A[given])
    unknown = [int(v) for v in found if _key(int(v)) not in position]
    if unknown:
        raise InvalidInput(f"{where}: annotator_labels outside the classes {shown(list(classes))}: {shown(unknown)}")
    lookup = {int(v): position[_key(int(v))] for v in found}
    for value, pos in lookup.items():
        out[A == value] = pos
    return out


def class_names_text(classes: Sequence[ClassName]) -> str:
    """The class list as one short line, e.g. ``'benign', 'malignant'``."""
    return shown(list(classes))
