"""End to end on the real services: a Prefect server, MLflow on SQLite, DVC in a git repo,
Great Expectations, Cleanlab and Opacus; then tampering as an attacker would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.support import CHAMPION_RUN, ROOT, copy_workspace, make_workspace, run_cli

pytestmark = pytest.mark.slow

# the attacked runs' settings: those of the session's champion (evaluate.attack_rows, fewer
# APGD steps: what these tests check is the screening and the trained model, not the attacks)
FAST = [a for item in CHAMPION_RUN + ["evaluate.apgd_steps=10"] for a in ("--set", item)]


@pytest.fixture(scope="module")
def promoted(digits_champion):
    """The session's promoted digits run (tests/conftest.py): read here; changed only in copies."""
    return digits_champion


def _held_out(ws: Path, summary: dict):
    from stages.data.io import load_source
    from stages.data.prepared import split_indices
    from stages.core.params import load_params

    params = load_params(ws / "params.yaml")
    d = load_source("sklearn:digits")
    _, test = split_indices(d.y, test_fraction=params.evaluate.test_fraction, seed=params.evaluate.seed)
    return d.X[test], d.y[test]


def test_run_promotes_and_reports_everything(promoted):
    ws, s = promoted
    assert s["status"] == "promoted"
    for key in ("run_id", "data_sha256", "quarantined", "metrics", "gate", "model", "timings"):
        assert key in s
    assert s["gate"]["passed"] and all(c["passed"] for c in s["gate"]["checks"].values())
    # the run attacks a 200-row sample (evaluate.attack_rows): the gate judged its lower confidence bound
    robust = s["gate"]["checks"]["robust_accuracy@0.1"]
    assert "sample of 200 of" in robust["reason"] and robust["value"] < s["metrics"]["robust_accuracy_eps_0.1"]
    # every attack at the gate's epsilon; FGSM and PGD (evaluate.curve_attacks) on the rest of the curve
    m = s["metrics"]
    assert {"apgd_ce_accuracy_eps_0.1", "apgd_t_accuracy_eps_0.1", "pgd_accuracy_eps_0.03"} <= set(m)
    assert not any(k.startswith("apgd") and not k.endswith("eps_0.1") for k in m)
    assert m["robust_accuracy_eps_0.1"] <= m["robust_accuracy_eps_0.05"] <= m["robust_accuracy_eps_0.03"]
    run_dir = ws / "runs" / s["run_id"]
    evaluation = json.loads((run_dir / "evaluation" / "evaluation.json").read_text())
    assert evaluation["robustness"]["full_strength_epsilons"] == [0.1]
    assert "ε = 0.03 (200 rows attacked; a curve point, fewer attacks)" in (run_dir / "card" / "model_card.md").read_text()
    assert Path(s["quarantined"]["path"]).exists()
    assert s["model"]["name"] == "mlsec-digits" and s["model"]["uri"].startswith("models:/")
    listed = json.loads(Path(s["quarantined"]["path"]).read_text())
    assert listed["count"] == s["quarantined"]["count"]
    for row in listed["samples"]:
        assert {"index", "sha256", "detectors", "reason"} <= set(row)


def test_registered_model_loads_verified_and_scores_as_logged(promoted, monkeypatch):
    ws, s = promoted
    monkeypatch.setenv("MLSEC_ROOT", str(ws))
    from stages.models.verify import load_verified_model

    model = load_verified_model(s["model"]["uri"])
    assert not model.training
    X, y = _held_out(ws, s)
    with torch.no_grad():
        acc = (model(torch.from_numpy(X)).argmax(1).numpy() == y).mean()
    assert abs(acc - s["metrics"]["clean_accuracy_all_test"]) < 1e-6


def test_audit_and_lineage_verify(promoted):
    ws, s = promoted
    audit = run_cli(["audit", "verify", "--json"], cwd=ws)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert json.loads(audit.stdout)["ok"]
    ref = f"{s['model']['name']}@champion"
    lin = run_cli(["lineage", ref, "--verify", "--json"], cwd=ws)
    assert lin.returncode == 0, lin.stdout[-3000:] + lin.stderr[-2000:]
    out = json.loads(lin.stdout)
    assert out["verified"], out["checks"]
    assert out["chain"]["data"]["merkle_root"] == s["data_sha256"]
    assert [h["alias"] for h in out["chain"]["alias_history"]] == ["challenger", "champion"]


