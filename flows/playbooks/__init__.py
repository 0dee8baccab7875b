"""Incident playbooks (``mlsec playbook ...``; docs/playbooks.md).

``rollback`` and ``purge-retrain`` (``maintenance``); ``evasion-response``,
``degradation-response`` and ``poisoning-response`` as Prefect flows (``incidents``), each
startable by hand or by an automation on its alert (``automations``).
"""

from __future__ import annotations

from typing import Any

from flows.playbooks.data import champion_data, load_trigger, read_digests
from flows.playbooks.maintenance import purge_quarantined, run_maintenance
from flows.playbooks.review import labelled_rows
from stages.core.errors import InvalidInput
from stages.core.workspace import Workspace


def check_queue_retrain(ws: Workspace, *, queue: str, model: str, retrain: bool) -> None:
    """Refuse a retraining from a review queue before any flow run starts: ``InvalidInput``
    for a queue that is unknown, of another model or without labelled items, or without
    ``--retrain``; ``IntegrityError`` for a queue or label changed since it was signed;
    ``GateRejected`` when an item's final label is not by a reviewer of the signed policy."""
    if not retrain:
        raise InvalidInput("--queue retrains on a labelled review queue: add --retrain")
    labelled_rows(ws, queue, model=model, data=champion_data(ws, model), where="evasion-response")


PLAYBOOKS = ("rollback", "purge-retrain", "evasion-response", "degradation-response", "poisoning-response")


def run_playbook(ws: Workspace, playbook: str, *, model: str, reason: str, run_id: str | None = None,
                 retrain: bool = False, since_hours: float | None = None, digests: str | None = None,
                 trigger: str | None = None, overrides: list[str] | None = None, queue: str | None = None) -> dict[str, Any]:
    if queue is not None and playbook != "evasion-response":
        raise InvalidInput(f"--queue belongs to evasion-response, not {playbook}")
    if playbook in ("rollback", "purge-retrain"):
        return run_maintenance(ws, playbook, model=model, run_id=run_id, reason=reason, retrain=retrain)
    if not reason or not reason.strip():
        raise InvalidInput("a playbook needs --reason")
    if playbook == "poisoning-response":      # bad input is refused before a flow run starts
        if not digests and not trigger:
            raise InvalidInput("poisoning-response needs suspect digests (--digests FILE) or a trigger (--trigger FILE.npz)")
        if digests:
            read_digests(digests)
        if trigger:
            load_trigger(trigger)
    if queue is not None:
        check_queue_retrain(ws, queue=queue, model=model, retrain=retrain)
    from flows.playbooks import incidents  # Prefect: slow to import, only these playbooks need it

    if playbook == "evasion-response":
        return incidents.evasion_response(model=model, reason=reason, since_hours=since_hours or 24.0, retrain=retrain,
                                          overrides=overrides or [], queue=queue)
    if playbook == "degradation-response":
        return incidents.degradation_response(model=model, reason=reason, since_hours=since_hours or 1.0)
    if playbook == "poisoning-response":
        return incidents.poisoning_response(model=model, reason=reason, digests_file=digests, trigger_file=trigger,
                                            overrides=overrides or [])
    raise InvalidInput(f"unknown playbook {playbook!r}; known: {PLAYBOOKS}")


__all__ = ["PLAYBOOKS", "check_queue_retrain", "purge_quarantined", "run_playbook"]
