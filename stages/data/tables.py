"""Tables as users bring them: CSV or Parquet with named columns on their own scales.

``read_table`` returns the feature columns as one float32 matrix in the user's units, the
label column as given, and the schema of every feature column:

``numeric``      the values as numbers (any scale); missing cells are NaN.
``categorical``  text, booleans or numbers declared categorical; stored as the position of
                 the value in the column's sorted category list (a float32 code), missing
                 cells NaN. The category list is part of the schema.

Column types are declared in ``data.columns`` (name -> ``numeric`` | ``categorical``; every
feature column must be named and no other may appear) or, when not declared, inferred:
numbers are numeric, anything else categorical, except a column whose values are nearly
all numbers, which is refused as a probable typo. Missing cells follow ``data.missing``:
``refuse`` names the columns and rows; ``impute`` keeps them as NaN for the preprocessing
(``stages.data.preprocessing``), which fills them from the accepted training rows. Every
rejection is one line naming the column and the rows or values seen; rows count from 0,
the first row after the header.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.errors import InvalidInput
from stages.data.labels import rows_word, shown

NUMERIC, CATEGORICAL = "numeric", "categorical"
COLUMN_TYPES = (NUMERIC, CATEGORICAL)
MOSTLY_NUMBERS = 0.9  # an undeclared text column this share of whose values are numbers is refused
_SHOWN = 5


@dataclass(frozen=True)
class Table:
    """Feature matrix (N x F float32, user units or category codes, NaN = missing), the label
    column's values as given, and one schema entry per feature column."""

    X: np.ndarray
    labels: np.ndarray
    columns: list[dict[str, Any]]


def _read_frame(path: Path):
    import pandas as pd  # slow to import; only the readers that need it pay

    if path.stat().st_size == 0:
        raise InvalidInput(f"{path} is empty")
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            header = next(csv.reader(fh), [])
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise InvalidInput(f"{path}: column names repeat: {repeated[:_SHOWN]}")
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise InvalidInput(f"{path} holds no table (no header, no rows)") from None
    except Exception as err:  # noqa: BLE001 - pandas and pyarrow raise many kinds
        raise InvalidInput(f"{path}: cannot read table ({str(err).splitlines()[0]})") from None
    frame.columns = [str(c) for c in frame.columns]
    if len(frame) == 0:
        raise InvalidInput(f"{path}: the table has a header ({len(frame.columns)} columns) but no rows")
    return frame


def _as_numbers(series, name: str, *, declared: bool, where: Path) -> np.ndarray:
    """A column as float64; text where numbers are expected is refused with an example."""
    import pandas as pd  # slow to import; only the readers that need it pay

    if pd.api.types.is_bool_dtype(series):
        return series.astype(float).to_numpy(dtype=np.float64)
    if pd.api.types.is_numeric_dtype(series):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    numbers = pd.to_numeric(series, errors="coerce")
    text = series.notna() & numbers.isna()
    if text.any():
        pos = np.flatnonzero(text.to_numpy())
        why = "is declared numeric" if declared else "is mostly numbers"
        raise InvalidInput(f"{where}: column {name!r} {why} but holds text in {rows_word(len(pos))}, "
                           f"e.g. {series.iloc[int(pos[0])]!r} in row {int(pos[0])} (rows {shown(pos)})")
    return numbers.to_numpy(dtype=np.float64, na_value=np.nan)


def _infer(series) -> str:
    import pandas as pd  # slow to import; only the readers that need it pay

    if pd.api.types.is_bool_dtype(series):
        return CATEGORICAL
    if pd.api.types.is_numeric_dtype(series):
        return NUMERIC
    present = series.dropna()
    if len(present) and pd.to_numeric(present, errors="coerce").notna().mean() >= MOSTLY_NUMBERS:
        return NUMERIC  # _as_numbers then names the text cells
    return CATEGORICAL


def _categories(series, name: str, *, max_categories: int, where: Path) -> tuple[np.ndarray, list[str]]:
    text = np.array([str(v).strip() for v in series.to_numpy(dtype=object)], dtype=object)
    present = series.notna().to_numpy() & (text != "")
    categories = sorted(set(text[present].tolist()))
    if len(categories) > max_categories:
        raise InvalidInput(f"{where}: column {name!r} has {len(categories)} distinct values, more than "
                           f"data.max_categories={max_categories} (an identifier or free text?); drop it or raise the limit")
    lookup = {c: i for i, c in enumerate(categories)}
    codes = np.full(len(text), np.nan)
    codes[present] = [lookup[t] for t in text[present]]
    return codes, categories


def read_table(path: Path, *, label_column: str, columns: dict[str, str] | None, missing: str,
               max_categories: int) -> Table:
    """Read a CSV or Parquet table into a :class:`Table`; raise ``InvalidInput`` on bad input."""
    path = Path(path)
    frame = _read_frame(path)
    if label_column not in frame.columns:
        raise InvalidInput(f"{path}: label column {label_column!r} not found; columns are {list(frame.columns)[:10]}"
                           + (f" (+{len(frame.columns) - 10} more)" if len(frame.columns) > 10 else ""))
    features = [c for c in frame.columns if c != label_column]
    if not features:
        raise InvalidInput(f"{path}: no feature columns besides the label column {label_column!r}")
    if columns is not None:
        absent = [c for c in columns if c not in features]
        if absent:
            raise InvalidInput(f"{path}: declared column(s) {absent[:_SHOWN]} not found; columns are {features[:10]}")
        undeclared = [c for c in features if c not in columns]
        if undeclared:
            raise InvalidInput(f"{path}: column(s) {undeclared[:_SHOWN]} are not declared in data.columns")
        features = list(columns)  # the declared order
    schema: list[dict[str, Any]] = []
    matrix = np.empty((len(frame), len(features)), dtype=np.float64)
    for j, name in enumerate(features):
        series = frame[name]
        kind = columns[name] if columns is not None else _infer(series)
        if kind == NUMERIC:
            values = _as_numbers(series, name, declared=columns is not None, where=path)
            infinite = np.flatnonzero(np.isinf(values))
            if len(infinite):
                raise InvalidInput(f"{path}: column {name!r} holds infinite values in rows {shown(infinite)}")
            schema.append({"name": name, "type": NUMERIC})
        else:
            values, categories = _categories(series, name, max_categories=max_categories, where=path)
            schema.append({"name": name, "type": CATEGORICAL, "categories": categories})
        gaps = np.flatnonzero(np.isnan(values))
        if len(gaps) == len(values):
            raise InvalidInput(f"{path}: column {name!r} has no values at all")
        if len(gaps) and missing != "impute":
            raise InvalidInput(f"{path}: column {name!r} has {len(gaps)} missing values (rows {shown(gaps)}); "
                               f"set data.missing=impute to fill them from the training rows, or fill them in the file")
        matrix[:, j] = values
    X = matrix.astype(np.float32)
    overflow = np.flatnonzero(np.isinf(X).any(axis=1) & ~np.isinf(matrix).any(axis=1))
    if len(overflow):
        raise InvalidInput(f"{path}: values beyond the float32 range in rows {shown(overflow)}")
    return Table(X=X, labels=frame[label_column].to_numpy(), columns=schema)
