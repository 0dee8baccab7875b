"""The data validation core: a Great Expectations 1.x suite over a dataset's arrays.

``validate_arrays`` checks one dataset (``X`` float32 on the [0, 1] scale, ``y`` int64
labels) and returns a :class:`ValidationReport`; ``dataset_statistics`` gives the
statistics that are saved as the reference for the next run's drift checks.

How the data reaches Great Expectations
---------------------------------------
Row-level expectations on every feature column would cost one expectation per column
(784 for MNIST) over every row: tens of seconds for 60,000 x 784. So the suite runs on
four pandas frames, each validated by its own expectation suite on one ephemeral context:

``rows``      the samples themselves: ``f0..f{K-1}`` (features flattened in C order) plus
              ``label``. Schema (ordered columns, row count) and the label checks (int64,
              no missing value, within ``0..num_classes-1``) run row by row here.
``features``  one row per feature with aggregates computed in numpy in one pass:
              dtype, min, max (ignoring NaN, so infinities show), NaN count, inf count,
              mean and std (over finite values), and with a reference the absolute shift of
              mean and std. Range, NaN/inf and drift expectations run on this frame.
              GX treats NaN as null and skips nulls in range checks, so NaN and inf are
              counted explicitly and every aggregate is also expected to be non-null.
``classes``   one row per class: count, fraction and, with a reference, fraction shift.
``dataset``   one row: the duplicate-row fraction (rows whose feature bytes repeat an
              earlier row, found by a BLAKE2b hash of each row; the label is not hashed,
              so one image under two labels counts as a duplicate).

Any expectation that raises, a missing result, or GX itself failing makes the report a
failure: the validation fails closed.

Cost (2 cores): importing GX about 3 s once per process; then digits (1,797 x 64) about
0.3 s per call, random MNIST-sized data (60,000 x 784) about 2 to 2.5 s, of which about
1 s is GX fingerprinting the ``rows`` frame (``pd.util.hash_pandas_object``, always done
by GX for in-memory frames), 0.4 s the row hashing and 0.3 s the per-feature aggregates.

Data Docs: with ``docs_dir`` an in-memory context gets a local site on the file system and
GX's own site builder writes ``index.html``, one page per suite run and ``static/``. The
pages load Bootstrap and jQuery from public CDNs when opened; offline they show unstyled
but complete. Every run rebuilds the index from this run's results only.
"""

from __future__ import annotations

import hashlib
import html
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from stages.errors import InvalidInput
from stages.params import ValidateParams

__all__ = ["ValidationReport", "dataset_statistics", "validate_arrays"]

STATISTICS_FORMAT = "mlsec.dataset_statistics/1"
FEATURE_DTYPE = "float32"
LABEL_DTYPE = "int64"
# Max absolute change of any class fraction against the reference. Used until
# ValidateParams gains a ``drift_class_tolerance`` field (read from params when present).
CLASS_DRIFT_TOLERANCE = 0.05
_EXAMPLES = 3  # how many offending features or values a failure line names
_PARTIAL = 10  # how many unexpected values the trimmed raw results keep


@dataclass
class ValidationReport:
    """The verdict of one validation run.

    ``failures`` holds one dict per failed expectation with readable ``check``,
    ``expectation`` (the GX type), ``column``, ``observed`` and ``expected`` text.
    ``results`` is the trimmed GX result (JSON-able), ``statistics`` the output of
    :func:`dataset_statistics`, ``docs_path`` the Data Docs ``index.html`` or None.
    """

    success: bool
    failures: list[dict[str, Any]]
    summary: str
    statistics: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)
    docs_path: Path | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["docs_path"] = str(self.docs_path) if self.docs_path is not None else None
        return out


# --------------------------------------------------------------------------- numpy core


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


def _class_counts(y: np.ndarray) -> dict[str, int]:
    if y.size == 0:
        return {}
    values, counts = np.unique(y[~np.isnan(y)] if np.issubdtype(y.dtype, np.floating) else y, return_counts=True)
    return {_class_key(v): int(c) for v, c in zip(values, counts)}


