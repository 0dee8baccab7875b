"""The telemetry store on a real PostgreSQL server (a throwaway cluster on loopback; .ci/run
installs Debian's postgresql), when ``serving.telemetry.url`` names one."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from stages.monitoring.store import TelemetryStore
from tests.test_monitoring import _row


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="module")
def postgres():
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries not installed (.ci/run installs Debian's postgresql)")
    base = Path(tempfile.mkdtemp(prefix="mlsec-pg-"))   # outside pytest's root-only folder
    data = base / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:                       # PostgreSQL refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
        os.chmod(base, 0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"], check=True,
                   capture_output=True, timeout=120)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-w", "-l", str(data.parent / "log"), "-o",
                    f"-h 127.0.0.1 -p {port} -k {data.parent}", "start"], check=True, capture_output=True, timeout=120)
    try:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        yield url
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_store_writes_reads_and_prunes_in_postgresql(postgres):
    store = TelemetryStore(postgres, queue_max=1000, retention_s=3600).start()
    try:
        store.submit("predictions", [_row(i) for i in range(20)] + [_row(99, t=time.time() - 7200)])
        store.submit("flagged_inputs", [{"input_sha256": "a" * 64, "time": time.time(), "client": "eve", "model_version": "1",
                                         "prediction": 3, "detector_score": 2.0, "shape": "[64]", "data": b"\0" * 256}] * 2)
        assert store.flush()
        assert store.rows_since(time.time() - 60) == 20 and store.usage_since(0)["alice"] >= 20
        assert len(store.flagged_inputs()) == 1                        # the same input flagged twice is kept once
        store.prune()
        assert store.rows_since(0) == 20
        assert store.summary(since=0)["rows"] == 20
    finally:
        store.close()
