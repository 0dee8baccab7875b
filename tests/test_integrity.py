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


def _violations(ctx):
    return [e for e in ctx.ledger.entries() if e["event"] == "integrity.violation"]


def test_a_manifest_from_another_run_is_refused_and_recorded(ingested):
    """Swap in the (validly signed) manifest of an earlier run: it names that run, not this one."""
    ws, params, ctx, result = ingested
    other = RunContext(ws, "earlier")
    run_stage("ingest", ingest.run, other, params)
    ctx.manifest_path.write_bytes(other.manifest_path.read_bytes())
    with pytest.raises(IntegrityError, match="belongs to run 'earlier', not to run 't1'"):
        run_stage("validate", validate.run, ctx, params)
    assert _violations(ctx)[-1]["payload"]["file"] == "runs/t1/manifest.json"


def test_an_artifact_index_from_another_run_is_refused(ingested):
    ws, params, ctx, result = ingested
    run_stage("validate", validate.run, ctx, params)
    other = RunContext(ws, "earlier")
    run_stage("ingest", ingest.run, other, params)
    run_stage("validate", validate.run, other, params)
    ctx.artifacts_path.write_bytes(other.artifacts_path.read_bytes())
    with pytest.raises(IntegrityError, match="belongs to run 'earlier'"):
        ctx.inputs("validation", where="gate")


def test_bytes_are_parsed_as_they_were_checked(ingested, monkeypatch):
    """A file swapped right after its check is never read: the stage parses the checked bytes."""
    from stages.data.prepared import parse_prepared
    from stages.trust import context

    ws, params, ctx, result = ingested
    folder = ws.root / result["prepared_dir"]
    real = context.read_file
    original = np.load(folder / "y.npy")

    def swap_after_check(path, **kw):
        out = real(path, **kw)
        if str(path).endswith("y.npy"):
            (folder / "y.npy").chmod(0o644)
            np.save(folder / "y.npy", np.roll(original, 1))  # the swap lands after the digest was taken
        return out

    monkeypatch.setattr(context, "read_file", swap_after_check)
    files, _ = ctx.dataset_bytes(where="test")
    _, y, _, _ = parse_prepared(files)
    assert np.array_equal(y, original) and not np.array_equal(np.load(folder / "y.npy"), original)
    monkeypatch.setattr(context, "read_file", real)
    with pytest.raises(IntegrityError, match="y.npy"):
        ctx.dataset_bytes(where="test")


def test_an_extra_file_in_the_data_folder_is_refused(ingested):
    ws, params, ctx, result = ingested
    folder = ws.root / result["prepared_dir"]
    folder.chmod(0o755)
    (folder / "extra.npy").write_bytes(b"x")
    with pytest.raises(IntegrityError, match="extra.npy"):
        ctx.dataset_bytes(where="test")


def test_a_middle_entry_rewritten_stops_the_next_run(ingested):
    ws, params, ctx, result = ingested
    path = ws.ledger_path
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["payload"]["stage"] = "forged"
    lines[1] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(IntegrityError, match="line 2"):
        ingest.run(RunContext(ws, "t9"), params)


def test_manifest_code_state_is_clean_in_a_clean_checkout(workspace):
    """Ingest's own 'dvc add' must not make the recorded code state dirty."""
    import subprocess

    subprocess.run(["git", "-C", str(workspace), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(workspace), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
                   check=True)
    ws, params = Workspace(workspace), load_params(workspace / "params.yaml")
    ctx = RunContext(ws, "g1")
    run_stage("ingest", ingest.run, ctx, params)
    assert ctx.manifest()["git"]["dirty"] is False
    subprocess.run(["git", "-C", str(workspace), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(workspace), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data"],
                   check=True)
    run_stage("ingest", ingest.run, RunContext(ws, "g2"), params)  # same bytes: dvc add again
    assert RunContext(ws, "g2").manifest()["git"]["dirty"] is False
    (workspace / "code.py").write_text("print('changed')\n")
    run_stage("ingest", ingest.run, RunContext(ws, "g3"), params)
    state = RunContext(ws, "g3").manifest()["git"]
    assert state["dirty"] is True and state["dirty_files"] == ["code.py"]


QUICK_SCREEN = ["screen.detectors=[label_issues]", "screen.folds=2"]


def _screened(ws, ctx):
    from stages import screen

    params = load_params(ws.root / "params.yaml", QUICK_SCREEN)
    run_stage("validate", validate.run, ctx, params)
    run_stage("screen", screen.run, ctx, params)
    return params


def test_a_planted_finished_checkpoint_stops_train_with_exit_4(ingested, capsys):
    """Where 'dvc repro' looks (a fixed run id): a torch file at the last epoch is refused."""
    import torch

    from stages import train

    ws, _, ctx, _ = ingested
    params = _screened(ws, ctx)
    folder = ctx.run_dir / "checkpoints"
    folder.mkdir()
    torch.save({"format": 1, "epoch": params.train.epochs, "model": {}, "history": []}, folder / "last.pt")
    code = train.main(["--run-id", ctx.run_id, *[a for q in QUICK_SCREEN for a in ("--set", q)]])
    err = capsys.readouterr().err
    assert code == 4 and "checkpoint" in err and len(err.strip().splitlines()) == 1
    last = _violations(ctx)[-1]["payload"]
    assert last["file"] == f"runs/{ctx.run_id}/checkpoints/last.pt" and last["stage"] == "train"
    assert not (ctx.run_dir / "model").exists() and (folder / "last.pt").exists()


def test_train_refuses_rows_the_screen_did_not_accept(ingested):
    """A split that puts quarantined rows back (re-recorded, so its digest matches the index)
    no longer matches the screen's accepted_sha256."""
    from stages import train
    from stages.data.prepared import load_npz_bytes

    ws, _, ctx, _ = ingested
    params = _screened(ws, ctx)
    split = load_npz_bytes(ctx.input_bytes("split", where="test")["split"])
    split["accepted_idx"] = np.concatenate([split["accepted_idx"], split["test_idx"][:5]])
    split["accepted_labels"] = np.concatenate([split["accepted_labels"], np.zeros(5, dtype=np.int64)])
    path = ctx.run_dir / "screen" / "split.npz"
    np.savez(path, **split)
    ctx.record_outputs("screen", {"split": path})
    with pytest.raises(IntegrityError, match="accepted_sha256"):
        run_stage("train", train.run, ctx, params)
    assert _violations(ctx)[-1]["payload"]["stage"] == "train"
