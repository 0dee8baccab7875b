"""The preprocessing a model's inputs go through, as pure functions on arrays and a JSON spec.

A spec is plain JSON (never a pickled object): it is fitted by the train stage, saved as
``preprocessing.json`` next to the weights, covered by the model signature and by
``model.json`` (which records its SHA-256 and is itself bound to the gate's verdict), and
applied by ``load_verified_model`` and the MLflow pyfunc, so a caller sends rows as they
have them.

Tables (``kind: table``), fitted on the accepted training rows only:

``numeric``      ``(x - low) / (high - low)`` clipped to [0, 1], where ``low`` and ``high``
                 are the column's smallest and largest training values: 0 is the smallest
                 training value, 1 the largest; later values beyond them are clipped.
``categorical``  one 0/1 feature per category seen in the training rows (``name=value``).
unseen category  ``data.unknown_category``, recorded in the spec as ``unknown_category``:
                 ``refuse`` (the default): an error naming the row, the column and the
                 value, since the model was never trained or evaluated on such a row;
                 ``ignore``: the row is scored with all of the column's indicators at zero.
                 A spec written before the field existed has no ``unknown_category`` and
                 keeps the behaviour it was signed with (its ``scale`` text says so): ignore.
missing cells    ``refuse``: an error naming the column and rows; ``impute``: the training
                 median (numeric) or most frequent category (categorical), before scaling.

The policy is part of the signed spec inside the model package, so a later edit of
``params.yaml`` cannot change how a served model treats an unseen category; editing the
package's ``preprocessing.json`` breaks its signature. The pipeline's own held-out rows
(evaluation, screening, monitoring reference) are scaled with unseen categories at zero
whatever the policy: they are measured, not refused (``model_inputs``).

So an adversarial epsilon on a table is on these scaled features: ``epsilon = 0.02`` lets
an attacker move every numeric column by 2% of its training range (and every category
indicator by 0.02). Images (``kind: image``) need no fitting: the spec records the layout
and the scaling the pipeline applied at ingest (uint8 / 255), so raw pixels can be sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stages.core.errors import InvalidInput
from stages.data.labels import shown

SPEC_FORMAT = "mlsec.preprocessing/v1"
NUMERIC, CATEGORICAL = "numeric", "categorical"
UNKNOWN_POLICIES = ("refuse", "ignore")
LEGACY_UNKNOWN = "ignore"   # specs written before ``unknown_category`` existed were signed with all-zeros
_SHOWN = 5


# ---------------------------------------------------------------- prepared rows <-> column values
def column_values(X: np.ndarray, columns: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
    """Prepared table rows (N x F float32, categorical columns as codes into the column's
    category list, NaN = missing) as one array per column: float64 for numeric columns,
    object arrays of category text (None = missing) for categorical ones."""
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != len(columns):
        raise InvalidInput(f"table rows must be N x {len(columns)}, got shape {X.shape}")
    out: list[np.ndarray] = []
    for j, column in enumerate(columns):
        values = X[:, j].astype(np.float64)
        if column["type"] == CATEGORICAL:
            names = np.asarray(list(column["categories"]) + [None], dtype=object)
            codes = np.where(np.isnan(values), len(names) - 1, values).astype(np.int64)
            out.append(names[codes])
        else:
            out.append(values)
    return out


def prepared_rows(rows: Sequence[Mapping[str, Any]],
                  columns: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Raw rows by column name (numbers, category text, None = missing) in the prepared form
    of a table with schema ``columns``: ``(X, columns)``, ``X`` N x F float64 (categories as
    codes, NaN = missing; float64, so that a number beyond the float32 range of prepared data
    stays a number for the caller to refuse or clip), and the schema with each category the
    rows hold that it lacks appended to its column's list (so codes into the given lists keep
    their meaning). Category text is stripped, as ingest reads it. The inverse of
    :func:`column_values`."""
    out = [dict(c, categories=list(c["categories"])) if c["type"] == CATEGORICAL else dict(c) for c in columns]
    X = np.full((len(rows), len(out)), np.nan, dtype=np.float64)
    for i, row in enumerate(rows):
        for j, column in enumerate(out):
            v = row[column["name"]]
            if v is None or (isinstance(v, str) and not v.strip()):
                continue
            if column["type"] == CATEGORICAL:
                text = str(v).strip()
                if text not in column["categories"]:
                    column["categories"].append(text)
                X[i, j] = column["categories"].index(text)
            else:
                X[i, j] = float(v)
    return X, out


