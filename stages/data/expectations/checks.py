"""The expectations of the suite, the frame each runs on, and how a failure is described."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from stages.core.params import ValidateParams

FEATURE_DTYPE = "float32"
LABEL_DTYPE = "int64"
_EXAMPLES = 3  # how many offending features or values a failure line names


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


def _balance_describer(k: int) -> Callable[[dict[str, Any]], tuple[str | None, str]]:
    """'1 class outside the balance bounds, e.g. class 3 at 0.0066 of the rows (0.066x an equal share)'."""

    def describe(result: dict[str, Any]) -> tuple[str | None, str]:
        rows = [r for r in (result.get("unexpected_index_list") or []) if isinstance(r.get("share"), (int, float))]
        count = result.get("unexpected_count", len(rows))
        text = f"{_plural(count, 'class')} outside the balance bounds"
        if rows:
            worst = max(rows, key=lambda r: abs(math.log(max(float(r["share"]), 1e-9))))
            share = float(worst["share"])
            text += f", e.g. class {worst.get('class')} at {_fmt(share / k)} of the rows ({_fmt(share)}x an equal share)"
        return _names(rows, "class"), text

    return describe


def _build_checks(gxe: Any, *, frames: dict[str, pd.DataFrame], params: ValidateParams, num_classes: int | None,
                  expected_columns: list[str], expected_sample_shape: str | None, drift: bool,
                  reference_note: str, class_tolerance: float, label_name: str = "label", kind: str = "image",
                  allow_missing: bool = False, expected_classes: list[str] | None = None) -> list[_Check]:
    """The expectations for one dataset.

    ``kind`` ``image``: every feature within [0, 1]. ``table``: features in the user's units
    (no range), categorical codes within their category list, NaN allowed when
    ``allow_missing`` (``data.missing: impute``), drift in reference standard deviations.
    ``expected_classes``: the reference's class list, which this data's must equal.
    """
    checks: list[_Check] = []
    add = checks.append
    n_expected = len(expected_columns)
    schema_text = (f"{n_expected} columns: f0..f{n_expected - 2} then {label_name}" if expected_columns[0] == "f0"
                   else f"{n_expected} columns: {_names([{'c': c} for c in expected_columns[:-1]], 'c')} then {label_name}")

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
               schema_text, columns_described))
    add(_Check("rows", "row count",
               gxe.ExpectTableRowCountToBeBetween(min_value=params.min_rows),
               f"at least {params.min_rows} rows",
               lambda r: (None, f"{r.get('observed_value')} rows")))
    add(_Check("rows", "schema: label dtype",
               gxe.ExpectColumnValuesToBeOfType(column=label_name, type_=LABEL_DTYPE),
               f"label dtype {LABEL_DTYPE}",
               lambda r: (label_name, f"label dtype {r.get('observed_value')}")))
    add(_Check("rows", "label missing",
               gxe.ExpectColumnValuesToNotBeNull(column=label_name),
               "no missing (NaN) label",
               lambda r: (label_name, f"{_plural(r.get('unexpected_count'), 'label')} missing (NaN), e.g. rows "
                                      f"{_names([{'i': i} for i in r.get('partial_unexpected_index_list') or []], 'i')}")))
    if num_classes is not None:
        label_check = gxe.ExpectColumnValuesToBeInSet(column=label_name, value_set=list(range(num_classes)))
        label_expected = f"labels in 0..{num_classes - 1}"
    else:
        label_check = gxe.ExpectColumnValuesToBeBetween(column=label_name, min_value=0)
        label_expected = "labels >= 0"

    def labels_described(result: dict[str, Any]) -> tuple[str | None, str]:
        values = sorted({_fmt(v) for v in result.get("partial_unexpected_list") or []})
        return label_name, (f"{_plural(result.get('unexpected_count'), 'label')} outside the label set, "
                            f"e.g. {', '.join(values[:_EXAMPLES])}")

    add(_Check("rows", "label set", label_check, label_expected, labels_described))
    if expected_classes is not None:
        want = json.dumps(list(expected_classes))
        add(_Check("dataset", "label set: classes as in the reference",
                   gxe.ExpectColumnValuesToBeInSet(column="class_list", value_set=[want]),
                   f"the classes {_names([{'c': c} for c in expected_classes], 'c')} (as in the reference)",
                   lambda r: (None, f"classes {', '.join(json.loads((r.get('partial_unexpected_list') or ['[]'])[0]))}")))

    add(_Check("features", "schema: feature dtype",
               gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=[FEATURE_DTYPE]),
               f"features of dtype {FEATURE_DTYPE}",
               _feature_describer("dtype", "of another dtype", "{name} is {value}")))
    if not allow_missing:
        add(_Check("features", "NaN values",
                   gxe.ExpectColumnValuesToBeBetween(column="n_nan", min_value=0, max_value=0),
                   "no NaN in any feature",
                   _feature_describer("n_nan", "with NaN", "{name} has {value} NaN")))
    add(_Check("features", "inf values",
               gxe.ExpectColumnValuesToBeBetween(column="n_inf", min_value=0, max_value=0),
               "no inf in any feature",
               _feature_describer("n_inf", "with inf", "{name} has {value} inf")))
    if kind == "image":
        add(_Check("features", "value range: min",
                   gxe.ExpectColumnValuesToBeBetween(column="min", min_value=0.0, max_value=1.0),
                   "every feature within [0, 1]",
                   _feature_describer("min", "outside [0, 1]", "{name} min {value}", lowest_first=True)))
        add(_Check("features", "value range: max",
                   gxe.ExpectColumnValuesToBeBetween(column="max", min_value=0.0, max_value=1.0),
                   "every feature within [0, 1]",
                   _feature_describer("max", "outside [0, 1]", "{name} max {value}")))
    else:
        add(_Check("features", "categories known",
                   gxe.ExpectColumnValuesToBeBetween(column="code_out_of_range", min_value=0, max_value=0),
                   "every categorical value in its column's category list",
                   _feature_describer("code_out_of_range", "with values outside their categories",
                                      "{name} has {value}")))
    for column in ("min", "max", "mean", "std"):
        # GX skips nulls in range checks: a feature with no usable value must fail here.
        add(_Check("features", f"statistics computable: {column}",
                   gxe.ExpectColumnValuesToNotBeNull(column=column),
                   f"a {column} for every feature (at least one non-NaN value)",
                   _not_null_describer(column, "no finite values")))

    k = len(frames["classes"])
    add(_Check("classes", "class balance",
               gxe.ExpectColumnValuesToBeBetween(column="share", min_value=params.min_class_share,
                                                 max_value=params.max_class_share),
               f"every class at {params.min_class_share}x to {params.max_class_share}x of an equal share "
               f"(fraction {params.min_class_share / max(k, 1):.3g} to {min(1.0, params.max_class_share / max(k, 1)):.3g} "
               f"for {k} classes)",
               _balance_describer(max(k, 1))))
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
        unit = " reference std" if kind == "table" else ""
        for column, tolerance, what in (("mean_shift", params.drift_mean_tolerance, "mean"),
                                        ("std_shift", params.drift_std_tolerance, "std")):
            add(_Check("features", f"drift: feature {what}",
                       gxe.ExpectColumnValuesToBeBetween(column=column, min_value=0.0, max_value=tolerance),
                       f"|{what} - reference {what}| <= {tolerance}{unit} for every feature",
                       _feature_describer(column, f"shifted in {what} by more than {tolerance}{unit}", "{name} by {value}")))
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
