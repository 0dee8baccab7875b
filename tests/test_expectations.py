"""Tests for stages.data.expectations: the GX validation suite passes clean digits and names
each kind of bad data in a readable failure; it fails closed when GX cannot run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stages.data.expectations import checks, validation
from stages.core.errors import InvalidInput
from stages.data.expectations import dataset_statistics, validate_arrays
from stages.core.params import ValidateParams

PARAMS = ValidateParams(min_class_share=0.2, max_class_share=5.0, max_duplicate_fraction=0.05,
                        drift_mean_tolerance=0.1, drift_std_tolerance=0.1, min_rows=50)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    X = (data.images / 16.0).astype(np.float32)[:, None]  # N x 1 x 8 x 8 on [0, 1]
    return X, data.target.astype(np.int64)


@pytest.fixture(scope="module")
def reference(digits) -> dict:
    return dataset_statistics(*digits)


def run(X, y, *, num_classes=10, reference=None, docs_dir=None, params=PARAMS):
    return validate_arrays(X, y, params=params, num_classes=num_classes, reference=reference, docs_dir=docs_dir)


def failed(report, check: str) -> dict:
    matches = [f for f in report.failures if f["check"] == check]
    assert matches, f"expected a {check!r} failure, got {report.summary}"
    return matches[0]


def test_clean_digits_pass_with_reference(digits, reference):
    report = run(*digits, reference=reference)
    assert report.success, report.summary
    assert report.failures == []
    assert report.summary.startswith("all ") and report.summary.endswith(" expectations passed")
    assert report.statistics["n"] == 1797 and report.statistics["n_features"] == 64
    assert report.docs_path is None
    json.dumps(report.to_dict())  # JSON-able, raw GX results included


def test_no_reference_skips_drift_only(digits, reference):
    with_ref = run(*digits, reference=reference)
    without = run(*digits, reference=None)
    assert without.success
    checks = {r["expectation_config"]["meta"]["check"]
              for suite in without.results["suites"].values() for r in suite["results"]}
    assert not any(c.startswith("drift") for c in checks)
    assert {"value range: max", "duplicate rows", "class balance", "label set"} <= checks
    n_with = int(with_ref.summary.split()[1])
    n_without = int(without.summary.split()[1])
    assert n_with > n_without


def test_nan_fails_even_though_gx_treats_nan_as_null(digits):
    X, y = digits
    X = X.copy()
    X[3, 0, 2, 5] = np.nan
    report = run(X, y)
    assert not report.success
    failure = failed(report, "NaN values")
    assert failure["column"] == "f21"
    assert "1 feature with NaN" in failure["observed"]


def test_all_nan_feature_fails(digits):
    X, y = digits
    X = X.copy()
    X[:, 0, 0, 0] = np.nan
    report = run(X, y)
    assert not report.success
    assert failed(report, "NaN values")["observed"] == "1 feature with NaN, e.g. f0 has 1797 NaN"
    assert failed(report, "statistics computable: max")["column"] == "f0"


def test_inf_fails(digits):
    X, y = digits
    X = X.copy()
    X[7, 0, 1, 1] = np.inf
    report = run(X, y)
    assert "f9 has 1 inf" in failed(report, "inf values")["observed"]
    assert "f9 max inf" in failed(report, "value range: max")["observed"]


def test_value_out_of_range_fails(digits):
    X, y = digits
    X = X.copy()
    X[0, 0, 1, 4] = 3.0
    X[1, 0, 0, 0] = -0.5
    report = run(X, y)
    assert failed(report, "value range: max")["observed"] == "1 feature outside [0, 1], e.g. f12 max 3"
    assert failed(report, "value range: min")["observed"] == "1 feature outside [0, 1], e.g. f0 min -0.5"
    assert report.summary.startswith("2 of ")


def test_label_outside_num_classes_fails(digits):
    X, y = digits
    y = y.copy()
    y[10] = 11
    report = run(X, y)
    failure = failed(report, "label set")
    assert failure["column"] == "label" and "e.g. 11" in failure["observed"]
    assert failure["expected"] == "labels in 0..9"


def test_float_labels_fail_schema(digits):
    X, y = digits
    report = run(X, y.astype(np.float64))
    assert "label dtype float64" in failed(report, "schema: label dtype")["observed"]


def test_feature_dtype_checked(digits):
    X, y = digits
    report = run(X.astype(np.float64), y)
    assert "of another dtype" in failed(report, "schema: feature dtype")["observed"]


def test_rare_class_fails_balance(digits):
    X, y = digits
    keep = np.flatnonzero(y != 3)[:1500].tolist() + np.flatnonzero(y == 3)[:10].tolist()
    report = run(X[keep], y[keep])
    failure = failed(report, "class balance")
    assert failure["column"] == "3"
    assert failure["observed"].startswith("1 class outside the balance bounds, e.g. class 3 at 0.006")
    assert "x an equal share" in failure["observed"]


def test_duplicated_rows_fail(digits):
    X, y = digits
    rng = np.random.default_rng(0)
    copies = rng.choice(len(X), size=int(0.2 * len(X)), replace=False)
    X2, y2 = np.concatenate([X, X[copies]]), np.concatenate([y, y[copies]])
    report = run(X2, y2)
    failure = failed(report, "duplicate rows")
    assert "359 of 2156 rows repeat an earlier row" in failure["observed"]
    assert failure["expected"] == "duplicate-row fraction <= 0.05"


def test_drifted_copy_fails(digits, reference):
    X, y = digits
    shifted = np.clip(X + 0.3, 0.0, 1.0).astype(np.float32)  # stays in range: only drift fails
    report = run(shifted, y, reference=reference)
    failure = failed(report, "drift: feature mean")
    assert failure["observed"].startswith("64 features shifted in mean by more than 0.1")
    assert {f["check"] for f in report.failures} <= {"drift: feature mean", "drift: feature std"}


def test_class_fraction_drift_fails(digits, reference):
    X, y = digits
    keep = np.flatnonzero((y != 0) | (np.arange(len(y)) % 3 == 0))  # two thirds of the zeros gone
    report = run(X[keep], y[keep], reference=reference)
    assert "class 0 by" in failed(report, "drift: class fractions")["observed"]


def test_reference_of_another_shape_fails_closed(digits, reference):
    X, y = digits
    report = run(X[:, :, :4], y, reference=reference)
    assert not report.success
    assert failed(report, "schema: columns")["observed"].startswith("33 columns, missing f32, f33")
    assert "reference has 64 features, this dataset 32" in failed(report, "drift: reference mean available")["observed"]


def test_reshaped_samples_fail_schema_against_reference(digits, reference):
    X, y = digits
    report = run(X.reshape(len(X), 1, 4, 16), y, reference=reference)
    assert failed(report, "schema: sample shape")["observed"] == "samples of shape 1x4x16"
    assert failed(report, "schema: sample shape")["expected"] == "samples of shape 1x8x8 (as in the reference)"


def test_too_few_rows_fail(digits):
    X, y = digits
    report = run(X[:20], y[:20], num_classes=None)
    assert failed(report, "row count")["observed"] == "20 rows"


def test_gx_error_fails_closed(digits, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("store unavailable")

    monkeypatch.setattr(validation, "_run_suites", broken)
    report = run(*digits)
    assert not report.success
    assert "store unavailable" in report.failures[0]["observed"]


def test_expectation_that_cannot_evaluate_fails_closed(digits, monkeypatch):
    real = checks._build_checks

    def with_bad_column(gxe, **kwargs):
        built = real(gxe, **kwargs)
        built.append(checks._Check("rows", "bogus", gxe.ExpectColumnValuesToNotBeNull(column="no_such"),
                                   "never", lambda r: (None, "")))
        return built

    monkeypatch.setattr(validation, "_build_checks", with_bad_column)
    report = run(*digits)
    assert not report.success
    assert failed(report, "bogus")["observed"].startswith("could not be evaluated")


def test_data_docs_written(digits, reference, tmp_path):
    report = run(*digits, reference=reference, docs_dir=tmp_path / "docs")
    assert report.success
    assert report.docs_path == (tmp_path / "docs" / "index.html").resolve()
    assert report.docs_path.is_file()
    assert list((tmp_path / "docs" / "validations").rglob("*.html"))  # one GX page per suite


def test_statistics_are_json_and_stable(digits):
    X, y = digits
    stats = dataset_statistics(X, y)
    assert stats == json.loads(json.dumps(stats))
    assert stats["shape"] == [1797, 1, 8, 8] and stats["dtype"] == "float32"
    assert len(stats["feature_mean"]) == 64
    assert abs(sum(stats["class_fraction"].values()) - 1.0) < 1e-9
    assert stats["duplicate_fraction"] < 0.05


@pytest.mark.parametrize("X, y, match", [
    (np.zeros(5, dtype=np.float32), np.zeros(5, dtype=np.int64), "shape"),
    (np.zeros((5, 2), dtype=np.float32), np.zeros(4, dtype=np.int64), "X has 5 samples and y has 4"),
])
def test_bad_shapes_raise(X, y, match):
    with pytest.raises(InvalidInput, match=match):
        run(X, y)


def test_unreadable_reference_fails_closed(digits):
    report = run(*digits, reference={"n": 5})
    assert not report.success
    assert "reference statistics unreadable" in failed(report, "drift: reference mean available")["observed"]


# ---------------------------------------------------------------- tables: names, classes, relative bounds
@pytest.fixture(scope="module")
def cancer():
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    schema = {"kind": "table", "classes": ["malignant", "benign"],
              "columns": [{"name": str(n), "type": "numeric"} for n in d.feature_names]}
    return d.data.astype(np.float32), d.target.astype(np.int64), schema


def run_table(X, y, schema, *, reference=None, allow_missing=False, docs_dir=None):
    return validate_arrays(X, y, params=PARAMS, num_classes=len(schema["classes"]), reference=reference,
                           docs_dir=docs_dir, schema=schema, allow_missing=allow_missing)


def test_raw_table_with_an_imbalanced_binary_label_passes(cancer, tmp_path):
    X, y, schema = cancer
    report = run_table(X, y, schema, docs_dir=tmp_path / "docs")  # 23 columns outside [0, 1], 63% one class
    assert report.success, report.summary
    assert report.statistics["feature_names"][0] == "mean radius"
    assert report.statistics["class_fraction"]["benign"] == pytest.approx(357 / 569)
    pages = "".join(p.read_text() for p in (tmp_path / "docs").rglob("*.html"))
    assert "mean radius" in pages and "worst fractal dimension" in pages


def test_table_failures_name_the_columns_and_classes(cancer):
    X, y, schema = cancer
    X = X.copy()
    X[4, 2] = np.nan
    report = run_table(X, y, schema)
    assert failed(report, "NaN values")["column"] == "mean perimeter"
    assert run_table(X, y, schema, allow_missing=True).success  # data.missing: impute
    keep = np.flatnonzero(y == 1).tolist() + np.flatnonzero(y == 0)[:20].tolist()
    report = run_table(cancer[0][keep], y[keep], schema)
    assert failed(report, "class balance")["observed"].startswith("1 class outside the balance bounds, e.g. class malignant at 0.053")


def test_categorical_codes_outside_their_list_fail(cancer):
    X, y, schema = cancer
    schema = {**schema, "columns": [{"name": "colour", "type": "categorical", "categories": ["red", "blue"]}] + schema["columns"][1:]}
    X = X.copy()
    X[:, 0] = np.arange(len(X)) % 2
    assert run_table(X, y, schema).success
    X[7, 0] = 2
    assert "colour has 1" in failed(run_table(X, y, schema), "categories known")["observed"]


def test_label_set_and_columns_are_checked_against_the_reference(cancer):
    X, y, schema = cancer
    reference = dataset_statistics(X, y, schema=schema)
    assert run_table(X, y, schema, reference=reference).success
    renamed = {**schema, "classes": ["malignant", "healthy"]}
    failure = failed(run_table(X, y, renamed, reference=reference), "label set: classes as in the reference")
    assert "classes malignant, healthy" in failure["observed"]
    columns = [dict(c) for c in schema["columns"]]
    columns[0]["name"] = "radius"
    failure = failed(run_table(X, y, {**schema, "columns": columns}, reference=reference), "schema: columns")
    assert "missing mean radius" in failure["observed"] and "unexpected radius" in failure["observed"]


def test_table_drift_is_measured_in_reference_stds(cancer):
    X, y, schema = cancer
    reference = dataset_statistics(X, y, schema=schema)
    shifted = X.copy()
    shifted[:, 3] += 0.5 * X[:, 3].std()  # mean area half a std higher: absolute shift ~175
    failure = failed(run_table(shifted, y, schema, reference=reference), "drift: feature mean")
    assert failure["column"] == "mean area" and "by 0.5" in failure["observed"] and "reference std" in failure["observed"]
