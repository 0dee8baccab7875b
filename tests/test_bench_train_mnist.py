"""bench/train_mnist.py as a user runs it: bad input is one line and exit 2; a run writes its
table and JSON, a second run of the same command finds the work done, other settings are
refused rather than mixed into the same results."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "train_mnist.py"


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 240), ("t10k", 60)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 28, 28))
        for i, label in enumerate(labels):  # a learnable bright bar per class
            images[i, 2 * label:2 * label + 3, 4:24] = 250
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


def _bench(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout)


def test_missing_data_is_one_line_and_exit_2(tmp_path):
    proc = _bench("--quick", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "cannot read MNIST" in proc.stderr


def test_a_run_writes_results_and_the_same_command_resumes(tiny_mnist, tmp_path):
    out = tmp_path / "out"
    args = ["--quick", "--data", str(tiny_mnist), "--out", str(out), "--modes", "standard", "dp_eps3",
            "--attack-rows", "8"]
    proc = _bench(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = json.loads((out / "results.json").read_text())
    assert state["status"] == "complete" and state["config"]["n_train"] == 240
    std, dp = state["rows"]["standard"], state["rows"]["dp_eps3"]
    assert std["evaluation"]["pipeline"]["n"] == 8 and std["evaluation"]["autoattack"]["n"] == 8
    assert 0 <= std["evaluation"]["pipeline"]["worst_case"] <= std["evaluation"]["pipeline"]["pgd"]
    assert dp["training"]["privacy"]["epsilon_spent"] <= 3.0 and "pipeline" not in dp["evaluation"]
    table = (out / "results.md").read_text()
    assert "| standard (cnn_mnist) | 1 |" in table and "DP-SGD eps 3 (cnn_dp)" in table
    assert table.strip() in proc.stdout

    again = _bench(*args)
    assert again.returncode == 0 and "done in" not in again.stderr  # nothing left to do
    assert len(json.loads((out / "results.json").read_text())["invocations"]) == 2

    other = _bench(*args[:-1], "16")
    assert other.returncode == 2 and "holds results for other settings" in other.stderr

    more = _bench("--quick", "--data", str(tiny_mnist), "--out", str(out), "--modes", "standard_dp_net",
                  "--attack-rows", "8")
    assert more.returncode == 0, more.stderr[-2000:]
    state = json.loads((out / "results.json").read_text())
    assert state["config"]["modes"] == ["standard", "dp_eps3", "standard_dp_net"] and state["status"] == "complete"
    assert "| DP-SGD eps 3 (cnn_dp) | 1 |" in (out / "results.md").read_text()

    # the recipe of a row changed since it was measured (here: its recorded digest edited, as a
    # code change to bench_modes would leave it): refused, not skipped as done nor mixed in
    state["rows"]["standard"]["recipe_sha256"] = "0" * 64
    (out / "results.json").write_text(json.dumps(state))
    changed = _bench(*args)
    assert changed.returncode == 2 and "measured with another recipe" in changed.stderr
    assert changed.stderr.strip().splitlines() == [changed.stderr.strip()]


def test_an_interrupted_autoattack_goes_on_from_the_rows_it_saved(tiny_mnist, tmp_path):
    """AutoAttack is saved batch by batch: a run stopped inside it attacks only the rows left.
    Played by leaving a saved first part whose outcomes are the opposite of those measured, so
    the final per-row outcomes show whether that part was kept rather than attacked again."""
    out = tmp_path / "out"
    args = ["--quick", "--data", str(tiny_mnist), "--out", str(out), "--modes", "standard", "--attack-rows", "8"]
    assert _bench(*args).returncode == 0
    state = json.loads((out / "results.json").read_text())
    ev = state["rows"]["standard"]["evaluation"]
    measured = ev.pop("autoattack")["per_row_ok"]
    assert "autoattack_partial" not in ev and len(measured) == 8
    saved = [not ok for ok in measured[:4]]
    ev["autoattack_partial"] = {"per_row_ok": saved, "seconds": 1.0}
    state["rows"]["standard"]["done"] = False
    (out / "results.json").write_text(json.dumps(state))
    again = _bench(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "AutoAttack 8/8 rows" in again.stderr
    aa = json.loads((out / "results.json").read_text())["rows"]["standard"]["evaluation"]["autoattack"]
    assert aa["n"] == 8 and aa["per_row_ok"][:4] == saved and aa["seconds"] > 1.0
    assert aa["accuracy"] == sum(aa["per_row_ok"]) / 8
