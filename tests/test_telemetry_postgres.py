"""The telemetry store on a real PostgreSQL server (a throwaway cluster on loopback; .ci/run
installs Debian's postgresql), when ``serving.telemetry.url`` names one."""

from __future__ import annotations

import time

import pytest

from stages.monitoring.store import TelemetryStore
from tests.servers import postgres_bin, postgres_cluster
from tests.test_monitoring import _row


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries not installed (.ci/run installs Debian's postgresql)")
    with postgres_cluster(tmp_path_factory.mktemp("pg")) as (user, port):
        yield f"postgresql+psycopg://{user}@127.0.0.1:{port}/postgres"


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
