"""``mlsec deploy``: register the project's deployments on a Prefect work pool, and the
automations that start a run when the data changes or a monitor asks for retraining.

The deployments are those of ``prefect.yaml`` (the workspace's own copy when it has one,
else the project's): ``secure-training`` (the pipeline, exactly as ``mlsec run`` runs it)
and ``data-watch`` (hashes the source, emits ``mlsec.data.changed`` when its bytes
changed). Their parameters are ``params.yaml``'s, with ``--set`` overrides and ``--data``,
checked here so that a bad setting fails now and not at three in the morning. The
workspace is the working directory of every run (``MLSEC_ROOT``), and a worker on the pool
(``prefect worker start --pool NAME``) runs them. Registering again replaces what was there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from flows.server import check_services, scheduling_api
from stages.core import events
from stages.core.errors import InvalidInput
from stages.core.params import load_params
from stages.core.workspace import Workspace

PIPELINE, WATCH = "secure-training", "data-watch"
FLOW_OF = {PIPELINE: "secure-training", WATCH: "data-watch"}  # deployment -> flow name
ENV_PASSED = ("MLFLOW_TRACKING_URI", "MLSEC_KEY_DIR", "MLSEC_ACTOR")  # carried into runs when set at deploy time
CODE_ROOT = Path(__file__).resolve().parents[1]


def project_file(ws: Workspace) -> Path:
    own = ws.root / "prefect.yaml"
    return own if own.is_file() else CODE_ROOT / "prefect.yaml"


def read_deployments(path: Path) -> dict[str, dict[str, Any]]:
    """The deployments ``prefect.yaml`` defines, by name; InvalidInput when it is malformed."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise InvalidInput(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    items = (doc or {}).get("deployments") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise InvalidInput(f"{path} has no 'deployments' list")
    out = {}
    for item in items:
        if not isinstance(item, dict) or not item.get("name") or not item.get("entrypoint"):
            raise InvalidInput(f"{path}: every deployment needs a name and an entrypoint, got {item!r}")
        out[item["name"]] = item
    missing = sorted(set(FLOW_OF) - set(out))
    if missing:
        raise InvalidInput(f"{path} lacks the deployment(s) {missing}")
    return out


def deployment_parameters(name: str, *, overrides: list[str], data: str | None) -> dict[str, Any]:
    if name == PIPELINE:
        return {"params_path": "params.yaml", "overrides": list(overrides), "data": data, "paranoid": False}
    return {"data": data, "overrides": list(overrides)}


def _flow_object(name: str):
    if name == PIPELINE:
        from flows.pipeline import secure_training  # Prefect: slow to import, only when deploying

        return secure_training
    from flows.watch import data_watch  # Prefect: slow to import, only when deploying

    return data_watch


def ensure_pool(client, pool: str, *, create: bool, api: str) -> dict[str, Any]:
    from prefect.client.schemas.actions import WorkPoolCreate  # Prefect: slow to import
    from prefect.exceptions import ObjectNotFound  # Prefect: slow to import

    try:
        wp = client.read_work_pool(pool)
        return {"name": wp.name, "type": wp.type, "created": False}
    except ObjectNotFound:
        if not create:
            raise InvalidInput(f"work pool {pool!r} does not exist on {api}: create it with "
                               f"'prefect work-pool create {pool} --type process' (or pass --create-pool)") from None
    wp = client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    return {"name": wp.name, "type": wp.type, "created": True}


def _jinja_json(template: str) -> dict[str, Any]:
    """A RunDeployment parameter rendered from the triggering event (typed through JSON)."""
    return {"__prefect_kind": "json", "value": {"__prefect_kind": "jinja", "template": template}}


def automation_specs(model: str, deployment_id, base: dict[str, Any]) -> list[dict[str, Any]]:
    """The two automations on this model's events: data changed, and retraining requested."""
    return [
        {"name": f"mlsec-retrain-on-data-change:{model}", "event": events.DATA_CHANGED,
         "parameters": {**base, "data": _jinja_json("{{ event.payload.source | tojson }}"),
                        "triggered_by": f"automation:{events.DATA_CHANGED}"}},
        {"name": f"mlsec-retrain-on-alert:{model}", "event": events.RETRAIN_REQUESTED,
         "parameters": {**base, "data": _jinja_json("{{ (event.payload.data or None) | tojson }}"),
                        "triggered_by": f"automation:{events.RETRAIN_REQUESTED}"}},
    ]


def _apply_automations(client, model: str, deployment_id, base: dict[str, Any]) -> list[str]:
    from prefect.events.actions import RunDeployment  # Prefect: slow to import
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture  # Prefect: slow to import

    names = []
    for spec in automation_specs(model, deployment_id, base):
        for old in client.read_automations_by_name(spec["name"]):
            client.delete_automation(old.id)
        trigger = EventTrigger(expect={spec["event"]}, match={"prefect.resource.id": f"{events.RESOURCE_PREFIX}{model}"},
                               posture=Posture.Reactive, threshold=1)
        action = RunDeployment(source="selected", deployment_id=deployment_id, parameters=spec["parameters"])
        client.create_automation(AutomationCore(name=spec["name"], description=f"start secure-training on {spec['event']}",
                                                trigger=trigger, actions=[action], tags=["mlsec"]))
        names.append(spec["name"])
    return names


