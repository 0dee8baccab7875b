"""Helpers the tests share (kept out of conftest.py, which pytest imports on its own)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_workspace(path: Path, params_text: str | None = None) -> Path:
    from stages.trust.provenance import init_repo

    path.mkdir(parents=True, exist_ok=True)
    (path / "params.yaml").write_text(params_text if params_text is not None else (ROOT / "params.yaml").read_text())
    init_repo(path)
    return path


def run_cli(args: list[str], *, cwd: Path, env_extra: dict[str, str] | None = None, timeout: int = 600):
    """Run the installed ``mlsec`` command as a user would."""
    env = {**os.environ, "MLSEC_ROOT": str(cwd), **(env_extra or {})}
    exe = shutil.which("mlsec", path=str(Path(sys.executable).parent)) or "mlsec"
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