def _is_missing(values: np.ndarray) -> np.ndarray:
    if values.dtype != object:
        return np.isnan(values.astype(np.float64))
    return np.array([v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())
                     for v in values], dtype=bool)


# ---------------------------------------------------------------- fitting
def fit_table_preprocessing(X: np.ndarray, columns: Sequence[Mapping[str, Any]], *, missing: str,
                            unknown_category: str = "refuse") -> dict[str, Any]:
    """Fit the table spec on the accepted training rows ``X`` (prepared form, N x F).

    Returns the spec (JSON-able): per column its type and fitted parameters, the names of
    the scaled features the model sees, the missing-value policy and the unseen-category
    policy (``unknown_category``: ``refuse`` or ``ignore``; ``data.unknown_category``).
    """
    if missing not in ("refuse", "impute"):
        raise InvalidInput(f"data.missing must be refuse or impute, got {missing!r}")
    if unknown_category not in UNKNOWN_POLICIES:
        raise InvalidInput(f"data.unknown_category must be refuse or ignore, got {unknown_category!r}")
    values = column_values(X, columns)
    if len(X) == 0:
        raise InvalidInput("cannot fit the preprocessing on zero training rows")
    fitted: list[dict[str, Any]] = []
    for column, v in zip(columns, values):
        present = v[~_is_missing(v)]
        if len(present) == 0:
            raise InvalidInput(f"column {column['name']!r} has no value in the accepted training rows")
        if column["type"] == NUMERIC:
            entry = {"name": column["name"], "type": NUMERIC, "low": float(present.min()), "high": float(present.max())}
            if missing == "impute":
                entry["fill"] = float(np.median(present))
        else:
            cats, counts = np.unique(present.astype(str), return_counts=True)
            entry = {"name": column["name"], "type": CATEGORICAL, "categories": cats.tolist()}
            if missing == "impute":
                entry["fill"] = str(cats[int(np.argmax(counts))])
        fitted.append(entry)
    unseen = "refused" if unknown_category == "refuse" else "all zeros"
    return {"format": SPEC_FORMAT, "kind": "table", "missing": missing, "unknown_category": unknown_category,
            "columns": fitted, "features": feature_names(fitted),
            "scale": "numeric: (x - low) / (high - low) clipped to [0, 1], low/high = training min/max; "
                     f"categorical: one-hot over the training categories (unknown = {unseen})"}


def image_preprocessing(*, input_shape: Sequence[int], layout: str, scaled_from: str) -> dict[str, Any]:
    """The spec of an image model: no fitted parameters, how raw pixels reach [0, 1]."""
    return {"format": SPEC_FORMAT, "kind": "image", "input_shape": [int(d) for d in input_shape],
            "layout": layout, "scaled_from": scaled_from,
            "scale": "uint8 / 255 (uint16 / 65535); float pixels already on [0, 1]"}


def categorical_blocks(spec: Mapping[str, Any]) -> list[tuple[int, int]]:
    """The [start, stop) features of each categorical column's one-hot block, in the order
    ``apply_table_preprocessing`` writes them; none for an image spec."""
    if spec.get("kind") != "table":
        return []
    blocks, at = [], 0
    for column in spec["columns"]:
        width = 1 if column["type"] == NUMERIC else len(column["categories"])
        if column["type"] != NUMERIC:
            blocks.append((at, at + width))
        at += width
    return blocks


