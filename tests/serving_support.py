"""Helpers of the serving tests: a workspace with two promoted versions, and the service
running on a loopback port in this process (uvicorn in a thread), as ``mlsec serve`` runs it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tests.support import QUICK_RUN

QUICK = QUICK_RUN  # the short runs' settings (tests.support), also those of the playbooks' retraining


def build_two_versions(path: Path, *, first: dict) -> dict:
    """Version 2 on digits less 97 rows (a second dataset version), promoted through the
    pipeline in ``path``, a copy of the session's ``quick_champion`` whose version 1 is
    ``first``: version 2 is the champion and version 1 the previous one."""
    from flows.pipeline import secure_training
    from stages.data.io import load_source

    d = load_source("sklearn:digits")
    np.savez(path / "digits-1700.npz", X=d.X[:1700], y=d.y[:1700])
    second = secure_training(data=str(path / "digits-1700.npz"), overrides=QUICK + ["train.seed=2"], triggered_by="alice")
    assert first["status"] == second["status"] == "promoted", (first, second)
    return {"v1": first, "v2": second}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_service(ws: Path, overrides: list[str] | None = None) -> Iterator[tuple[str, object]]:
    """(base URL, PredictionService) of a service started as ``mlsec serve`` starts it."""
    import uvicorn

    from flows.serving.app import create_app
    from flows.serving.service import PredictionService
    from stages.core.params import load_params
    from stages.core.workspace import Workspace

    params = load_params(ws / "params.yaml", overrides or [])
    service = PredictionService(Workspace(ws), params)
    service.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service, manage=False), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        service.stop()


def add_client(ws: Path, name: str, *, admin: bool = False, budget: int | None = None, rate: str | None = None) -> str:
    from stages.monitoring.access import KeyStore

    return KeyStore(ws / "serving" / "api-keys.json").add(name, role="admin" if admin else "client", budget=budget,
                                                          rate=rate)


def cancer_frame():
    """Breast cancer with a categorical column (clinic) and text labels, as a user's CSV holds it."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer(as_frame=True)
    frame = d.data.copy()
    frame.insert(3, "clinic", np.random.default_rng(0).choice(["north", "south", "east"], size=len(frame)))
    frame["label"] = [str(d.target_names[t]) for t in d.target]
    return frame


@contextmanager
def table_service(root: Path, *, overrides: list[str], policy: list[str], settings: list[str]) -> Iterator[dict]:
    """One pipeline run on the cancer table (``overrides``; ``policy`` in the workspace's
    params.yaml), served by the real app on a loopback port with the serving ``settings``:
    ``{ws, url, service, keys (admin, alice, mallory), summary, rows (the raw feature columns)}``."""
    from flows.pipeline import secure_training
    from tests.support import inside, make_workspace

    frame = cancer_frame()
    csv = root / "cancer.csv"
    frame.to_csv(csv, index=False)
    ws = make_workspace(root / "ws", policy=policy)
    with inside(ws):
        summary = secure_training(data=str(csv), overrides=overrides, triggered_by="alice")
        assert summary["status"] == "promoted", summary
        keys = {"admin": add_client(ws, "admin", admin=True), "alice": add_client(ws, "alice"),
                "mallory": add_client(ws, "mallory")}
        with running_service(ws, settings) as (url, service):
            yield {"ws": ws, "url": url, "service": service, "keys": keys, "summary": summary,
                   "rows": frame.drop(columns=["label"])}
