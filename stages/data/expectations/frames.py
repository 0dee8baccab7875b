"""The four pandas frames the suites run on (rows, features, classes, dataset)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from stages.data.expectations.statistics import _class_counts, _reference_arrays


def _code_out_of_range(X2: np.ndarray, columns: list[dict[str, Any]] | None) -> np.ndarray:
    """Per feature: how many categorical codes fall outside the column's category list."""
    out = np.zeros(X2.shape[1], dtype=np.int64)
    for j, column in enumerate(columns or []):
        if column.get("type") == "categorical":
            codes = X2[:, j]
            present = codes[~np.isnan(codes)]
            out[j] = int(((present < 0) | (present > len(column["categories"]) - 1) | (present != np.round(present))).sum())
    return out


def _frames(X2: np.ndarray, y: np.ndarray, agg: dict[str, np.ndarray], duplicate_fraction: float, *,
            sample_shape: str, num_classes: int | None, reference: dict[str, Any] | None, names: list[str],
            label_name: str, class_names: list[str] | None, columns: list[dict[str, Any]] | None,
            relative_drift: bool) -> tuple[dict[str, pd.DataFrame], str]:
    """The rows, features, classes and dataset frames.

    ``class_names`` (the declared class list as text) name the classes frame's rows; the
    drift of tables (``relative_drift``) is measured in reference standard deviations.
    """
    n, k = X2.shape
    rows = pd.DataFrame(X2, columns=names, copy=False)
    rows[label_name] = y
    features = pd.DataFrame({"feature": names, "dtype": [str(X2.dtype)] * k, **agg,
                             "code_out_of_range": _code_out_of_range(X2, columns)})

    counts = _class_counts(y, class_names)
    if class_names is not None:
        classes_list = list(class_names)
    elif num_classes is not None:
        classes_list = [str(c) for c in range(num_classes)]  # out-of-range labels fail "label set"
    else:
        classes_list = list(counts)
    note = ""
    class_frame: dict[str, list[Any]] = {"class": classes_list,
                                         "count": [counts.get(c, 0) for c in classes_list]}
    class_frame["fraction"] = [c / n if n else math.nan for c in class_frame["count"]]
    # a class's share of an equal split: 1.0 when all classes are equally frequent
    class_frame["share"] = [f * len(classes_list) for f in class_frame["fraction"]]
    if reference is not None:
        ref_mean, ref_std, ref_fraction, note = _reference_arrays(reference, k)
        features["ref_mean"] = ref_mean
        features["ref_std"] = ref_std
        if relative_drift:
            unit = np.where(ref_std > 0, ref_std, 1.0)
            features["mean_shift"] = np.abs(agg["mean"] - ref_mean) / unit
            features["std_shift"] = np.abs(agg["std"] - ref_std) / unit
        else:
            features["mean_shift"] = np.abs(agg["mean"] - ref_mean)
            features["std_shift"] = np.abs(agg["std"] - ref_std)
        extra = [c for c in ref_fraction if c not in classes_list]
        class_frame["class"] += extra
        class_frame["count"] += [counts.get(c, 0) for c in extra]
        class_frame["fraction"] += [counts.get(c, 0) / n if n else math.nan for c in extra]
        class_frame["share"] += [math.nan] * len(extra)  # not declared here: "class list" fails, balance skips it
        class_frame["ref_fraction"] = [ref_fraction.get(c, 0.0) for c in class_frame["class"]]
        class_frame["fraction_shift"] = [abs(a - b) for a, b in zip(class_frame["fraction"],
                                                                     class_frame["ref_fraction"])]
    classes = pd.DataFrame(class_frame)
    dataset = pd.DataFrame({"n_rows": [n], "duplicate_rows": [round(duplicate_fraction * n)],
                            "duplicate_fraction": [duplicate_fraction], "sample_shape": [sample_shape],
                            "class_list": [json.dumps(classes_list)]})
    return {"rows": rows, "features": features, "classes": classes, "dataset": dataset}, note