def feature_names(fitted: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the scaled features, in order: a numeric column's own name, ``name=value``
    for each category of a categorical one."""
    names: list[str] = []
    for column in fitted:
        if column["type"] == NUMERIC:
            names.append(column["name"])
        else:
            names.extend(f"{column['name']}={c}" for c in column["categories"])
    return names


# ---------------------------------------------------------------- applying
def unknown_category_policy(spec: Mapping[str, Any]) -> str:
    """The spec's unseen-category policy: ``refuse`` or ``ignore`` (``ignore`` for a spec
    written before the field existed, the behaviour it was signed with)."""
    return str(spec.get("unknown_category", LEGACY_UNKNOWN))


def apply_table_preprocessing(values: Sequence[np.ndarray], spec: Mapping[str, Any], *,
                              unknown_category: str | None = None) -> np.ndarray:
    """Scaled features (N x D float32 on [0, 1]) from one array per spec column, as the user
    has them (numbers, category text, NaN/None for missing).

    ``unknown_category``: ``None`` applies the spec's own policy (what every path that takes
    a caller's rows does); ``"ignore"`` scores unseen categories as all zeros (the pipeline's
    own held-out rows, ``model_inputs``). Under ``refuse`` an unseen category raises
    ``InvalidInput`` naming the first such row, the column and the value."""
    check_spec(spec)
    policy = unknown_category_policy(spec) if unknown_category is None else unknown_category
    if policy not in UNKNOWN_POLICIES:
        raise InvalidInput(f"unknown_category must be refuse or ignore, got {policy!r}")
    columns = spec["columns"]
    if len(values) != len(columns):
        raise InvalidInput(f"expected {len(columns)} columns ({', '.join(c['name'] for c in columns[:_SHOWN])}...), "
                           f"got {len(values)}")
    impute = spec["missing"] == "impute"
    parts: list[np.ndarray] = []
    for column, raw in zip(columns, values):
        raw = np.asarray(raw)
        name = column["name"]
        if column["type"] == NUMERIC:
            v = _numbers(raw, name)
            gaps = np.flatnonzero(np.isnan(v))
            if len(gaps):
                if not impute:
                    raise InvalidInput(f"column {name!r} has missing values in rows {shown(gaps)} and the model "
                                       f"was trained with data.missing=refuse")
                v = np.where(np.isnan(v), column["fill"], v)
            if np.isinf(v).any():
                raise InvalidInput(f"column {name!r} holds infinite values in rows {shown(np.flatnonzero(np.isinf(v)))}")
            span = column["high"] - column["low"]
            parts.append(np.clip((v - column["low"]) / (span if span > 0 else 1.0), 0.0, 1.0)[:, None])
        else:
            text = np.array([None if m else str(x).strip() for x, m in zip(raw.tolist(), _is_missing(raw.astype(object)))],
                            dtype=object)
            gaps = np.flatnonzero(text == None)  # noqa: E711 - elementwise comparison with None
            if len(gaps):
                if not impute:
                    raise InvalidInput(f"column {name!r} has missing values in rows {shown(gaps)} and the model "
                                       f"was trained with data.missing=refuse")
                text[gaps] = column["fill"]
            cats = np.asarray(column["categories"], dtype=object)
            onehot = text[:, None] == cats[None, :]
            if policy == "refuse":
                _refuse_unseen(text, onehot, name)
            parts.append(onehot.astype(np.float64))
    out = np.concatenate(parts, axis=1) if parts else np.zeros((0, 0))
    return np.ascontiguousarray(out, dtype=np.float32)


def _refuse_unseen(text: np.ndarray, onehot: np.ndarray, name: str) -> None:
    """``InvalidInput`` when a row's category (text, never missing here) matches none of the
    training categories: the first such row, the column and the value, and how many rows."""
    unseen = np.flatnonzero(~onehot.any(axis=1))
    if len(unseen):
        i = int(unseen[0])
        more = f" ({len(unseen)} rows hold unseen categories: {shown(unseen)})" if len(unseen) > 1 else ""
        raise InvalidInput(f"row {i}, column {name!r}: category {str(text[i])[:40]!r} was not seen in training{more}; "
                           f"the model refuses unseen categories (data.unknown_category=refuse)")


def _numbers(raw: np.ndarray, name: str) -> np.ndarray:
    """A column as float64; None, NaN and empty text are missing (NaN); other text is refused."""
    if raw.dtype != object and raw.dtype.kind in "biuf":
        return raw.astype(np.float64)
    out = np.empty(len(raw), dtype=np.float64)
    for i, x in enumerate(raw.tolist()):
        if x is None or (isinstance(x, str) and not x.strip()):
            out[i] = np.nan
            continue
        try:
            out[i] = float(x)
        except (TypeError, ValueError):
            raise InvalidInput(f"column {name!r} must hold numbers, got {x!r} in row {i}") from None
    return out


def table_columns(meta: Mapping[str, Any], n_features: int) -> list[dict[str, Any]]:
    """The prepared table's column schema (data prepared before columns were recorded: ``f0..``, numeric)."""
    columns = meta.get("columns")
    if columns:
        return [dict(c) for c in columns]
    return [{"name": f"f{j}", "type": NUMERIC} for j in range(n_features)]


