"""Retries only where a server or the network failed; never a security check or a decision."""

from __future__ import annotations

import logging

import pytest

from stages.core.errors import GateRejected, IntegrityError, PipelineError


@pytest.mark.parametrize("error,attempts", [(ConnectionError("connection refused"), 3), (TimeoutError("read timed out"), 3),
                                            (IntegrityError("weights changed"), 1), (GateRejected("gate said no"), 1),
                                            (ValueError("a bug"), 1)])
def test_register_retries_io_errors_only(prefect_server, error, attempts):
    from prefect import flow, task

    from flows.pipeline import _io_error

    calls = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=_io_error)
    def flaky() -> None:
        calls.append(1)
        raise error

    @flow
    def run() -> None:
        flaky()

    with pytest.raises(type(error)):
        run()
    assert len(calls) == attempts


def test_dvc_push_is_tried_again_then_reported(workspace, monkeypatch, caplog):
    import numpy as np

    from stages.trust import provenance

    monkeypatch.setattr(provenance, "PUSH_DELAYS_S", (0, 0))
    remote = workspace / ".dvc-remote"
    remote.rmdir()
    remote.write_text("not a folder")  # the remote store cannot be written
    folder = workspace / "data" / "prepared" / "x"
    folder.mkdir(parents=True)
    np.save(folder / "X.npy", np.zeros(3))
    with caplog.at_level(logging.WARNING, logger=provenance.__name__), pytest.raises(PipelineError, match="DVC could not version"):
        provenance.dvc_add(workspace, folder, push=True)
    assert sum("trying again" in r.getMessage() for r in caplog.records) == 2
