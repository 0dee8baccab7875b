"""The command line as a user meets it: one-line errors, documented exit codes, and a
rejected input that changes nothing already stored."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

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


def _bad_data(ws: Path, case: str) -> tuple[list[str], str]:
    """Arguments and the expected error line for bad data as users bring it."""
    import pandas as pd

    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"a": rng.normal(10, 3, 40), "b": rng.normal(0, 1, 40), "label": ["no", "yes"] * 20})
    if case == "huge_label":
        y = np.arange(40) % 4
        y[5] = 10**12
        np.savez(ws / "huge.npz", X=rng.random((40, 8, 8)).astype(np.float32), y=y)
        return ["--data", str(ws / "huge.npz")], r"every class needs at least 2 rows, found 1000000000000 \(1 row\)"
    if case == "csv_no_label":
        frame.drop(columns=["label"]).to_csv(ws / "t.csv", index=False)
        return ["--data", str(ws / "t.csv")], "label column 'label' not found; columns are \\['a', 'b'\\]"
    if case == "csv_unknown_class":
        frame.loc[3, "label"] = "maybe"
        frame.to_csv(ws / "t.csv", index=False)
        return ["--data", str(ws / "t.csv"), "--set", "data.classes=['no', 'yes']"], "outside the declared classes 'no', 'yes': 'maybe' \\(1 row\\)"
    if case == "csv_text_in_numbers":
        frame = frame.astype({"b": object})
        frame.loc[6, "b"] = "n/a?"
        frame.to_csv(ws / "t.csv", index=False)
        return (["--data", str(ws / "t.csv"), "--set", "data.columns={a: numeric, b: numeric}"],
                "column 'b' is declared numeric but holds text in 1 row, e.g. 'n/a\\?' in row 6")
    if case == "csv_empty":
        (ws / "t.csv").write_text("")
        return ["--data", str(ws / "t.csv")], "t.csv is empty"
    if case == "mixed_image_sizes":
        ragged = np.empty(40, dtype=object)
        for i in range(40):
            ragged[i] = np.zeros((8, 8) if i % 2 else (9, 9), dtype=np.uint8)
        np.savez(ws / "ragged.npz", X=ragged, y=np.arange(40) % 2)
        return ["--data", str(ws / "ragged.npz")], "mixed image sizes are not accepted"
    if case == "rgb_declared_grayscale":
        np.savez(ws / "rgb.npz", X=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), y=np.arange(40) % 2)
        return (["--data", str(ws / "rgb.npz"), "--set", "data.image_shape=[8, 8]"],
                "X holds 3-channel \\(RGB\\) 8 x 8 images where data.image_shape \\[8, 8\\] declares 1-channel \\(grayscale\\)")
    raise AssertionError(case)


USER_DATA_CASES = ["huge_label", "csv_no_label", "csv_unknown_class", "csv_text_in_numbers", "csv_empty",
                   "mixed_image_sizes", "rgb_declared_grayscale"]


@pytest.mark.parametrize("case", ["missing", "not_npz", "length", "labels", "nan", "unknown_set", "wrong_type",
                                  *USER_DATA_CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(case, workspace, prefect_server, capsys):
    args = ["run", "--json"]
    expected = None
    if case in USER_DATA_CASES:
        extra, expected = _bad_data(workspace, case)
        args += extra
    elif case == "missing":
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
    if expected is not None:
        assert re.search(expected, lines[0]), lines[0]
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


def test_init_makes_an_empty_folder_a_workspace_that_runs(tmp_path):
    """A new user's first two commands in a folder of their own: ``mlsec run`` before
    ``mlsec init`` is one line pointing at it (exit 2); ``init`` writes the project's
    ``params.yaml``, and a second ``init`` leaves the user's edits alone."""
    from stages.core.workspace import DEFAULT_PARAMS

    ws = tmp_path / "mine"
    ws.mkdir()
    before = run_cli(["run", "--data", "nothing.csv"], cwd=ws)
    assert before.returncode == 2 and "Traceback" not in before.stderr
    assert len(before.stderr.strip().splitlines()) == 1 and "mlsec init" in before.stderr
    assert sorted(p.name for p in ws.iterdir()) == []

    first = run_cli(["--json", "init"], cwd=ws)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["params"] == "written"
    # the project's settings, but the description is the workspace's own: a model trained here is
    # not registered and carded as the digits reference pipeline
    written, default = yaml.safe_load((ws / "params.yaml").read_text()), yaml.safe_load(DEFAULT_PARAMS.read_text())
    assert {k: v for k, v in written.items() if k != "project"} == {k: v for k, v in default.items() if k != "project"}
    assert written["project"] == {**default["project"], "name": "mine", "purpose": "", "intended_use": "", "known_limits": []}
    assert (ws / ".git").is_dir() and (ws / ".dvc").is_dir()

    edited = (ws / "params.yaml").read_text().replace("name: mine", "name: plant-faults", 1)
    (ws / "params.yaml").write_text(edited)
    again = run_cli(["--json", "init"], cwd=ws)
    assert again.returncode == 0 and json.loads(again.stdout)["params"] == "present"
    assert (ws / "params.yaml").read_text() == edited
