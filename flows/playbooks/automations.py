"""The incident playbooks as Prefect deployments served by this process, each started by an
automation on its alert's event (``stages.core.events``):

* ``mlsec.monitor.attack-suspected`` -> ``evasion-response`` (review queue, no retraining:
  retraining after an attack is a person's decision: label the queue with ``mlsec review label``,
  then ``mlsec review retrain QUEUE``);
* ``mlsec.monitor.degraded`` -> ``degradation-response`` (rollback, then the drift-or-attack report);
* ``poisoning-response`` is served without a trigger (it needs the suspects) and is started by
  hand, from the UI or with ``mlsec playbook poisoning-response``.

Drift's ``mlsec.retrain.requested`` is the orchestration's retraining automation's to answer.
``mlsec playbook serve --model NAME`` runs this until interrupted; the automations need a
Prefect server (``PREFECT_API_URL``).
"""

from __future__ import annotations

from typing import Any

from flows.playbooks.incidents import degradation_response, evasion_response, poisoning_response
from stages.core import events
from stages.core.errors import InvalidInput


def playbook_deployments(model: str) -> list[Any]:
    from prefect.events import DeploymentEventTrigger  # Prefect: only serving the playbooks needs it

    match = {"prefect.resource.id": f"{events.RESOURCE_PREFIX}{model}"}
    return [
        evasion_response.to_deployment(
            name=f"{model}-evasion-response", parameters={"model": model, "reason": "started by hand"},
            triggers=[DeploymentEventTrigger(name=f"mlsec-evasion-response-{model}", expect={events.MONITOR_ATTACK},
                                             match=match, parameters={"model": model, "since_hours": 24.0,
                                                                      "reason": "alert {{ event.event }}: "
                                                                                "{{ event.payload.detector }} detector"})]),
        degradation_response.to_deployment(
            name=f"{model}-degradation-response", parameters={"model": model, "reason": "started by hand"},
            triggers=[DeploymentEventTrigger(name=f"mlsec-degradation-response-{model}", expect={events.MONITOR_DEGRADED},
                                             match=match, parameters={"model": model, "since_hours": 1.0,
                                                                      "reason": "alert {{ event.event }}: "
                                                                                "{{ event.payload.statistic }}"})]),
        poisoning_response.to_deployment(name=f"{model}-poisoning-response",
                                         parameters={"model": model, "reason": "started by hand"}),
    ]


def serve_playbooks(model: str) -> None:
    import os

    from prefect import serve  # Prefect: only serving the playbooks needs it

    if not os.environ.get("PREFECT_API_URL"):
        raise InvalidInput("automations need a Prefect server: set PREFECT_API_URL (a temporary server cannot run them)")
    serve(*playbook_deployments(model))