def fit_model_preprocessing(X: np.ndarray, meta: Mapping[str, Any], *,
                            unknown_category: str = "refuse") -> tuple[dict[str, Any], np.ndarray]:
    """(spec, what the network trains on) for the accepted training rows ``X`` (prepared form).

    Tables: the spec is fitted on exactly these rows, with the unseen-category policy
    ``unknown_category`` (``data.unknown_category``). Images: the spec records how raw
    pixels reach [0, 1]; ``X`` is returned unchanged."""
    if X.ndim != 2:
        return image_preprocessing(input_shape=X.shape[1:], layout=meta.get("layout", "NCHW"),
                                   scaled_from=meta.get("scaled_from", "none")), X
    spec = fit_table_preprocessing(X, table_columns(meta, X.shape[1]), missing=meta.get("missing", "refuse"),
                                   unknown_category=unknown_category)
    return spec, model_inputs(X, meta, spec)


def model_inputs(X: np.ndarray, meta: Mapping[str, Any], spec: Mapping[str, Any]) -> np.ndarray:
    """What the network sees for prepared rows ``X`` of the pipeline's own versioned data:
    images unchanged (already on [0, 1]), table rows through the spec. A held-out row whose
    category the training rows lack is scored with that column at all zeros, whatever the
    spec's policy: evaluation measures it rather than dropping it."""
    if spec.get("kind") == "image":
        return X
    return apply_table_preprocessing(column_values(X, table_columns(meta, X.shape[1])), spec, unknown_category="ignore")


def check_spec(spec: Mapping[str, Any]) -> None:
    """Raise ``InvalidInput`` unless ``spec`` is a table spec this code can apply."""
    if not isinstance(spec, Mapping) or spec.get("format") != SPEC_FORMAT:
        raise InvalidInput(f"not a preprocessing spec of format {SPEC_FORMAT}")
    if spec.get("kind") != "table" or not isinstance(spec.get("columns"), list):
        raise InvalidInput("not a table preprocessing spec")
    if unknown_category_policy(spec) not in UNKNOWN_POLICIES:
        raise InvalidInput(f"preprocessing has unknown_category {spec.get('unknown_category')!r}, not refuse or ignore")
    for column in spec["columns"]:
        if column.get("type") == NUMERIC:
            if not all(isinstance(column.get(k), (int, float)) and math.isfinite(column[k]) for k in ("low", "high")):
                raise InvalidInput(f"preprocessing of column {column.get('name')!r} has no finite low/high")
        elif column.get("type") == CATEGORICAL:
            if not isinstance(column.get("categories"), list):
                raise InvalidInput(f"preprocessing of column {column.get('name')!r} has no category list")
        else:
            raise InvalidInput(f"preprocessing of column {column.get('name')!r} has unknown type {column.get('type')!r}")
        if spec.get("missing") == "impute" and "fill" not in column:
            raise InvalidInput(f"preprocessing of column {column.get('name')!r} has no fill value")


def table_values(rows: Any, spec: Mapping[str, Any]) -> list[np.ndarray]:
    """One array per spec column from rows as a caller has them: a pandas DataFrame or a
    mapping with the column names (other columns, such as the label, are ignored), a list
    of dicts, or an N x F array in the spec's column order."""
    check_spec(spec)
    names = [c["name"] for c in spec["columns"]]
    if hasattr(rows, "columns") and hasattr(rows, "__getitem__") and not isinstance(rows, np.ndarray):
        absent = [n for n in names if n not in list(rows.columns)]
        if absent:
            raise InvalidInput(f"rows lack the column(s) {absent[:_SHOWN]} the model was trained on")
        return [np.asarray(rows[n].to_numpy(dtype=object)) for n in names]
    if isinstance(rows, Mapping):
        absent = [n for n in names if n not in rows]
        if absent:
            raise InvalidInput(f"rows lack the column(s) {absent[:_SHOWN]} the model was trained on")
        return [np.asarray(rows[n], dtype=object).reshape(-1) for n in names]
    if isinstance(rows, (list, tuple)) and rows and isinstance(rows[0], Mapping):
        absent = sorted({n for r in rows for n in names if n not in r})
        if absent:
            raise InvalidInput(f"rows lack the column(s) {absent[:_SHOWN]} the model was trained on")
        return [np.asarray([r[n] for r in rows], dtype=object) for n in names]
    array = np.asarray(rows, dtype=object if _has_text(rows) else np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != len(names):
        raise InvalidInput(f"rows must be N x {len(names)} in the column order {names[:_SHOWN]}..., got shape {array.shape}")
    return [array[:, j] for j in range(array.shape[1])]


def _has_text(rows: Any) -> bool:
    try:
        return np.asarray(rows).dtype.kind in "OUS"
    except ValueError:
        return True
