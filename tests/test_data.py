from __future__ import annotations

import numpy as np
import pytest

from stages.data.io import load_source
from stages.data.prepared import split_indices
from stages.core.errors import InvalidInput


def test_digits_normal_form():
    d = load_source("sklearn:digits")
    assert d.X.shape == (1797, 1, 8, 8) and d.X.dtype == np.float32
    assert 0.0 <= d.X.min() and d.X.max() <= 1.0 and d.num_classes == 10


def test_npz_uint8_scales_and_adds_channel(tmp_path):
    X = np.random.default_rng(0).integers(0, 256, size=(20, 5, 5), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", X=X, y=np.arange(20) % 3, annotator_labels=np.full((20, 2), -1))
    d = load_source(str(tmp_path / "d.npz"))
    assert d.X.shape == (20, 1, 5, 5) and np.allclose(d.X * 255, X[:, None])
    assert d.annotator_labels.shape == (20, 2)


@pytest.mark.parametrize("arrays, message", [
    ({"X": np.zeros((5, 4)), "y": np.zeros(4, dtype=int)}, "same length"),
    ({"X": np.zeros((5, 4)), "y": np.array([0, 1, 0.5, 1, 0])}, "labels must be integers"),
    ({"X": np.full((5, 4), np.nan), "y": np.zeros(5, dtype=int)}, "NaN"),
    ({"X": np.zeros((5, 4)), "y": np.array(["a"] * 5)}, "labels must be integers"),
    ({"X": np.zeros((5, 4)), "y": np.array([0, -1, 0, 1, 0])}, ">= 0"),
    ({"X": np.zeros((5, 4))}, "must hold arrays 'X' and 'y'"),
])
def test_bad_npz_is_one_line(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InvalidInput, match=message) as info:
        load_source(str(tmp_path / "bad.npz"))
    assert "\n" not in str(info.value)


def test_not_an_npz(tmp_path):
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(InvalidInput, match="not an NPZ"):
        load_source(str(tmp_path / "x.npz"))


def test_pickled_object_array_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", X=np.array([object()] * 3, dtype=object), y=np.zeros(3, dtype=int))
    with pytest.raises(InvalidInput, match="without pickle"):
        load_source(str(tmp_path / "obj.npz"))


def test_missing_file():
    with pytest.raises(InvalidInput, match="not found"):
        load_source("/nonexistent/data.npz")


def test_csv_with_image_shape(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(np.random.default_rng(1).random((12, 4)), columns=list("abcd"))
    frame["label"] = np.arange(12) % 2
    frame.to_csv(tmp_path / "t.csv", index=False)
    d = load_source(str(tmp_path / "t.csv"), image_shape=(2, 2))
    assert d.X.shape == (12, 1, 2, 2)


def test_split_is_stratified_and_deterministic():
    y = np.repeat(np.arange(5), 20)
    a_train, a_test = split_indices(y, test_fraction=0.2, seed=0)
    b_train, b_test = split_indices(y, test_fraction=0.2, seed=0)
    assert np.array_equal(a_test, b_test) and len(a_test) == 20
    assert set(np.bincount(y[a_test])) == {4}
    assert not set(a_train) & set(a_test)