def _json_float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _statistics(X2: np.ndarray, X_shape: tuple[int, ...], X_dtype: np.dtype, y: np.ndarray,
                agg: dict[str, np.ndarray], duplicate_fraction: float) -> dict[str, Any]:
    n = len(X2)
    counts = _class_counts(y)
    return {
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


def dataset_statistics(X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Statistics of one dataset, saved as the drift reference for the next run.

    Parameters
    ----------
    X : ndarray, shape (N, ...) such as (N, C, H, W) or (N, F)
        Features on the [0, 1] scale; flattened per sample in C order.
    y : ndarray, shape (N,)
        Integer labels.

    Returns
    -------
    dict (JSON-able)
        ``format``, ``n``, ``shape`` (of X), ``dtype``, ``label_dtype``, ``n_features``,
        ``feature_mean`` and ``feature_std`` (lists of K floats, population std over the
        finite values of each feature; None where a feature has none), ``class_count``
        and ``class_fraction`` (keyed by the label as text) and ``duplicate_fraction``.
    """
    X_arr = np.asarray(X)
    X2, y = _as_2d(X_arr, y)
    return _statistics(X2, X_arr.shape, X_arr.dtype, y, _feature_aggregates(X2), _duplicate_fraction(X2))


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


# --------------------------------------------------------------------------- frames + suite


@dataclass
class _Check:
    """One expectation, the frame it runs on, and how to describe its failure."""

    suite: str
    name: str  # short, readable check name
    expectation: Any  # a great_expectations Expectation
    expected: str
    describe: Callable[[dict[str, Any]], tuple[str | None, str]]  # GX result -> (column, observed)


def _names(rows: list[dict[str, Any]], key: str) -> str:
    names = [str(r.get(key)) for r in rows[:_EXAMPLES]]
    return ", ".join(names) + (f" (+{len(rows) - _EXAMPLES} more)" if len(rows) > _EXAMPLES else "")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NaN"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _plural(count: Any, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "es" if word.endswith("s") else "s")


def _feature_describer(column: str, what: str, example: str, *, unit: str = "feature",
                       lowest_first: bool = False) -> Callable[[dict[str, Any]], tuple[str | None, str]]:
    """Summarise a failed check on a per-feature (or per-class) frame.

    ``example`` formats the worst offender, with ``{name}`` and ``{value}``; e.g.
    "38 features outside [0, 1], e.g. f12 max 3.2".
    """

    def describe(result: dict[str, Any]) -> tuple[str | None, str]:
        rows = list(result.get("unexpected_index_list") or result.get("partial_unexpected_index_list") or [])
        count = result.get("unexpected_count", len(rows))

        def badness(row: dict[str, Any]) -> float:
            value = row.get(column)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return 0.0
            return -float(value) if lowest_first else float(value)

        rows.sort(key=badness, reverse=True)
        text = f"{_plural(count, unit)} {what}"
        if rows:
            text += ", e.g. " + example.format(name=rows[0].get(unit), value=_fmt(rows[0].get(column)))
        return _names(rows, unit), text

    return describe


def _not_null_describer(column: str, note: str) -> Callable[[dict[str, Any]], tuple[str | None, str]]:
    def describe(result: dict[str, Any]) -> tuple[str | None, str]:
        rows = result.get("unexpected_index_list") or result.get("partial_unexpected_index_list") or []
        count = result.get("unexpected_count", len(rows))
        key = "class" if rows and "class" in rows[0] else "feature"
        why = f" ({note})" if note else ""
        return _names(rows, key), f"{column} could not be computed for {_plural(count, key)}{why}"

    return describe


def _build_checks(gxe: Any, *, frames: dict[str, pd.DataFrame], params: ValidateParams, num_classes: int | None,
                  expected_columns: list[str], expected_sample_shape: str | None, drift: bool,
                  reference_note: str, class_tolerance: float) -> list[_Check]:
    checks: list[_Check] = []
    add = checks.append
    n_expected = len(expected_columns)

    def columns_described(result: dict[str, Any]) -> tuple[str | None, str]:
        observed = result.get("observed_value") or []
        missing = [c for c in expected_columns if c not in set(observed)]
        extra = [c for c in observed if c not in set(expected_columns)]
        parts = [f"{len(observed)} columns"]
        if missing:
            parts.append(f"missing {_names([{'c': c} for c in missing], 'c')}")
        if extra:
            parts.append(f"unexpected {_names([{'c': c} for c in extra], 'c')}")
        if not missing and not extra:
            parts.append("in a different order")
        return None, ", ".join(parts)

    add(_Check("rows", "schema: columns",
               gxe.ExpectTableColumnsToMatchOrderedList(column_list=expected_columns),
               f"{n_expected} columns: f0..f{n_expected - 2} then label", columns_described))
    add(_Check("rows", "row count",
               gxe.ExpectTableRowCountToBeBetween(min_value=params.min_rows),
               f"at least {params.min_rows} rows",
               lambda r: (None, f"{r.get('observed_value')} rows")))
    add(_Check("rows", "schema: label dtype",
               gxe.ExpectColumnValuesToBeOfType(column="label", type_=LABEL_DTYPE),
               f"label dtype {LABEL_DTYPE}",
               lambda r: ("label", f"label dtype {r.get('observed_value')}")))
    add(_Check("rows", "label missing",
               gxe.ExpectColumnValuesToNotBeNull(column="label"),
               "no missing (NaN) label",
               lambda r: ("label", f"{_plural(r.get('unexpected_count'), 'label')} missing (NaN), e.g. rows "
                                   f"{_names([{'i': i} for i in r.get('partial_unexpected_index_list') or []], 'i')}")))
    if num_classes is not None:
        label_check = gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(num_classes)))
        label_expected = f"labels in 0..{num_classes - 1}"
    else:
        label_check = gxe.ExpectColumnValuesToBeBetween(column="label", min_value=0)
        label_expected = "labels >= 0"

    def labels_described(result: dict[str, Any]) -> tuple[str | None, str]:
        values = sorted({_fmt(v) for v in result.get("partial_unexpected_list") or []})
        return "label", (f"{_plural(result.get('unexpected_count'), 'label')} outside the label set, "
                         f"e.g. {', '.join(values[:_EXAMPLES])}")

    add(_Check("rows", "label set", label_check, label_expected, labels_described))

    add(_Check("features", "schema: feature dtype",
               gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=[FEATURE_DTYPE]),
               f"features of dtype {FEATURE_DTYPE}",
               _feature_describer("dtype", "of another dtype", "{name} is {value}")))
    add(_Check("features", "NaN values",
               gxe.ExpectColumnValuesToBeBetween(column="n_nan", min_value=0, max_value=0),
               "no NaN in any feature",
               _feature_describer("n_nan", "with NaN", "{name} has {value} NaN")))
    add(_Check("features", "inf values",
               gxe.ExpectColumnValuesToBeBetween(column="n_inf", min_value=0, max_value=0),
               "no inf in any feature",
               _feature_describer("n_inf", "with inf", "{name} has {value} inf")))
    add(_Check("features", "value range: min",
               gxe.ExpectColumnValuesToBeBetween(column="min", min_value=0.0, max_value=1.0),
               "every feature within [0, 1]",
               _feature_describer("min", "outside [0, 1]", "{name} min {value}", lowest_first=True)))
    add(_Check("features", "value range: max",
               gxe.ExpectColumnValuesToBeBetween(column="max", min_value=0.0, max_value=1.0),
               "every feature within [0, 1]",
               _feature_describer("max", "outside [0, 1]", "{name} max {value}")))
    for column in ("min", "max", "mean", "std"):
        # GX skips nulls in range checks: a feature with no usable value must fail here.
        add(_Check("features", f"statistics computable: {column}",
                   gxe.ExpectColumnValuesToNotBeNull(column=column),
                   f"a {column} for every feature (at least one non-NaN value)",
                   _not_null_describer(column, "no finite values")))

    add(_Check("classes", "class balance",
               gxe.ExpectColumnValuesToBeBetween(column="fraction", min_value=params.min_class_fraction,
                                                 max_value=params.max_class_fraction),
               f"every class fraction within [{params.min_class_fraction}, {params.max_class_fraction}]",
               _feature_describer("fraction", "outside the balance bounds", "class {name} at {value}", unit="class")))
    add(_Check("dataset", "duplicate rows",
               gxe.ExpectColumnValuesToBeBetween(column="duplicate_fraction", min_value=0.0,
                                                 max_value=params.max_duplicate_fraction),
               f"duplicate-row fraction <= {params.max_duplicate_fraction}",
               lambda r: (None, f"duplicate-row fraction {_fmt((r.get('partial_unexpected_list') or [None])[0])} "
                                f"({int(frames['dataset']['duplicate_rows'].iloc[0])} of "
                                f"{int(frames['dataset']['n_rows'].iloc[0])} rows repeat an earlier row)")))

    if expected_sample_shape is not None:
        add(_Check("dataset", "schema: sample shape",
                   gxe.ExpectColumnValuesToBeInSet(column="sample_shape", value_set=[expected_sample_shape]),
                   f"samples of shape {expected_sample_shape} (as in the reference)",
                   lambda r: (None, f"samples of shape {(r.get('partial_unexpected_list') or ['?'])[0]}")))
    if drift:
        for column, tolerance, what in (("mean_shift", params.drift_mean_tolerance, "mean"),
                                        ("std_shift", params.drift_std_tolerance, "std")):
            add(_Check("features", f"drift: feature {what}",
                       gxe.ExpectColumnValuesToBeBetween(column=column, min_value=0.0, max_value=tolerance),
                       f"|{what} - reference {what}| <= {tolerance} for every feature",
                       _feature_describer(column, f"shifted in {what} by more than {tolerance}", "{name} by {value}")))
            add(_Check("features", f"drift: reference {what} available",
                       gxe.ExpectColumnValuesToNotBeNull(column=column),
                       f"a reference {what} for every feature",
                       _not_null_describer(column, reference_note or "no reference value")))
        add(_Check("classes", "drift: class fractions",
                   gxe.ExpectColumnValuesToBeBetween(column="fraction_shift", min_value=0.0, max_value=class_tolerance),
                   f"|class fraction - reference fraction| <= {class_tolerance}",
                   _feature_describer("fraction_shift", f"shifted in fraction by more than {class_tolerance}",
                                      "class {name} by {value}", unit="class")))
    return checks


def _frames(X2: np.ndarray, y: np.ndarray, agg: dict[str, np.ndarray], duplicate_fraction: float, *,
            sample_shape: str, num_classes: int | None, reference: dict[str, Any] | None) -> tuple[dict[str, pd.DataFrame], str]:
    n, k = X2.shape
    names = [f"f{i}" for i in range(k)]
    rows = pd.DataFrame(X2, columns=names, copy=False)
    rows["label"] = y
    features = pd.DataFrame({"feature": names, "dtype": [str(X2.dtype)] * k, **agg})

    counts = _class_counts(y)
    if num_classes is not None:
        classes_list = [str(c) for c in range(num_classes)]  # out-of-range labels fail "label set"
    else:
        classes_list = list(counts)
    note = ""
    class_frame: dict[str, list[Any]] = {"class": classes_list,
                                         "count": [counts.get(c, 0) for c in classes_list]}
    class_frame["fraction"] = [c / n if n else math.nan for c in class_frame["count"]]
    if reference is not None:
        ref_mean, ref_std, ref_fraction, note = _reference_arrays(reference, k)
        features["ref_mean"] = ref_mean
        features["ref_std"] = ref_std
        features["mean_shift"] = np.abs(agg["mean"] - ref_mean)
        features["std_shift"] = np.abs(agg["std"] - ref_std)
        extra = [c for c in ref_fraction if c not in classes_list]
        class_frame["class"] += extra
        class_frame["count"] += [counts.get(c, 0) for c in extra]
        class_frame["fraction"] += [counts.get(c, 0) / n if n else math.nan for c in extra]
        class_frame["ref_fraction"] = [ref_fraction.get(c, 0.0) for c in class_frame["class"]]
        class_frame["fraction_shift"] = [abs(a - b) for a, b in zip(class_frame["fraction"],
                                                                     class_frame["ref_fraction"])]
    classes = pd.DataFrame(class_frame)
    dataset = pd.DataFrame({"n_rows": [n], "duplicate_rows": [round(duplicate_fraction * n)],
                            "duplicate_fraction": [duplicate_fraction], "sample_shape": [sample_shape]})
    return {"rows": rows, "features": features, "classes": classes, "dataset": dataset}, note


def _import_gx() -> Any:
    """Import great_expectations with telemetry off (the import is slow: about 3 s)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    import great_expectations as gx

    return gx


def _context(gx: Any, docs_dir: Path | None) -> Any:
    """An ephemeral (in-memory) context, progress bars off, a local Data Docs site if asked."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(),
                               progress_bars=ProgressBarsConfig(globally=False))
    context = gx.get_context(mode="ephemeral", project_config=config)
    if docs_dir is not None:
        context.add_data_docs_site(site_name="mlsec", site_config={
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(Path(docs_dir).resolve())},
        })
    return context


def _trim(value: Any) -> Any:
    """Keep the raw GX result JSON-able and small: cap long lists, drop tracebacks."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in ("unexpected_list", "unexpected_index_list", "unexpected_index_query",
                       "exception_traceback", "partial_unexpected_counts"):
                continue
            out[key] = _trim(item)
        return out
    if isinstance(value, list):
        if len(value) > 2 * _PARTIAL:
            return [_trim(v) for v in value[:_PARTIAL]] + [f"... ({len(value)} items)"]
        return [_trim(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def _exception_message(result: Any) -> str | None:
    info = result.exception_info or {}
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for sub in info.values():  # one entry per metric that failed
        if isinstance(sub, dict) and sub.get("raised_exception"):
            return str(sub.get("exception_message"))
    return None


def _run_suites(checks: list[_Check], frames: dict[str, pd.DataFrame], docs_dir: Path | None
                ) -> tuple[list[dict[str, Any]], int, dict[str, Any], Path | None]:
    """Run every suite; return (failures, evaluated, trimmed raw results, docs index)."""
    gx = _import_gx()
    context = _context(gx, docs_dir)
    source = context.data_sources.add_pandas("mlsec")
    failures: list[dict[str, Any]] = []
    raw: dict[str, Any] = {"suites": {}}
    evaluated = 0
    for suite_name in dict.fromkeys(c.suite for c in checks):
        suite_checks = [c for c in checks if c.suite == suite_name]
        asset = source.add_dataframe_asset(suite_name)
        batch = asset.add_batch_definition_whole_dataframe(suite_name)
        suite = context.suites.add(gx.ExpectationSuite(name=f"mlsec.{suite_name}"))
        by_id: dict[str, _Check] = {}
        for check in suite_checks:
            check.expectation.meta = {"check": check.name, "expected": check.expected}
            added = suite.add_expectation(check.expectation)
            by_id[str(added.id)] = check
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"mlsec.{suite_name}", data=batch, suite=suite))
        result_format: dict[str, Any] = {"result_format": "COMPLETE" if suite_name != "rows" else "SUMMARY"}
        if suite_name in ("features", "classes"):
            result_format["unexpected_index_column_names"] = ["feature" if suite_name == "features" else "class"]
        run = definition.run(batch_parameters={"dataframe": frames[suite_name]}, result_format=result_format)
        raw["suites"][suite_name] = _trim(run.to_json_dict())
        seen: set[str] = set()
        for result in run.results:
            config = result.expectation_config
            check = by_id.get(str(config.id)) if config is not None else None
            name = check.name if check else (config.type if config is not None else "unknown expectation")
            if check is not None:
                seen.add(str(config.id))
            evaluated += 1
            error = _exception_message(result)
            if result.success and error is None:
                continue
            if error is not None:
                column = config.kwargs.get("column") if config is not None else None
                observed = f"could not be evaluated: {error}"
            else:
                try:
                    column, observed = check.describe(result.result) if check else (None, str(result.result))
                except Exception as err:  # a description bug must not hide the failure
                    column, observed = None, f"failed ({type(err).__name__} while describing: {err})"
            failures.append({"check": name, "expectation": config.type if config is not None else None,
                             "column": column, "observed": observed,
                             "expected": check.expected if check else ""})
        for check_id, check in by_id.items():
            if check_id not in seen:  # fail closed: an expectation without a result failed
                evaluated += 1
                failures.append({"check": check.name, "expectation": type(check.expectation).__name__,
                                 "column": None, "observed": "no result returned by Great Expectations",
                                 "expected": check.expected})
    docs_path = None
    if docs_dir is not None:
        context.build_data_docs(site_names=["mlsec"])
        docs_path = Path(docs_dir).resolve() / "index.html"
        if not docs_path.is_file():
            raise RuntimeError(f"Data Docs were built but {docs_path} is missing")
    return failures, evaluated, raw, docs_path


def _summary(failures: list[dict[str, Any]], evaluated: int) -> str:
    if not failures:
        return f"all {evaluated} expectations passed"
    listed = "; ".join(f"{f['check']} ({f['observed']})" for f in failures)
    return f"{len(failures)} of {evaluated} expectations failed: {listed}"


def validate_arrays(X: np.ndarray, y: np.ndarray, *, params: ValidateParams, num_classes: int | None,
                    reference: dict | None, docs_dir: Path | None) -> ValidationReport:
    """Validate one dataset with a Great Expectations suite; fail closed.

    Parameters
    ----------
    X : ndarray, shape (N, C, H, W), (N, H, W) or (N, F)
        Features, float32 on the [0, 1] scale.
    y : ndarray, shape (N,)
        int64 labels.
    params : ValidateParams
        Class-balance bounds (fractions of N), duplicate-row bound (fraction of N), drift
        tolerances (absolute, on the [0, 1] feature scale) and the minimum row count.
    num_classes : int or None
        Labels must lie in ``0..num_classes-1``; every class of that range is checked for
        balance. None: labels must be >= 0 and the observed classes are checked.
    reference : dict or None
        :func:`dataset_statistics` of the last accepted dataset; None skips the drift checks.
    docs_dir : Path or None
        Folder for GX Data Docs (``index.html`` plus one page per suite); None writes nothing.

    Returns
    -------
    ValidationReport
        ``success`` is False when any expectation fails, cannot be evaluated, or GX raises.

    Raises
    ------
    InvalidInput
        X or y is not array-shaped as described (wrong ranks, lengths or non-numeric).
    """
    start = time.perf_counter()
    X_arr = np.asarray(X)
    X2, y = _as_2d(X_arr, y)
    agg = _feature_aggregates(X2)
    duplicate_fraction = _duplicate_fraction(X2)
    statistics = _statistics(X2, X_arr.shape, X_arr.dtype, y, agg, duplicate_fraction)
    sample_shape = "x".join(str(s) for s in X_arr.shape[1:])
    frames, reference_note = _frames(X2, y, agg, duplicate_fraction, sample_shape=sample_shape,
                                     num_classes=num_classes, reference=reference)

    n_features = X2.shape[1]
    if reference is not None and isinstance(reference.get("n_features"), int):
        n_features = reference["n_features"]  # the schema of the last accepted dataset
    expected_columns = [f"f{i}" for i in range(n_features)] + ["label"]
    expected_sample_shape = None
    if reference is not None and isinstance(reference.get("shape"), list) and reference["shape"]:
        expected_sample_shape = "x".join(str(s) for s in reference["shape"][1:])
    class_tolerance = float(getattr(params, "drift_class_tolerance", CLASS_DRIFT_TOLERANCE))

    try:
        gxe = _import_gx().expectations
        checks = _build_checks(gxe, frames=frames, params=params, num_classes=num_classes,
                               expected_columns=expected_columns, expected_sample_shape=expected_sample_shape,
                               drift=reference is not None,
                               reference_note=reference_note, class_tolerance=class_tolerance)
        failures, evaluated, raw, docs_path = _run_suites(checks, frames, docs_dir)
    except Exception as err:  # fail closed: a suite that cannot run is a failed suite
        failures = [{"check": "great_expectations", "expectation": None, "column": None,
                     "observed": f"validation could not run: {type(err).__name__}: {err}",
                     "expected": "the expectation suite runs"}]
        evaluated, raw, docs_path = 1, {"error": f"{type(err).__name__}: {err}"}, None
        if docs_dir is not None:
            docs_path = _plain_error_page(Path(docs_dir), failures)
    raw["success"] = not failures
    return ValidationReport(success=not failures, failures=failures, summary=_summary(failures, evaluated),
                            statistics=statistics, results=raw, docs_path=docs_path,
                            seconds=time.perf_counter() - start)


def _plain_error_page(docs_dir: Path, failures: list[dict[str, Any]]) -> Path | None:
    """When GX cannot render, leave a plain HTML page so the failure is still inspectable."""
    try:
        docs_dir.mkdir(parents=True, exist_ok=True)
        rows = "".join(f"<tr><td>{html.escape(str(f['check']))}</td><td>{html.escape(str(f['observed']))}</td>"
                       f"<td>{html.escape(str(f['expected']))}</td></tr>" for f in failures)
        path = docs_dir / "index.html"
        path.write_text("<!doctype html><title>mlsec validation failed</title><h1>Validation failed</h1>"
                        f"<table><tr><th>check</th><th>observed</th><th>expected</th></tr>{rows}</table>")
        return path
    except OSError:
        return None
