"""``validate_arrays``: one dataset through the suite, a fail-closed :class:`ValidationReport`."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.errors import InvalidInput
from stages.core.params import ValidateParams
from stages.data.expectations.checks import _build_checks
from stages.data.expectations.frames import _frames
from stages.data.expectations.gx import (
    _import_gx,
    _plain_error_page,
    _run_suites,
    _summary,
)
from stages.data.expectations.statistics import (
    _as_2d,
    _duplicate_fraction,
    _feature_aggregates,
    _statistics,
)


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


def validate_arrays(X: np.ndarray, y: np.ndarray, *, params: ValidateParams, num_classes: int | None,
                    reference: dict | None, docs_dir: Path | None, schema: dict[str, Any] | None = None,
                    allow_missing: bool = False) -> ValidationReport:
    """Validate one dataset with a Great Expectations suite; fail closed.

    Parameters
    ----------
    X : ndarray, shape (N, C, H, W), (N, H, W) or (N, F)
        Features, float32: images on the [0, 1] scale; table rows in the user's units
        (categorical columns as category codes, NaN for a missing cell).
    y : ndarray, shape (N,)
        int64 labels (positions in the class list).
    params : ValidateParams
        Class-balance bounds (shares of an equal split over the classes), duplicate-row
        bound (fraction of N), drift tolerances (images: absolute, on the [0, 1] scale;
        tables: in reference standard deviations) and the minimum row count.
    num_classes : int or None
        Labels must lie in ``0..num_classes-1``; every class of that range is checked for
        balance. None: labels must be >= 0 and the observed classes are checked.
    schema : dict or None
        The data's own description (``kind``, ``classes``, and for tables ``columns``:
        name, type, categories), recorded at ingest and signed in the manifest. Names the
        columns and classes in every check; None: images with columns ``f0..``.
    allow_missing : bool
        Table cells may be NaN (``data.missing: impute``); otherwise NaN fails.
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
    statistics = _statistics(X2, X_arr.shape, X_arr.dtype, y, agg, duplicate_fraction, schema)
    sample_shape = "x".join(str(s) for s in X_arr.shape[1:])
    kind = (schema or {}).get("kind") or ("table" if X_arr.ndim == 2 and schema is not None else "image")
    columns = (schema or {}).get("columns")
    names = [c["name"] for c in columns] if columns else [f"f{i}" for i in range(X2.shape[1])]
    if len(names) != X2.shape[1]:
        raise InvalidInput(f"the schema names {len(names)} columns but X has {X2.shape[1]} features")
    label_name = "label" if "label" not in names else "__label__"
    class_names = [str(c) for c in schema["classes"]] if schema and schema.get("classes") else None
    frames, reference_note = _frames(X2, y, agg, duplicate_fraction, sample_shape=sample_shape,
                                     num_classes=num_classes, reference=reference, names=names, label_name=label_name,
                                     class_names=class_names, columns=columns, relative_drift=kind == "table")

    if reference is not None and isinstance(reference.get("feature_names"), list):
        expected_features = [str(c) for c in reference["feature_names"]]  # the schema of the last accepted dataset
    elif reference is not None and isinstance(reference.get("n_features"), int) and not columns:
        expected_features = [f"f{i}" for i in range(reference["n_features"])]
    else:
        expected_features = names
    expected_columns = expected_features + [label_name]
    expected_classes = None
    if reference is not None and isinstance(reference.get("classes"), list) and class_names is not None:
        expected_classes = [str(c) for c in reference["classes"]]
    expected_sample_shape = None
    if reference is not None and isinstance(reference.get("shape"), list) and reference["shape"]:
        expected_sample_shape = "x".join(str(s) for s in reference["shape"][1:])
    class_tolerance = params.drift_class_tolerance

    try:
        gxe = _import_gx().expectations
        checks = _build_checks(gxe, frames=frames, params=params, num_classes=num_classes,
                               expected_columns=expected_columns, expected_sample_shape=expected_sample_shape,
                               drift=reference is not None,
                               reference_note=reference_note, class_tolerance=class_tolerance, label_name=label_name,
                               kind=kind, allow_missing=allow_missing and kind == "table",
                               expected_classes=expected_classes)
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
