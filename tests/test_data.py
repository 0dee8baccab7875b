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
    ({"X": np.zeros((5, 4)), "y": np.array([0, 1, 0.5, 1, 0])}, "labels must be whole numbers or text, found 0.5"),
    ({"X": np.full((5, 4), np.nan), "y": np.array([0, 0, 1, 1, 1])}, "NaN"),
    ({"X": np.zeros((5, 4)), "y": np.array(["a"] * 5)}, "a single class 'a'"),
    ({"X": np.zeros((5, 4)), "y": np.array([0, -1, 0, 1, 1])}, r"at least 2 rows, found -1 \(1 row\)"),
    ({"X": np.zeros((5, 4)), "y": np.array([0, np.nan, 0, 1, 1])}, r"1 row without a label \(rows 1;"),
    ({"X": np.zeros((5, 4))}, "must hold arrays 'X' and 'y'"),
    ({"X": np.zeros((5, 3, 4, 4, 2)), "y": np.zeros(5, dtype=int)}, "X must be N x F"),
    ({"X": np.zeros((5, 0)), "y": np.array([0, 0, 1, 1, 1])}, "no features"),
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
    with pytest.raises(InvalidInput, match="stored as Python objects \\(pickle\\), which is refused"):
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


def test_rgb_channels_last_uint8_becomes_channels_first(tmp_path):
    X = np.random.default_rng(2).integers(0, 256, size=(12, 10, 14, 3), dtype=np.uint8)  # N x H x W x C, non-square
    np.savez(tmp_path / "rgb.npz", X=X, y=np.repeat([0, 1, 2], 4))
    d = load_source(str(tmp_path / "rgb.npz"))
    assert d.X.shape == (12, 3, 10, 14) and d.layout == "NHWC" and d.kind == "image"
    assert np.allclose(d.X * 255, np.moveaxis(X, -1, 1))
    assert d.scaled_from == "uint8/255"


def test_float_and_uint16_images(tmp_path):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "f.npz", X=rng.random((6, 3, 5, 9)).astype(np.float32), y=np.repeat([0, 1], 3))
    assert load_source(str(tmp_path / "f.npz")).X.shape == (6, 3, 5, 9)
    np.savez(tmp_path / "u.npz", X=np.full((6, 4, 4), 65535, dtype=np.uint16), y=np.repeat([0, 1], 3))
    assert load_source(str(tmp_path / "u.npz")).X.max() == 1.0


@pytest.mark.parametrize("X, declared, message", [
    (np.zeros((6, 3, 8, 8), dtype=np.uint8), (8, 8),
     r"X holds 3-channel \(RGB\) 8 x 8 images where data.image_shape \[8, 8\] declares 1-channel \(grayscale\) 8 x 8"),
    (np.zeros((6, 8, 8, 3), dtype=np.uint8), (1, 8, 8), "3-channel .RGB. 8 x 8 images where"),
    (np.zeros((6, 1, 9, 8), dtype=np.uint8), (8, 8), "1-channel .grayscale. 9 x 8 images where"),
    (np.full((6, 1, 4, 4), 200.0, dtype=np.float32), None, r"images must lie on the \[0, 1\] scale, found values in \[200, 200\]"),
])
def test_images_that_do_not_fit_are_one_line(tmp_path, X, declared, message):
    np.savez(tmp_path / "i.npz", X=X, y=np.repeat([0, 1], 3))
    with pytest.raises(InvalidInput, match=message) as info:
        load_source(str(tmp_path / "i.npz"), image_shape=declared)
    assert "\n" not in str(info.value)


def test_mixed_image_sizes_are_refused_without_unpickling(tmp_path):
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((8, 8)), np.zeros((9, 9))
    np.savez(tmp_path / "ragged.npz", X=ragged, y=np.array([0, 1]))
    with pytest.raises(InvalidInput, match="array 'X' is stored as Python objects .pickle., which is refused.*mixed image sizes"):
        load_source(str(tmp_path / "ragged.npz"))


def test_empty_npz_file(tmp_path):
    (tmp_path / "e.npz").write_bytes(b"")
    with pytest.raises(InvalidInput, match="is empty"):
        load_source(str(tmp_path / "e.npz"))


def test_annotator_labels_follow_the_class_list(tmp_path):
    X = np.zeros((6, 4), dtype=np.float32)
    np.savez(tmp_path / "a.npz", X=X, y=np.array([3, 3, 5, 5, 7, 7]), annotator_labels=np.array([[3, -1]] * 3 + [[7, 5]] * 3))
    d = load_source(str(tmp_path / "a.npz"))
    assert d.classes == (3, 5, 7) and d.annotator_labels.tolist() == [[0, -1]] * 3 + [[2, 1]] * 3
    np.savez(tmp_path / "b.npz", X=X, y=np.array([3, 3, 5, 5, 7, 7]), annotator_labels=np.array([[4, -1]] * 6))
    with pytest.raises(InvalidInput, match="annotator_labels outside the classes 3, 5, 7: 4"):
        load_source(str(tmp_path / "b.npz"))