CRASH_DETECTOR = "mlsec-crashed-run-detector"
FINAL = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed")


def _apply_crash_detector(client, deployment_ids: list[str], heartbeat_s: int) -> str:
    """Mark a deployed run crashed when its heartbeats stop (its worker or machine died):
    three missed beats and no final state. The run's registration lock lease runs out too."""
    import datetime as dt

    from prefect.client.schemas.objects import StateType  # Prefect: slow to import
    from prefect.events.actions import ChangeFlowRunState  # Prefect: slow to import
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture  # Prefect: slow to import

    for old in client.read_automations_by_name(CRASH_DETECTOR):
        client.delete_automation(old.id)
    trigger = EventTrigger(after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *FINAL},
                           match={"prefect.resource.id": ["prefect.flow-run.*"]},
                           match_related={"prefect.resource.role": "deployment",
                                          "prefect.resource.id": [f"prefect.deployment.{d}" for d in deployment_ids]},
                           for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                           within=dt.timedelta(seconds=3 * heartbeat_s))
    action = ChangeFlowRunState(state=StateType.CRASHED,
                                message=f"no heartbeat for {3 * heartbeat_s} s: the process running it died")
    client.create_automation(AutomationCore(name=CRASH_DETECTOR, description="mark runs whose heartbeats stopped as crashed",
                                            trigger=trigger, actions=[action], tags=["mlsec"]))
    return CRASH_DETECTOR


def deploy(ws: Workspace, *, pool: str | None, overrides: list[str], data: str | None, create_pool: bool) -> dict[str, Any]:
    """Register both deployments and the automations; return what was registered."""
    params = load_params(ws.params_path, overrides)  # a bad setting fails now, not at run time
    if data and data != "sklearn:digits" and not (ws.root / data).exists():
        raise InvalidInput(f"data source not found: {data}")
    api = scheduling_api()
    check_services(mlflow_uri=ws.mlflow_uri)  # the runs will need it: say so now
    specs = read_deployments(project_file(ws))
    from prefect.client.orchestration import get_client  # Prefect: slow to import
    from prefect.utilities.callables import parameter_schema  # Prefect: slow to import

    env = {"MLSEC_ROOT": str(ws.root), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(params.orchestration.heartbeat_s),
           **{k: os.environ[k] for k in ENV_PASSED if os.environ.get(k)}}
    result: dict[str, Any] = {"api": api, "deployments": {}, "automations": []}
    pool_name = pool or params.orchestration.work_pool
    with get_client(sync_client=True) as client:
        result["pool"] = ensure_pool(client, pool_name, create=create_pool, api=api)
        for name in FLOW_OF:
            spec = specs[name]
            flow_obj = _flow_object(name)
            flow_id = client.create_flow_from_name(FLOW_OF[name])
            parameters = {**(spec.get("parameters") or {}), **deployment_parameters(name, overrides=overrides, data=data)}
            dep_id = client.create_deployment(
                flow_id=flow_id, name=name, entrypoint=spec["entrypoint"], work_pool_name=pool_name,
                parameters=parameters, description=f"{spec.get('description', '')} Settings: params.yaml "
                f"(sha256 {params.digest()[:16]} at deploy time) in {ws.root}.",
                tags=list(spec.get("tags") or []), job_variables={"env": env},
                pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(ws.root)}}],
                parameter_openapi_schema=parameter_schema(flow_obj).model_dump_for_openapi(),
                enforce_parameter_schema=True)
            result["deployments"][name] = {"id": str(dep_id), "name": f"{FLOW_OF[name]}/{name}", "pool": pool_name,
                                           "parameters": parameters}
        base = result["deployments"][PIPELINE]["parameters"]
        result["automations"] = _apply_automations(client, params.project.name, result["deployments"][PIPELINE]["id"], base)
        result["automations"].append(_apply_crash_detector(client, [d["id"] for d in result["deployments"].values()],
                                                           params.orchestration.heartbeat_s))
        result["workers_online"] = workers_online(client, result["pool"]["name"])
    return result


def workers_online(client, pool: str) -> int:
    """Workers that polled ``pool`` recently."""
    try:
        return sum(1 for w in client.read_workers_for_work_pool(pool) if str(getattr(w, "status", "")).upper().endswith("ONLINE"))
    except Exception:  # noqa: BLE001 - a count for a hint, not a check
        return 0


def read_deployment(client, name: str, *, api: str):
    """The registered deployment ``name`` (secure-training or data-watch); InvalidInput when absent."""
    from prefect.exceptions import ObjectNotFound  # Prefect: slow to import

    if name not in FLOW_OF:
        raise InvalidInput(f"unknown deployment {name!r}; the project's deployments are {sorted(FLOW_OF)}")
    try:
        return client.read_deployment_by_name(f"{FLOW_OF[name]}/{name}")
    except ObjectNotFound:
        raise InvalidInput(f"deployment {FLOW_OF[name]}/{name} is not registered on {api}: run 'mlsec deploy' first") from None
