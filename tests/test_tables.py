"""Tables and labels as users bring them: named columns on their own scales, categories,
missing cells, declared classes; the preprocessing fitted on the accepted rows only and
applied the same way by numpy and by the loaded torch model; every bad table one line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stages.core.errors import InvalidInput
from stages.data.io import load_source
from stages.data.labels import encode_labels
from stages.data.preprocessing import (
    apply_table_preprocessing,
    column_values,
    fit_table_preprocessing,
    model_inputs,
    table_values,
)


def _write(tmp_path, frame: pd.DataFrame, name: str = "t.csv"):
    path = tmp_path / name
    if name.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return str(path)


@pytest.fixture
def people() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 60
    return pd.DataFrame({
        "age": rng.integers(18, 90, n),
        "income": rng.normal(50_000, 15_000, n).round(2),
        "city": rng.choice(["Oslo", "Lima", "Pune"], n),
        "member": rng.choice([True, False], n),
        "label": rng.choice(["no", "yes"], n),
    })


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_named_columns_scales_and_categories_are_kept(tmp_path, people, suffix):
    d = load_source(_write(tmp_path, people, "t" + suffix))
    assert d.kind == "table" and d.X.shape == (60, 4) and d.X.dtype == np.float32
    assert d.feature_names == ["age", "income", "city", "member"]
    types = {c["name"]: c["type"] for c in d.columns}
    assert types == {"age": "numeric", "income": "numeric", "city": "categorical", "member": "categorical"}
    assert d.X[:, 1].max() > 1000  # the user's own scale, not squeezed at ingest
    city = next(c for c in d.columns if c["name"] == "city")
    assert city["categories"] == ["Lima", "Oslo", "Pune"]
    assert [city["categories"][int(c)] for c in d.X[:5, 2]] == people["city"][:5].tolist()
    assert d.classes == ("no", "yes") and set(d.y.tolist()) == {0, 1}
    assert [d.classes[i] for i in d.y[:5]] == people["label"][:5].tolist()


def test_declared_class_order_is_kept(tmp_path, people):
    d = load_source(_write(tmp_path, people), classes=["yes", "no"])
    assert d.classes == ("yes", "no")
    assert [d.classes[i] for i in d.y[:8]] == people["label"][:8].tolist()


def test_integer_labels_that_are_not_positions_map_onto_a_class_list(tmp_path):
    X = np.random.default_rng(1).random((12, 3)).astype(np.float32)
    np.savez(tmp_path / "w.npz", X=X, y=np.repeat([1, 2, 3], 4))  # wine's labels as UCI ships them
    d = load_source(str(tmp_path / "w.npz"))
    assert d.classes == (1, 2, 3) and d.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert d.feature_names == ["f0", "f1", "f2"]


def test_huge_label_is_a_class_name_never_an_array_size():
    y = np.array([0, 1, 0, 1, 10**12, 10**12])
    codes, classes = encode_labels(y, declared=None, where="x")
    assert classes == [0, 1, 10**12] and codes.tolist() == [0, 1, 0, 1, 2, 2]
    with pytest.raises(InvalidInput, match=r"found 1000000000000 \(1 row\)"):
        encode_labels(np.array([0, 1, 0, 1, 10**12]), declared=None, where="x")
    with pytest.raises(InvalidInput, match=r"outside the declared classes 0, 1: '1000000000000' \(1 row\)"):
        encode_labels(np.array([0, 1, 0, 1, 10**12]), declared=[0, 1], where="x")


def test_declared_classes_match_text_and_numbers():
    codes, classes = encode_labels(np.array([0, 1, 1, 0]), declared=["0", "1"], where="x")
    assert codes.tolist() == [0, 1, 1, 0] and classes == ["0", "1"]
    with pytest.raises(InvalidInput, match="more than once"):
        encode_labels(np.array([0, 1]), declared=[0, "0"], where="x")


def _one_line(call):
    with pytest.raises(InvalidInput) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_tables_are_one_line_each(tmp_path, people):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "is empty" in _one_line(lambda: load_source(str(empty)))
    header = tmp_path / "header.csv"
    header.write_text("a,b,label\n")
    assert "a header (3 columns) but no rows" in _one_line(lambda: load_source(str(header)))
    path = _write(tmp_path, people.drop(columns=["label"]), "nolabel.csv")
    assert "label column 'label' not found; columns are ['age', 'income', 'city', 'member']" in _one_line(
        lambda: load_source(path))
    path = _write(tmp_path, people)
    msg = _one_line(lambda: load_source(path, classes=["no", "maybe"]))
    assert "outside the declared classes 'no', 'maybe': 'yes' (" in msg
    texty = people.astype({"age": object})
    texty.loc[7, "age"] = "forty"
    path = _write(tmp_path, texty, "texty.csv")
    msg = _one_line(lambda: load_source(path, columns={"age": "numeric", "income": "numeric", "city": "categorical",
                                                       "member": "categorical"}))
    assert "column 'age' is declared numeric but holds text in 1 row, e.g. 'forty' in row 7" in msg
    assert "is mostly numbers but holds text" in _one_line(lambda: load_source(path))  # undeclared: a probable typo
    msg = _one_line(lambda: load_source(_write(tmp_path, people), columns={"age": "numeric", "zip": "numeric"}))
    assert "declared column(s) ['zip'] not found" in msg
    msg = _one_line(lambda: load_source(_write(tmp_path, people), columns={"age": "numeric"}))
    assert "not declared in data.columns" in msg
    ids = people.assign(name=[f"person-{i}" for i in range(len(people))])
    assert "has 60 distinct values" in _one_line(lambda: load_source(_write(tmp_path, ids, "ids.csv")))
    (tmp_path / "dup.csv").write_text("a,a,label\n1,2,x\n3,4,y\n")
    assert "column names repeat: ['a']" in _one_line(lambda: load_source(str(tmp_path / "dup.csv")))
    nolab = people.astype({"label": object})
    nolab.loc[[3, 9], "label"] = None
    assert "2 rows without a label (rows 3, 9" in _one_line(lambda: load_source(_write(tmp_path, nolab, "nolab.csv")))


def test_missing_cells_refused_by_default_and_imputed_on_request(tmp_path, people):
    holes = people.astype({"city": object})
    holes.loc[[2, 5], "income"] = np.nan
    holes.loc[4, "city"] = None
    path = _write(tmp_path, holes)
    msg = _one_line(lambda: load_source(path))
    assert "column 'income' has 2 missing values (rows 2, 5); set data.missing=impute" in msg
    d = load_source(path, missing="impute")
    assert np.isnan(d.X[[2, 5], 1]).all() and np.isnan(d.X[4, 2])
    spec = fit_table_preprocessing(d.X, d.columns, missing="impute")
    scaled = model_inputs(d.X, {"columns": list(d.columns)}, spec)
    assert np.isfinite(scaled).all() and scaled.min() >= 0 and scaled.max() <= 1
    income = next(c for c in spec["columns"] if c["name"] == "income")
    assert income["fill"] == pytest.approx(float(np.nanmedian(d.X[:, 1])), rel=1e-6)
    everything_missing = people.assign(income=np.nan)
    assert "no values at all" in _one_line(lambda: load_source(_write(tmp_path, everything_missing, "e.csv"), missing="impute"))


def test_preprocessing_is_fitted_on_the_given_rows_only(tmp_path, people):
    d = load_source(_write(tmp_path, people))
    accepted = np.arange(40)
    spec = fit_table_preprocessing(d.X[accepted], d.columns, missing="refuse")
    extreme = d.X.copy()
    extreme[50:, 1] = 1e9  # rows outside the accepted set cannot move the fit
    assert fit_table_preprocessing(extreme[accepted], d.columns, missing="refuse") == spec
    age = spec["columns"][0]
    assert (age["low"], age["high"]) == (float(d.X[accepted, 0].min()), float(d.X[accepted, 0].max()))
    scaled = model_inputs(extreme, {"columns": list(d.columns)}, spec)
    assert scaled.shape == (60, 2 + 3 + 2) and scaled.min() >= 0 and scaled.max() <= 1
    assert (scaled[50:, 1] == 1.0).all()  # beyond the training range: clipped
    assert spec["features"] == ["age", "income", "city=Lima", "city=Oslo", "city=Pune", "member=False", "member=True"]
    assert json.loads(json.dumps(spec)) == spec  # plain JSON parameters


def test_raw_rows_in_any_form_give_the_same_features(tmp_path, people):
    d = load_source(_write(tmp_path, people))
    spec = fit_table_preprocessing(d.X, d.columns, missing="refuse")
    from_prepared = model_inputs(d.X, {"columns": list(d.columns)}, spec)
    raw = people.drop(columns=["label"])
    assert np.allclose(apply_table_preprocessing(table_values(raw, spec), spec), from_prepared, atol=1e-6)
    assert np.allclose(apply_table_preprocessing(table_values(raw.to_dict("records"), spec), spec), from_prepared, atol=1e-6)
    unknown = raw.head(3).assign(city=["Paris", "Oslo", "oslo"])
    with pytest.raises(InvalidInput) as refused:    # a category not seen in training: refused by default
        apply_table_preprocessing(table_values(unknown, spec), spec)
    assert str(refused.value).startswith("row 0, column 'city': category 'Paris' was not seen in training (2 rows")
    assert "\n" not in str(refused.value)
    ignoring = fit_table_preprocessing(d.X, d.columns, missing="refuse", unknown_category="ignore")
    out = apply_table_preprocessing(table_values(unknown, ignoring), ignoring)
    assert (out[[0, 2], 2:5] == 0).all() and out[1, 2:5].tolist() == [0, 1, 0]   # ignore: all zeros
    legacy = {k: v for k, v in spec.items() if k != "unknown_category"}         # written before the setting
    assert np.array_equal(apply_table_preprocessing(table_values(unknown, legacy), legacy), out)
    with pytest.raises(InvalidInput, match="unknown_category 'allow', not refuse or ignore"):
        apply_table_preprocessing(table_values(unknown, spec), dict(spec, unknown_category="allow"))
    with pytest.raises(InvalidInput, match="data.unknown_category must be refuse or ignore"):
        fit_table_preprocessing(d.X, d.columns, missing="refuse", unknown_category="allow")
    with pytest.raises(InvalidInput, match="lack the column"):
        table_values(raw.drop(columns=["income"]), spec)
    with pytest.raises(InvalidInput, match="missing values in rows 0"):
        apply_table_preprocessing(table_values(raw.head(1).assign(income=None), spec), spec)
    with pytest.raises(InvalidInput, match="must hold numbers, got 'lots'"):
        apply_table_preprocessing(table_values(raw.head(1).assign(income="lots"), spec), spec)


def test_torch_model_applies_the_same_preprocessing(tmp_path):
    import torch

    from stages.ml.nets import build_model
    from stages.ml.raw_inputs import RawInputModel

    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"a": rng.normal(100, 30, 40), "b": rng.normal(-5, 2, 40), "label": np.repeat([0, 1], 20)})
    d = load_source(_write(tmp_path, frame))
    spec = fit_table_preprocessing(d.X, d.columns, missing="impute")
    net = build_model("mlp", input_shape=(2,), num_classes=2).eval()
    model = RawInputModel(net, spec).eval()
    raw = torch.tensor(frame[["a", "b"]].to_numpy(), dtype=torch.float32, requires_grad=True)
    expected = net(torch.from_numpy(model_inputs(d.X, {"columns": list(d.columns)}, spec)))
    assert torch.allclose(model(raw), expected, atol=1e-5)
    assert torch.allclose(model(frame), expected, atol=1e-5)
    model(raw).sum().backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0  # gradients reach the raw columns
    holes = raw.detach().clone()
    holes[0, 0] = float("nan")
    assert torch.isfinite(model(holes)).all()  # imputed with the training median


def test_prepared_codes_round_trip_to_values(tmp_path, people):
    d = load_source(_write(tmp_path, people))
    values = column_values(d.X, d.columns)
    assert values[2].tolist() == people["city"].tolist()
    assert values[3].tolist() == people["member"].astype(str).tolist()
