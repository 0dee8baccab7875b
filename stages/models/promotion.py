"""Promotion and rollback of ``champion``: only verified, gated versions; approver and reason in
the ledger; one promotion per model at a time; the champion's data becomes the drift reference."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from filelock import FileLock, Timeout

from stages.core.errors import GateRejected, InvalidInput, PipelineError
from stages.core.workspace import Workspace, actor, write_json
from stages.models.aliases import assert_no_drift, ledger_aliases, move_alias
from stages.models.store import (
    CHAMPION,
    client,
    mlflow_aliases,
    parse_ref,
    resolve,
    version_metrics,
)
from stages.models.verify import verify_registered_version
from stages.trust.ledger import Ledger
from stages.trust.signing import sign_document


def champion_summary(ws: Workspace, name: str) -> dict[str, Any] | None:
    """The current champion's version and metrics (for the no-regression check)."""
    from mlflow.exceptions import (
        MlflowException,  # MLflow: slow to import, kept off the command line's start
    )

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


def refuse(ws: Workspace, event: str, err: PipelineError, **payload: Any) -> PipelineError:
    Ledger(ws.ledger_path).append(event, {**payload, "refused": type(err).__name__, "message": str(err)})
    return err


def promote(ws: Workspace, ref: str, *, approver: str, reason: str, four_eyes: bool | None = None) -> dict[str, Any]:
    """Make a gated version the champion, with an approver and a reason in the ledger."""
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

    write_json(ws.reference_dir / f"{name}.json",
               sign_document({"project": name, "data_sha256": evidence["verdict"]["data_sha256"], "statistics": stats}))


def rollback(ws: Workspace, name: str, *, reason: str) -> dict[str, Any]:
    """Point ``champion`` back at the version it held before the current one."""
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
