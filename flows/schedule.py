"""Scheduled and data-triggered retraining on a Prefect server (``mlsec schedule``).

Schedules live on the deployments ``mlsec deploy`` registers, on a persistent Prefect
server, and a worker on the work pool runs them:

* ``mlsec schedule create --cron EXPR | --interval SECONDS | --rrule RULE`` puts a
  schedule on ``secure-training``: a run at each tick.
* with ``--on-change`` the schedule goes on ``data-watch`` instead (``flows.watch``): at
  each tick it hashes the source and, only when its bytes changed, emits
  ``mlsec.data.changed``, on which an automation starts ``secure-training``. An unchanged
  source starts nothing.
* ``mlsec schedule list`` and ``mlsec schedule remove ID|--all``.
"""

from __future__ import annotations

from typing import Any

from flows.deploy import FLOW_OF, PIPELINE, WATCH, read_deployment, workers_online
from flows.server import scheduling_api
from stages.core.errors import InvalidInput
from stages.core.params import load_params
from stages.core.workspace import Workspace


def build_schedule(*, cron: str | None, interval: float | None, rrule: str | None, timezone: str | None):
    """A Prefect schedule object; InvalidInput (one line) for a malformed expression."""
    from prefect.client.schemas.schedules import (  # Prefect: slow to import
        CronSchedule,
        IntervalSchedule,
        RRuleSchedule,
    )
    from pydantic import ValidationError

    try:
        if cron is not None:
            return CronSchedule(cron=cron, timezone=timezone)
        if rrule is not None:
            return RRuleSchedule(rrule=rrule, timezone=timezone)
        if interval is None or not interval >= 1:
            raise InvalidInput(f"--interval must be at least 1 second, got {interval}")
        import datetime as dt

        return IntervalSchedule(interval=dt.timedelta(seconds=interval), timezone=timezone)
    except ValidationError as err:
        what = "cron expression" if cron is not None else "RRule" if rrule is not None else "interval"
        given = cron if cron is not None else rrule if rrule is not None else interval
        msg = err.errors()[0].get("msg", "invalid").removeprefix("Value error, ")
        raise InvalidInput(f"invalid {what} {given!r}: {msg.splitlines()[0]}") from None
    except (ValueError, TypeError) as err:
        raise InvalidInput(f"invalid schedule: {str(err).splitlines()[0]}") from None


def _describe(schedule) -> str:
    s = schedule.schedule
    if getattr(s, "cron", None):
        return f"cron '{s.cron}'" + (f" ({s.timezone})" if s.timezone else "")
    if getattr(s, "rrule", None):
        return f"rrule '{s.rrule}'"
    return f"every {s.interval.total_seconds():g} s"


def create_schedule(ws: Workspace, *, cron: str | None, interval: float | None, rrule: str | None, timezone: str | None,
                    on_change: bool, data: str | None, overrides: list[str]) -> dict[str, Any]:
    load_params(ws.params_path, overrides)  # a bad setting fails now
    if data and data != "sklearn:digits" and not (ws.root / data).exists():
        raise InvalidInput(f"data source not found: {data}")
    schedule = build_schedule(cron=cron, interval=interval, rrule=rrule, timezone=timezone)
    api = scheduling_api()
    from prefect.client.orchestration import get_client  # Prefect: slow to import
    from prefect.client.schemas.actions import DeploymentScheduleCreate  # Prefect: slow to import

    name = WATCH if on_change else PIPELINE
    parameters: dict[str, Any] = {}
    if data:
        parameters["data"] = data
    if overrides:
        parameters["overrides"] = list(overrides)
    if name == PIPELINE:
        parameters["triggered_by"] = "schedule"
    with get_client(sync_client=True) as client:
        dep = read_deployment(client, name, api=api)
        created = client.create_deployment_schedules(dep.id, [DeploymentScheduleCreate(schedule=schedule, active=True,
                                                                                       parameters=parameters)])
        online = workers_online(client, dep.work_pool_name)
    out = {"id": str(created[0].id), "deployment": f"{FLOW_OF[name]}/{name}", "schedule": _describe(created[0]),
           "parameters": parameters, "pool": dep.work_pool_name, "workers_online": online, "api": api}
    return out


def list_schedules(ws: Workspace) -> list[dict[str, Any]]:
    api = scheduling_api()
    from prefect.client.orchestration import get_client  # Prefect: slow to import

    rows = []
    with get_client(sync_client=True) as client:
        for name in FLOW_OF:
            try:
                dep = read_deployment(client, name, api=api)
            except InvalidInput:
                continue
            for s in client.read_deployment_schedules(dep.id):
                rows.append({"id": str(s.id), "deployment": f"{FLOW_OF[name]}/{name}", "schedule": _describe(s),
                             "active": s.active, "parameters": s.parameters})
    return rows


def remove_schedules(ws: Workspace, *, schedule_id: str | None, remove_all: bool) -> list[str]:
    if not remove_all and not schedule_id:
        raise InvalidInput("name the schedule to remove (its id from 'mlsec schedule list') or pass --all")
    rows = list_schedules(ws)
    targets = rows if remove_all else [r for r in rows if r["id"] == schedule_id]
    if not remove_all and not targets:
        raise InvalidInput(f"no schedule with id {schedule_id!r}; see 'mlsec schedule list'")
    from prefect.client.orchestration import get_client  # Prefect: slow to import

    with get_client(sync_client=True) as client:
        by_name = {f"{FLOW_OF[n]}/{n}": read_deployment(client, n, api=scheduling_api()) for n in FLOW_OF
                   if any(r["deployment"] == f"{FLOW_OF[n]}/{n}" for r in targets)}
        for r in targets:
            client.delete_deployment_schedule(by_name[r["deployment"]].id, r["id"])
    return [r["id"] for r in targets]