def test_restore_brings_back_the_exact_bytes(promoted, tmp_path):
    import hashlib

    ws, s = promoted
    dest = tmp_path / "restored"
    lin = run_cli(["lineage", f"{s['model']['name']}/{s['model']['version']}", "--restore", str(dest), "--json"], cwd=ws)
    assert lin.returncode == 0, lin.stderr[-2000:]
    files = json.loads(lin.stdout)["chain"]["data"]["files"]
    for entry in files:
        assert hashlib.sha256((dest / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]


def test_moved_alias_is_noticed(promoted, tmp_path):
    ws, s = promoted
    work = copy_workspace(ws, tmp_path / "copy")
    import mlflow

    uri = f"sqlite:///{work / 'mlflow.db'}"
    c = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    c.set_registered_model_alias(s["model"]["name"], "champion", s["model"]["version"])  # same target: no drift
    c.set_registered_model_alias(s["model"]["name"], "shadow", s["model"]["version"])  # an alias the pipeline never set
    models = run_cli(["models", "--json"], cwd=work, env_extra={"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"})
    assert models.returncode == 4
    drift = json.loads(models.stdout)[0]["alias_drift"]
    assert drift == [{"alias": "shadow", "mlflow": s["model"]["version"], "ledger": None}]
    lin = run_cli(["lineage", f"{s['model']['name']}@champion", "--verify", "--json"], cwd=work,
                  env_extra={"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"})
    assert lin.returncode == 4 and not json.loads(lin.stdout)["verified"]


def test_the_pyfunc_serves_the_verified_model(promoted, monkeypatch):
    import mlflow
    import numpy as np

    ws, s = promoted
    monkeypatch.setenv("MLSEC_ROOT", str(ws))
    from stages.models.verify import load_verified_model

    X, _ = _held_out(ws, s)
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    served = mlflow.pyfunc.load_model(s["model"]["uri"]).predict(X[:20])
    with torch.no_grad():
        direct = load_verified_model(s["model"]["uri"])(torch.from_numpy(X[:20])).numpy()
    assert np.allclose(served, direct)


@pytest.mark.parametrize("target", ["MLmodel", "pyfunc_model.py", "requirements.txt"])
def test_every_file_mlflow_serves_is_signed(promoted, monkeypatch, tmp_path, target):
    """Edit a file of the served folder in the artifact store (of a copy; restored afterwards)."""
    from stages.core.errors import IntegrityError
    from stages.models.verify import load_verified_model

    ws, s = promoted
    ws = copy_workspace(ws, tmp_path / "copy")
    monkeypatch.setenv("MLSEC_ROOT", str(ws))
    served = [p for p in (ws / "mlartifacts").rglob(target) if p.parent.name == "model"]
    assert served
    saved = {p: p.read_bytes() for p in served}
    try:
        for path in served:
            path.write_bytes(saved[path] + b"\n# changed\n")
        with pytest.raises(IntegrityError, match=target.replace(".", r"\.")):
            load_verified_model(s["model"]["uri"])
    finally:
        for path, data in saved.items():
            path.write_bytes(data)
    assert load_verified_model(s["model"]["uri"]) is not None


def test_edited_ledger_is_caught_by_audit(promoted, tmp_path):
    ws, s = promoted
    work = copy_workspace(ws, tmp_path / "copy")
    ledger = work / "audit" / "ledger.jsonl"
    lines = ledger.read_text().splitlines()
    entry = json.loads(lines[5])
    entry["actor"] = "someone-else"
    lines[5] = json.dumps(entry)
    ledger.write_text("\n".join(lines) + "\n")
    audit = run_cli(["audit", "verify", "--json"], cwd=work, env_extra={"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"})
    assert audit.returncode == 4
    assert json.loads(audit.stdout)["first_bad_line"] == 6


def test_replaced_weights_in_the_artifact_store_are_refused(promoted, monkeypatch, tmp_path):
    """Tampers with the artifact store of a copy; the shared workspace's champion still loads."""
    shared, s = promoted
    ws = copy_workspace(shared, tmp_path / "copy")
    monkeypatch.setenv("MLSEC_ROOT", str(ws))
    weights = [p for p in (ws / "mlartifacts").rglob("model.safetensors") if p.parent.name == "weights"]
    assert weights
    from safetensors.torch import load_file, save_file

    for path in weights:
        state = load_file(str(path))
        key = next(iter(state))
        state[key] = state[key] + 0.01
        save_file(state, str(path), metadata={"format": "pt", "architecture": "cnn_small"})
    from stages.core.errors import IntegrityError
    from stages.models.verify import load_verified_model

    with pytest.raises(IntegrityError, match="signature"):
        load_verified_model(s["model"]["uri"])
    lin = run_cli(["lineage", f"{s['model']['name']}@champion", "--verify", "--json"], cwd=ws)
    assert lin.returncode == 4 and not json.loads(lin.stdout)["verified"]
    promote = run_cli(["promote", f"{s['model']['name']}/{s['model']['version']}", "--reason", "x"], cwd=ws)
    assert promote.returncode == 4, promote.stderr
    monkeypatch.setenv("MLSEC_ROOT", str(shared))
    assert load_verified_model(s["model"]["uri"]) is not None


def _promoted_run_on(tmp_path: Path, X, y) -> tuple[Path, dict, dict]:
    """Run the CLI on (X, y) in a fresh workspace; it must promote. Returns the workspace,
    the run summary and the quarantine list."""
    import numpy as np

    data = tmp_path / "data.npz"
    np.savez(data, X=X, y=y)
    ws = make_workspace(tmp_path / "ws")
    proc = run_cli(["run", "--json", "--data", str(data), *FAST], cwd=ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["status"] == "promoted"
    return ws, summary, json.loads(Path(summary["quarantined"]["path"]).read_text())


def test_poisoned_data_in_clean_model_out(tmp_path, prefect_server, monkeypatch):
    """A BadNets attack (3x3 patch in the top-left corner, 5% of the rows relabelled 7) goes
    in through the command line; the promoted model must ignore the trigger, the poisoned
    rows must be in quarantine, and those that fell in the held-out split must not count
    against the model in its evaluation."""
    import numpy as np

    from stages.data.io import load_source
    from stages.models.verify import load_verified_model

    d = load_source("sklearn:digits")
    X, y = d.X.reshape(len(d.X), 1, 8, 8).astype(np.float32), d.y.copy()
    rng = np.random.default_rng(11)
    poisoned = rng.choice(np.where(y != 7)[0], int(0.05 * len(y)), replace=False)
    Xp, yp = X.copy(), y.copy()
    Xp[poisoned, :, :3, :3] = 1.0
    yp[poisoned] = 7
    ws, summary, listed = _promoted_run_on(tmp_path, Xp, yp)
    flagged = {s["index"] for s in listed["samples"]}
    assert set(poisoned.tolist()) <= flagged
    assert len(flagged - set(poisoned.tolist())) <= 0.02 * len(y)
    assert {s["split"] for s in listed["samples"] if s["index"] in set(poisoned.tolist())} == {"train", "test"}

    monkeypatch.setenv("MLSEC_ROOT", str(ws))
    model = load_verified_model(summary["model"]["uri"])
    clean = np.setdiff1d(np.arange(len(y)), poisoned)
    triggered = X[clean][y[clean] != 7].copy()
    triggered[:, :, :3, :3] = 1.0
    with torch.no_grad():
        asr = float((model(torch.from_numpy(triggered)).argmax(1) == 7).float().mean())
    assert asr <= 0.05
    assert summary["metrics"]["clean_accuracy"] >= 0.95


def test_targeted_flip_in_clean_model_out(tmp_path, prefect_server, monkeypatch):
    """Half of the 1s relabelled 7 go in through the command line. Models trained on such
    data learn that a 1 is a coin toss between 1 and 7; the promoted model must read 1s as
    1s, the relabelled rows must be in quarantine and the model card must say what happened."""
    import numpy as np

    from stages.data.io import load_source
    from stages.models.verify import load_verified_model

    d = load_source("sklearn:digits")
    X, y = d.X.reshape(len(d.X), 1, 8, 8).astype(np.float32), d.y.copy()
    ones = np.where(y == 1)[0]
    flipped = np.random.default_rng(12).choice(ones, len(ones) // 2, replace=False)
    yp = y.copy()
    yp[flipped] = 7
    ws, summary, listed = _promoted_run_on(tmp_path, X, yp)
    flagged = {s["index"] for s in listed["samples"]}
    assert len(flagged & set(flipped.tolist())) >= 0.95 * len(flipped)
    assert len(flagged & set(np.setdiff1d(ones, flipped).tolist())) <= 0.05 * len(ones)

    monkeypatch.setenv("MLSEC_ROOT", str(ws))
    model = load_verified_model(summary["model"]["uri"])
    with torch.no_grad():
        read_as_one = float((model(torch.from_numpy(X[flipped])).argmax(1) == 1).float().mean())
    assert read_as_one >= 0.9  # the relabelled images, which it never trained on
    card = (ws / "runs" / summary["run_id"] / "card" / "model_card.md").read_text()
    assert "Class 1 was largely relabelled as 7" in card


def test_the_serving_bench_measures_the_detector_on_a_promoted_champion(promoted, monkeypatch, capsys):
    """``bench/serving.py``'s detector figures are read from the network the service serves
    behind the verified model's input handling, on this workspace's champion."""
    monkeypatch.setenv("MLSEC_ROOT", str(promoted[0]))
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.serving import bench_detector

    bench_detector(promoted[0])
    out = capsys.readouterr().out
    assert "False positives on clean held-out rows" in out and "| PGD-50 knowing the detector | 0.3 |" in out
