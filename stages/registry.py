"""MLflow registry access, alias history and promotion, in one place.

MLflow aliases are mutable pointers with no history. Every alias move the pipeline makes
is first checked against, then recorded in, the hash-chained ledger (``alias.move``:
model, alias, version, previous version, actor, approver, reason). Replaying those
entries gives the alias state the pipeline expects; an alias that MLflow shows but the
ledger does not explain was moved behind the pipeline's back, and promotion, lineage
verification and the inventory all report it (exit 4).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Any, Iterator

from filelock import FileLock, Timeout

from stages.errors import GateRejected, IntegrityError, InvalidInput, PipelineError
from stages.ledger import Ledger
from stages.workspace import Workspace, actor

CHAMPION, CHALLENGER = "champion", "challenger"
_REF = re.compile(r"^(?:models:/)?(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")


def client(ws: Workspace):
    """An MlflowClient on the workspace's tracking store (SQLite by default)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    import mlflow

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
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_ref(ref)
    c = client(ws)
    try:
        if alias:
            return c.get_model_version_by_alias(name, alias)
        return c.get_model_version(name, version)
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise InvalidInput(f"model {name!r} has no {what}") from None


def ledger_aliases(ws: Workspace, name: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Replay ``alias.move`` entries: (alias -> version the pipeline set, the history)."""
    state: dict[str, str] = {}
    history = []
    for entry in Ledger(ws.ledger_path).entries():
        if entry.get("event") != "alias.move" or entry["payload"].get("model") != name:
            continue
        p = entry["payload"]
        if p.get("version") is None:
            state.pop(p["alias"], None)
        else:
            state[p["alias"]] = str(p["version"])
        history.append({"seq": entry["seq"], "time": entry["time"], "actor": entry["actor"], **p})
    return state, history


def mlflow_aliases(ws: Workspace, name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        model = client(ws).get_registered_model(name)
    except MlflowException:
        return {}
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def alias_drift(ws: Workspace, name: str) -> list[dict[str, Any]]:
    """Aliases whose MLflow value differs from what the ledger says the pipeline set."""
    expected, _ = ledger_aliases(ws, name)
    actual = mlflow_aliases(ws, name)
    drift = []
    for alias in sorted(set(expected) | set(actual)):
        if expected.get(alias) != actual.get(alias):
            drift.append({"alias": alias, "mlflow": actual.get(alias), "ledger": expected.get(alias)})
    return drift


def assert_no_drift(ws: Workspace, name: str) -> None:
    drift = alias_drift(ws, name)
    if drift:
        d = drift[0]
        raise IntegrityError(f"alias {name}@{d['alias']} points to version {d['mlflow']} in MLflow but the ledger "
                             f"records {d['ledger']}: it was moved outside the pipeline")


def version_metrics(ws: Workspace, mv) -> dict[str, float]:
    run = client(ws).get_run(mv.run_id)
    return dict(run.data.metrics)


def champion_summary(ws: Workspace, name: str) -> dict[str, Any] | None:
    """The current champion's version and metrics (for the no-regression check)."""
    from mlflow.exceptions import MlflowException

    assert_no_drift(ws, name)
    try:
        mv = client(ws).get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return {"version": str(mv.version), "metrics": version_metrics(ws, mv)}


@contextmanager
def promotion_lock(ws: Workspace, name: str) -> Iterator[None]:
    ws.audit_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(ws.audit_dir / f"promotion-{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise PipelineError(f"another promotion or rollback of {name} is in progress; try again when it has finished") from None
    try:
        yield
    finally:
        lock.release()


def move_alias(ws: Workspace, name: str, alias: str, version: str | None, *, reason: str, approver: str | None = None,
               run_id: str | None = None) -> dict[str, Any]:
    """Move (or with version None, delete) an alias and record it; undone if recording fails."""
    c = client(ws)
    previous = mlflow_aliases(ws, name).get(alias)
    if version is None:
        c.delete_registered_model_alias(name, alias)
    else:
        c.set_registered_model_alias(name, alias, str(version))
    try:
        entry = Ledger(ws.ledger_path).append("alias.move", {"model": name, "alias": alias, "version": version, "previous": previous,
                                                             "approver": approver, "reason": reason}, run_id=run_id)
    except BaseException:
        if previous is None:
            c.delete_registered_model_alias(name, alias)
        else:
            c.set_registered_model_alias(name, alias, previous)
        raise
    if version is not None:
        c.set_model_version_tag(name, str(version), f"mlsec.alias.{alias}.set_by", entry["actor"])
    return entry


def refuse(ws: Workspace, event: str, err: PipelineError, **payload: Any) -> PipelineError:
    Ledger(ws.ledger_path).append(event, {**payload, "refused": type(err).__name__, "message": str(err)})
    return err


def promote(ws: Workspace, ref: str, *, approver: str, reason: str, four_eyes: bool | None = None) -> dict[str, Any]:
    """Make a gated version the champion, with an approver and a reason in the ledger."""
    from stages.register import verify_registered_version

    name, _, _ = parse_ref(ref)
    try:
        if not reason or not reason.strip():
            raise InvalidInput("a promotion needs --reason")
        if not approver or not approver.strip():
            raise InvalidInput("a promotion needs --approver")
        with promotion_lock(ws, name):
            mv = resolve(ws, ref)
            assert_no_drift(ws, name)
            evidence = verify_registered_version(ws, mv)
            if not evidence["verdict"]["passed"]:
                raise GateRejected(f"{name}/{mv.version} failed its gate ({', '.join(evidence['verdict']['failed'])}): it cannot be promoted")
            tags = dict(mv.tags or {})
            need_four_eyes = four_eyes if four_eyes is not None else tags.get("mlsec.four_eyes") == "true"
            trigger = tags.get("mlsec.triggered_by")
            if need_four_eyes and approver == trigger:
                raise GateRejected(f"four-eyes policy: approver {approver!r} triggered the run of {name}/{mv.version}; "
                                   "another person must approve")
            current = mlflow_aliases(ws, name).get(CHAMPION)
            if current == str(mv.version):
                raise InvalidInput(f"{name}/{mv.version} is already the champion")
            entry = move_alias(ws, name, CHAMPION, str(mv.version), reason=reason, approver=approver,
                               run_id=tags.get("mlsec.run_id"))
            _accept_reference(ws, name, evidence)
            return {"model": name, "version": str(mv.version), "alias": CHAMPION, "previous": current,
                    "approver": approver, "ledger_seq": entry["seq"]}
    except PipelineError as err:
        raise refuse(ws, "promotion.refused", err, model=name, ref=ref, approver=approver, reason=reason) from None


def _accept_reference(ws: Workspace, name: str, evidence: dict[str, Any]) -> None:
    """The champion's data becomes the drift reference for the next runs."""
    stats = evidence.get("validation", {}).get("statistics")
    if not stats:
        return
    from stages.keys import sign_document
    from stages.workspace import write_json

    write_json(ws.reference_dir / f"{name}.json",
               sign_document({"project": name, "data_sha256": evidence["verdict"]["data_sha256"], "statistics": stats}))


def rollback(ws: Workspace, name: str, *, reason: str) -> dict[str, Any]:
    """Point ``champion`` back at the version it held before the current one."""
    from stages.register import verify_registered_version

    try:
        if not reason or not reason.strip():
            raise InvalidInput("a rollback needs --reason")
        with promotion_lock(ws, name):
            assert_no_drift(ws, name)
            state, history = ledger_aliases(ws, name)
            current = state.get(CHAMPION)
            if current is None:
                raise InvalidInput(f"{name} has no champion to roll back")
            previous = None
            for move in reversed([h for h in history if h["alias"] == CHAMPION]):
                if move["version"] == current and move.get("previous") and move["previous"] != current:
                    previous = move["previous"]
                    break
            if previous is None:
                raise InvalidInput(f"{name}@champion (version {current}) has no previous champion to roll back to")
            mv = resolve(ws, f"{name}/{previous}")
            verify_registered_version(ws, mv)
            entry = move_alias(ws, name, CHAMPION, previous, reason=f"rollback: {reason}", approver=actor(),
                               run_id=(mv.tags or {}).get("mlsec.run_id"))
            return {"model": name, "alias": CHAMPION, "version": previous, "previous": current, "ledger_seq": entry["seq"]}
    except PipelineError as err:
        raise refuse(ws, "rollback.refused", err, model=name, reason=reason) from None


def inventory(ws: Workspace) -> list[dict[str, Any]]:
    """Every registered model with versions, aliases, owner, purpose, risk class, data sources
    and whether its aliases agree with the ledger."""
    c = client(ws)
    out = []
    for rm in c.search_registered_models():
        versions = c.search_model_versions(f"name='{rm.name}'")
        tags = dict(rm.tags or {})
        out.append({
            "name": rm.name,
            "owner": tags.get("mlsec.owner"), "purpose": tags.get("mlsec.purpose"), "risk_class": tags.get("mlsec.risk_class"),
            "aliases": {a: str(v) for a, v in (rm.aliases or {}).items()},
            "alias_drift": alias_drift(ws, rm.name),
            "versions": sorted(({"version": str(v.version), "run_id": (v.tags or {}).get("mlsec.run_id"),
                                 "verdict": (v.tags or {}).get("mlsec.verdict"), "data_sha256": (v.tags or {}).get("mlsec.data_sha256"),
                                 "data_source": (v.tags or {}).get("mlsec.data_source"),
                                 "robust_accuracy": (v.tags or {}).get("mlsec.robust_accuracy"),
                                 "dp_epsilon": (v.tags or {}).get("mlsec.dp_epsilon"),
                                 "created": v.creation_timestamp} for v in versions), key=lambda v: int(v["version"])),
        })
    return out
