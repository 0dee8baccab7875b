"""Alias history: every alias move, checked against and recorded in the ledger.

MLflow aliases are mutable pointers with no history. Every alias move the pipeline makes
is first checked against, then recorded in, the hash-chained ledger (``alias.move``:
model, alias, version, previous version, actor, approver, reason). Replaying those
entries gives the alias state the pipeline expects; an alias that MLflow shows but the
ledger does not explain was moved behind the pipeline's back, and promotion, loading,
lineage verification and the inventory all report it (exit 4). Each move also writes the
ledger head it produced into MLflow (tag ``mlsec.ledger_anchor.<seq>`` on the version's run),
so a ledger rewritten after the move disagrees with MLflow.
"""

from __future__ import annotations

from typing import Any

from stages.core import events
from stages.core.errors import IntegrityError, InvalidInput
from stages.core.workspace import Workspace
from stages.models.store import client, mlflow_aliases
from stages.trust.ledger import Ledger

ANCHOR_TAG = "mlsec.ledger_anchor"  # + ".<seq>": the hash of the ledger entry that recorded an alias move


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


def assert_alias_recorded(ws: Workspace, name: str, alias: str) -> str:
    """The version ``name@alias`` points to, when the ledger recorded that move; else ``IntegrityError``."""
    expected, _ = ledger_aliases(ws, name)
    actual = mlflow_aliases(ws, name)
    if expected.get(alias) != actual.get(alias):
        recorded = f"records version {expected[alias]}" if alias in expected else "never set it"
        raise IntegrityError(f"alias {name}@{alias} points to version {actual.get(alias)} in MLflow but the ledger "
                             f"{recorded}: it was moved outside the pipeline; refusing it")
    if actual.get(alias) is None:
        raise InvalidInput(f"model {name!r} has no alias {alias!r}")
    return actual[alias]


def move_alias(ws: Workspace, name: str, alias: str, version: str | None, *, reason: str, approver: str | None = None,
               run_id: str | None = None, approvals: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Move (or with version None, delete) an alias and record it; undone if recording fails.

    ``approvals``: the signed approvals that allowed the move (identity, key id, digest)."""
    c = client(ws)
    previous = mlflow_aliases(ws, name).get(alias)
    if version is None:
        c.delete_registered_model_alias(name, alias)
    else:
        c.set_registered_model_alias(name, alias, str(version))
    try:
        payload = {"model": name, "alias": alias, "version": version, "previous": previous, "approver": approver,
                   "reason": reason}
        if approvals is not None:
            payload["approvals"] = approvals
        entry = Ledger(ws.ledger_path).append("alias.move", payload, run_id=run_id)
    except BaseException:
        if previous is None:
            c.delete_registered_model_alias(name, alias)
        else:
            c.set_registered_model_alias(name, alias, previous)
        raise
    if version is not None:
        c.set_model_version_tag(name, str(version), f"mlsec.alias.{alias}.set_by", entry["actor"])
    anchored = version if version is not None else previous
    if anchored is not None:
        run_id_of_version = c.get_model_version(name, str(anchored)).run_id
        c.set_tag(run_id_of_version, f"{ANCHOR_TAG}.{entry['seq']}", entry["hash"])
    events.emit(events.ALIAS_MOVED, {"model": name, "alias": alias, "version": None if version is None else str(version),
                                     "previous": previous, "actor": entry["actor"], "approver": approver, "reason": reason,
                                     "run_id": run_id})
    return entry
