"""The command line as a user meets it: one-line errors, documented exit codes, and a
rejected input that changes nothing already stored."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from tests.support import run_cli


def _snapshot(ws: Path) -> dict[str, str]:
    out = {}
    for base in ("data", "mlartifacts"):
        for p in sorted((ws / base).rglob("*")) if (ws / base).exists() else []:
            if p.is_file():
                out[str(p.relative_to(ws))] = hashlib.sha256(p.read_bytes()).hexdigest()
    db = ws / "mlflow.db"
    out["mlflow.db"] = hashlib.sha256(db.read_bytes()).hexdigest() if db.exists() else "absent"
    return out


def _bad_npz(path: Path, kind: str) -> Path:
    rng = np.random.default_rng(0)
    X, y = rng.random((40, 8, 8)).astype(np.float32), np.arange(40) % 4
    if kind == "length":
        y = y[:-3]
    elif kind == "labels":
        y = y.astype(np.float32) + 0.5
    elif kind == "nan":
        X[3, 2, 2] = np.nan
    np.savez(path, X=X, y=y)
    return path


@pytest.mark.parametrize("case", ["missing", "not_npz", "length", "labels", "nan", "unknown_set", "wrong_type"])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(case, workspace, prefect_server, capsys):
    args = ["run", "--json"]
    if case == "missing":
        args += ["--data", str(workspace / "nope.npz")]
    elif case == "not_npz":
        (workspace / "x.npz").write_text("not an archive")
        args += ["--data", str(workspace / "x.npz")]
    elif case in ("length", "labels", "nan"):
        args += ["--data", str(_bad_npz(workspace / f"{case}.npz", case))]
    elif case == "unknown_set":
        args += ["--set", "train.epochz=3"]
    elif case == "wrong_type":
        args += ["--set", "train.epochs=many"]
    before = _snapshot(workspace)
    proc = run_cli(args, cwd=workspace)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("mlsec:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["exit_code"] == 2
    assert _snapshot(workspace) == before


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_promote_unknown_version_is_refused_and_recorded(workspace, capsys):
    code = main(["promote", "mlsec-digits/99", "--reason", "test"])
    err = capsys.readouterr().err
    assert code == 2 and "no version 99" in err
    from stages.trust.ledger import Ledger

    events = [e["event"] for e in Ledger(workspace / "audit" / "ledger.jsonl").entries()]
    assert events[-1] == "promotion.refused"


def test_rollback_without_champion_is_refused(workspace, capsys):
    code = main(["rollback", "mlsec-digits", "--reason", "test"])
    assert code == 2 and "no champion" in capsys.readouterr().err
