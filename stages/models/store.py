"""MLflow access in one place: the client on the workspace's tracking store, experiments,
model references (``NAME@ALIAS``, ``NAME/VERSION``) and the aliases MLflow holds."""

from __future__ import annotations

import logging
import os
import re

from stages.core.errors import InvalidInput
from stages.core.workspace import Workspace

CHAMPION, CHALLENGER = "champion", "challenger"
COMPLETE_TAG = "mlsec.registered"  # "pending" from the version's creation, "complete" once every tag is written

_REF = re.compile(r"^(?:models:/)?(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")


def client(ws: Workspace):
    """An MlflowClient on the workspace's tracking store (SQLite by default)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    import mlflow  # MLflow: slow to import, kept off the command line's start

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = ws.mlflow_uri
    # mlflow.set_*_uri also export MLFLOW_*_URI; keep the user's environment as it was, so a
    # later Workspace in the same process resolves its own store.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(ws: Workspace, name: str) -> str:
    c = client(ws)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if ws.mlflow_uri.startswith(("http://", "https://")):
        return c.create_experiment(name)  # the tracking server's own artifact store (S3, a served folder ...)
    ws.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    return c.create_experiment(name, artifact_location=ws.mlflow_artifacts.as_uri())


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``NAME@ALIAS`` or ``NAME/VERSION`` (optionally with ``models:/``) -> (name, alias, version)."""
    m = _REF.match(ref.strip())
    if not m:
        raise InvalidInput(f"model reference {ref!r} must look like NAME@ALIAS or NAME/VERSION")
    return m["name"], m["alias"], m["version"]


def resolve(ws: Workspace, ref: str):
    """The MLflow ModelVersion a reference names; InvalidInput when there is none."""
    from mlflow.exceptions import (
        MlflowException,  # MLflow: slow to import, kept off the command line's start
    )

    name, alias, version = parse_ref(ref)
    c = client(ws)
    try:
        if alias:
            return c.get_model_version_by_alias(name, alias)
        return c.get_model_version(name, version)
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise InvalidInput(f"model {name!r} has no {what}") from None


def mlflow_aliases(ws: Workspace, name: str) -> dict[str, str]:
    from mlflow.exceptions import (
        MlflowException,  # MLflow: slow to import, kept off the command line's start
    )

    try:
        model = client(ws).get_registered_model(name)
    except MlflowException:
        return {}
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def download_run_file(ws: Workspace, run_id: str, path: str) -> bytes:
    """The bytes of one artifact of an MLflow run (callers check them against a signed digest)."""
    import tempfile
    from pathlib import Path

    import mlflow  # MLflow: slow to import, kept off the command line's start

    client(ws)
    with tempfile.TemporaryDirectory(prefix="mlsec-artifact-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
        except Exception as err:  # noqa: BLE001 - MLflow raises many kinds
            raise InvalidInput(f"cannot fetch {path} of MLflow run {run_id}: {str(err).splitlines()[0]}") from None
        return Path(local).read_bytes()


def _versions(ws: Workspace, name: str) -> list:
    from mlflow.exceptions import (
        MlflowException,  # MLflow: slow to import, kept off the command line's start
    )

    try:
        return list(client(ws).search_model_versions(f"name = '{name}'"))
    except MlflowException:
        return []


def incomplete_versions(ws: Workspace, name: str) -> list[str]:
    """Versions of ``name`` whose registration never finished (a run killed or cancelled
    between creating the version, tagged "pending", and its last tag)."""
    return [str(mv.version) for mv in _versions(ws, name) if (mv.tags or {}).get(COMPLETE_TAG) == "pending"]


def drop_incomplete_versions(ws: Workspace, name: str) -> list[str]:
    """Delete half-registered versions of ``name`` (call it holding the model's lock)."""
    dropped = incomplete_versions(ws, name)
    for version in dropped:
        client(ws).delete_model_version(name, version)
    return dropped


def complete_version_with_weights(ws: Workspace, name: str, weights_sha256: str) -> str | None:
    """The completely registered version of ``name`` with these weights, if there is one."""
    for mv in sorted(_versions(ws, name), key=lambda mv: int(mv.version)):
        tags = mv.tags or {}
        if tags.get(COMPLETE_TAG) == "complete" and tags.get("mlsec.weights_sha256") == weights_sha256:
            return str(mv.version)
    return None
