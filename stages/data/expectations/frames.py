"""The four pandas frames the suites run on (rows, features, classes, dataset)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from stages.data.expectations.statistics import _class_counts, _reference_arrays


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
