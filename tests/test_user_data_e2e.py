"""Data as users bring it, end to end on the real services (Prefect, MLflow, DVC, Great
Expectations): scikit-learn's breast cancer written to CSV with named columns on their own
scales and text labels, and generated RGB images of a non-square size as uint8 channels-last
arrays. Each goes through ``mlsec run`` with the default settings for its kind of data, is
promoted, and is served raw by ``load_verified_model`` and the MLflow pyfunc."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.support import make_workspace, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cancer_run(tmp_path_factory, prefect_server):
    from sklearn.datasets import load_breast_cancer

    root = tmp_path_factory.mktemp("cancer")
    d = load_breast_cancer(as_frame=True)
    frame = d.data.copy()
    frame["label"] = [str(d.target_names[t]) for t in d.target]
    csv = root / "cancer.csv"
    frame.to_csv(csv, index=False)
    ws = make_workspace(root / "ws")
    proc = run_cli(["run", "--json", "--data", str(csv)], cwd=ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ws, json.loads(proc.stdout), frame


def _split(ws: Path, summary: dict) -> dict[str, np.ndarray]:
    with np.load(ws / "runs" / summary["run_id"] / "screen" / "split.npz") as split:
        return {k: split[k] for k in split.files}


def test_cancer_csv_is_promoted_with_its_column_names_everywhere(cancer_run):
    ws, s, frame = cancer_run
    assert s["status"] == "promoted"
    run = ws / "runs" / s["run_id"]
    manifest = json.loads((run / "manifest.json").read_text())["payload"]
    assert manifest["kind"] == "table" and manifest["classes"] == ["benign", "malignant"]
    assert [c["name"] for c in manifest["columns"]] == list(frame.columns[:-1])
    validation = json.loads((run / "validation.json").read_text())
    assert validation["success"] and validation["statistics"]["feature_names"][0] == "mean radius"
    docs = "".join(p.read_text(errors="replace") for p in (run / "data_docs").rglob("*.html"))
    assert "mean radius" in docs and "worst fractal dimension" in docs
    quarantine = json.loads(Path(s["quarantined"]["path"]).read_text())
    for row in quarantine["samples"]:
        assert row["label"] in ("benign", "malignant") and "mean radius" in row["values"]
    card = (run / "card" / "model_card.md").read_text()
    assert "`mean radius` (numeric)" in card and "`benign`, `malignant`" in card
    assert "scaled features" in card
    model_json = json.loads((run / "model" / "model.json").read_text())
    assert model_json["classes"] == ["benign", "malignant"] and model_json["mode"] == "standard"


def test_cancer_model_is_at_least_as_good_as_logistic_regression(cancer_run):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ws, s, frame = cancer_run
    split = _split(ws, s)
    X, y = frame.drop(columns=["label"]).to_numpy(), frame["label"].to_numpy()
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(X[split["train_idx"]], y[split["train_idx"]])
    baseline = lr.score(X[split["test_idx"]], y[split["test_idx"]])
    assert s["metrics"]["clean_accuracy_all_test"] >= baseline, (s["metrics"], baseline)
    assert s["gate"]["checks"]["robust_accuracy@0.02"]["passed"]


def test_cancer_model_takes_raw_rows(cancer_run, monkeypatch):
    import mlflow

    from stages.models.verify import load_verified_model

    ws, s, frame = cancer_run
    monkeypatch.setenv("MLSEC_ROOT", str(ws))
    test = _split(ws, s)["test_idx"]
    rows, labels = frame.drop(columns=["label"]).iloc[test], frame["label"].iloc[test].to_numpy()
    model = load_verified_model(s["model"]["uri"])
    classes = np.array(["benign", "malignant"])
    with torch.no_grad():
        from_frame = model(rows).argmax(1).numpy()
        from_tensor = model(torch.tensor(rows.to_numpy(), dtype=torch.float32)).argmax(1).numpy()
        from_dicts = model(rows.to_dict("records")).argmax(1).numpy()
    assert (from_frame == from_tensor).all() and (from_frame == from_dicts).all()
    assert abs((classes[from_frame] == labels).mean() - s["metrics"]["clean_accuracy_all_test"]) < 1e-9
    served = mlflow.pyfunc.load_model(s["model"]["uri"]).predict(rows)
    assert (np.asarray(served).argmax(1) == from_frame).all()


def test_changed_preprocessing_is_refused(cancer_run, monkeypatch):
    """An attacker who edits the stored scaling (to shift every prediction) is refused at load.
    Runs after the other cancer checks: it tampers with the shared artifact store in place."""
    import mlflow

    from stages.core.errors import IntegrityError
    from stages.models.verify import load_verified_model

    ws, s, _ = cancer_run
    monkeypatch.setenv("MLSEC_ROOT", str(ws))
    specs = [p for p in (ws / "mlartifacts").rglob("preprocessing.json") if p.parent.name == "weights"]
    assert specs
    for path in specs:
        spec = json.loads(path.read_text())
        spec["columns"][0]["high"] *= 10
        path.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    with pytest.raises(IntegrityError, match="signature"):
        load_verified_model(s["model"]["uri"])
    with pytest.raises(IntegrityError):
        mlflow.pyfunc.load_model(s["model"]["uri"])


def _rgb_images(n: int = 360, height: int = 12, width: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x H x W x 3: noise plus a bright patch whose colour and place give the class."""
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(3), n // 3)
    X = rng.integers(0, 70, size=(n, height, width, 3)).astype(np.int16)
    for cls in range(3):
        rows = np.flatnonzero(y == cls)
        top = cls * height // 3
        X[rows, top:top + height // 3, : width // 2, cls] += 170
    return np.clip(X, 0, 255).astype(np.uint8), y


def test_rgb_images_run_end_to_end(tmp_path, prefect_server, monkeypatch):
    import mlflow

    from stages.models.verify import load_verified_model

    X, y = _rgb_images()
    data = tmp_path / "rgb.npz"
    np.savez(data, X=X, y=y)
    ws = make_workspace(tmp_path / "ws")
    fast = ["--set", "train.epochs=12", "--set", "evaluate.pgd_steps=10", "--set", "evaluate.restarts=1"]
    proc = run_cli(["run", "--json", "--data", str(data), *fast], cwd=ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(proc.stdout)
    assert s["status"] == "promoted"
    run = ws / "runs" / s["run_id"]
    assert json.loads((run / "model" / "model.json").read_text())["input_shape"] == [3, 12, 16]
    screen = json.loads((run / "screen" / "screen.json").read_text())
    assert {"label_issues", "spectral", "stamps"} <= set(screen["findings"]["per_detector"])  # screening ran on RGB

    monkeypatch.setenv("MLSEC_ROOT", str(ws))
    test = _split(ws, s)["test_idx"]
    model = load_verified_model(s["model"]["uri"])
    with torch.no_grad():
        raw = model(torch.from_numpy(X[test])).argmax(1).numpy()  # uint8, channels-last, as the user has them
        scaled = model(torch.from_numpy(np.moveaxis(X[test], -1, 1).astype(np.float32) / 255)).argmax(1).numpy()
    assert (raw == scaled).all()
    assert abs((raw == y[test]).mean() - s["metrics"]["clean_accuracy_all_test"]) < 1e-9
    served = mlflow.pyfunc.load_model(s["model"]["uri"]).predict(X[test])
    assert (np.asarray(served).argmax(1) == raw).all()
