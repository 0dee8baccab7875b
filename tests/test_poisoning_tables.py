"""``poisoning-response`` on a champion trained on a text-labelled table with a categorical
column: the retrained champion keeps the class names and the named columns, without the
suspect rows."""

from __future__ import annotations

import json

import pytest

from tests.serving_support import cancer_frame
from tests.support import QUICK_POLICY, QUICK_RUN, make_workspace, run_cli

QUICK = [*QUICK_RUN, "evaluate.membership_inference=false"]
POLICY = [*QUICK_POLICY, "gate.max_mia_auc=null"]
SET = [arg for o in QUICK for arg in ("--set", o)]
MODEL = "mlsec-digits"   # the project name of the default params.yaml


def _champion_run(ws) -> tuple[str, dict, list]:
    """(run id, model.json, prepared rows and labels) of the current champion."""
    from stages.core.workspace import Workspace
    from stages.data.prepared import parse_prepared
    from stages.models.store import resolve
    from stages.trust.context import RunContext

    run_id = resolve(Workspace(ws), f"{MODEL}@champion").tags["mlsec.run_id"]
    files, _ = RunContext(Workspace(ws), run_id).dataset_bytes(where="test")
    X, y, _, _ = parse_prepared(files)
    return run_id, json.loads((ws / "runs" / run_id / "model" / "model.json").read_text()), [X, y]


@pytest.mark.slow
def test_poisoning_response_keeps_the_class_names_and_columns(tmp_path, prefect_server):
    from stages.data.prepared import row_digest as sample_digest

    frame = cancer_frame()
    csv = tmp_path / "cancer.csv"
    frame.to_csv(csv, index=False)
    ws = make_workspace(tmp_path / "ws", policy=POLICY)
    first = run_cli(["run", "--json", "--data", str(csv), *SET], cwd=ws)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id, model_json, (X, y) = _champion_run(ws)
    assert model_json["classes"] == ["benign", "malignant"]
    spec = json.loads((ws / "runs" / run_id / "model" / "preprocessing.json").read_text())
    suspects = [sample_digest(X, int(y[i]), i) for i in (3, 10, 200)]
    (tmp_path / "suspects.txt").write_text("\n".join(suspects) + "\n")

    proc = run_cli(["playbook", "poisoning-response", "--model", MODEL, "--reason", "tip-off",
                    "--digests", str(tmp_path / "suspects.txt"), "--json", *SET], cwd=ws, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["clean_data"]["removed"] == 3 and out["retrain"]["status"] == "promoted", out
    quarantine = next((ws / out["quarantine"]["path"]).glob("*.json"))
    samples = json.loads(quarantine.read_text())["payload"]["samples"]
    assert {s["label"] for s in samples} <= {"benign", "malignant"} and len(samples) == 3
    new_run, new_json, (X2, y2) = _champion_run(ws)
    assert new_run == out["retrain"]["run_id"] != run_id
    assert new_json["classes"] == model_json["classes"]                     # names, not 0 and 1
    new_spec = json.loads((ws / "runs" / new_run / "model" / "preprocessing.json").read_text())
    assert [(c["name"], c["type"]) for c in new_spec["columns"]] == [(c["name"], c["type"]) for c in spec["columns"]]
    assert new_spec["features"] == spec["features"]                         # clinic=east, clinic=north, clinic=south
    # the rewritten source reads back as the same rows: every kept row (values, category codes,
    # label) is in the new data byte for byte, and no suspect is
    kept = {sample_digest(X, int(y[i]), i) for i in range(len(y))} - set(suspects)
    assert {sample_digest(X2, int(y2[i]), i) for i in range(len(y2))} == kept and len(y2) == len(y) - 3
