"""Every stage re-verifies its inputs: bytes changed between stages stop the run with an
integrity error that names the file and both digests, and the ledger records it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from stages import ingest, validate
from stages.trust.context import RunContext
from stages.core.errors import IntegrityError, SecurityError
from stages.core.params import load_params
from stages.runner import run_stage
from stages.core.workspace import Workspace


@pytest.fixture
def ingested(workspace):
    ws = Workspace(workspace)
    params = load_params(workspace / "params.yaml")
    ctx = RunContext(ws, "t1")
    result = run_stage("ingest", ingest.run, ctx, params)
    return ws, params, ctx, result


def test_manifest_names_every_file_and_is_signed(ingested):
    ws, params, ctx, result = ingested
    manifest = ctx.manifest()
    assert {e["path"] for e in manifest["files"]} == {"X.npy", "y.npy", "meta.json"}
    assert manifest["merkle_root"] == result["data_sha256"]
    assert manifest["dvc"]["md5"].endswith(".dir") and manifest["dvc"]["pushed"]
    assert manifest["params_sha256"] == params.digest()
    raw = json.loads(ctx.manifest_path.read_text())
    raw["payload"]["source"] = "elsewhere"
    ctx.manifest_path.write_text(json.dumps(raw))
    with pytest.raises(IntegrityError, match="bad signature"):
        ctx.manifest()


def _flip_byte(path, offset=-5):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    st = os.stat(path)
    path.chmod(0o644)
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # hide the edit from a naive mtime check


@pytest.mark.parametrize("paranoid", [False, True])
def test_changed_data_between_stages_is_caught_and_recorded(ingested, paranoid):
    ws, params, ctx, result = ingested
    ctx.paranoid = paranoid
    run_stage("validate", validate.run, ctx, params)  # warms the stat cache
    target = ws.root / result["prepared_dir"] / "X.npy"
    _flip_byte(target)
    with pytest.raises(IntegrityError, match="X.npy") as info:
        run_stage("validate", validate.run, ctx, params)
    assert "\n" not in str(info.value)
    last = [e for e in ctx.ledger.entries() if e["event"] == "integrity.violation"][-1]
    assert last["payload"]["file"].endswith("X.npy")
    assert last["payload"]["expected_sha256"] != last["payload"]["actual_sha256"]


def test_swapped_file_is_caught(ingested):
    ws, params, ctx, result = ingested
    folder = ws.root / result["prepared_dir"]
    y = np.load(folder / "y.npy")
    (folder / "y.npy").chmod(0o644)
    np.save(folder / "y.npy", np.roll(y, 1))
    with pytest.raises(IntegrityError, match="y.npy"):
        ctx.dataset(where="test")


def test_symlink_in_data_folder_is_refused(ingested, tmp_path):
    ws, params, ctx, result = ingested
    folder = ws.root / result["prepared_dir"]
    (tmp_path / "outside.npy").write_bytes(b"x")
    os.symlink(tmp_path / "outside.npy", folder / "extra.npy")
    with pytest.raises(SecurityError):
        ctx.dataset(where="test")


def test_recorded_outputs_are_reverified(ingested):
    ws, params, ctx, result = ingested
    run_stage("validate", validate.run, ctx, params)
    report = ctx.run_dir / "validation.json"
    body = json.loads(report.read_text())
    body["success"] = True
    body["summary"] = "forged"
    report.write_text(json.dumps(body))
    with pytest.raises(IntegrityError, match="validation.json"):
        ctx.inputs("validation", where="gate")


def test_reingesting_the_same_bytes_reuses_the_version(ingested):
    ws, params, ctx, result = ingested
    again = run_stage("ingest", ingest.run, RunContext(ws, "t2"), params)
    assert again["data_sha256"] == result["data_sha256"] and again["prepared_dir"] == result["prepared_dir"]


def test_tampered_stored_version_is_not_silently_reused(ingested):
    ws, params, ctx, result = ingested
    _flip_byte(ws.root / result["prepared_dir"] / "X.npy")
    with pytest.raises(IntegrityError):
        run_stage("ingest", ingest.run, RunContext(ws, "t3"), params)
