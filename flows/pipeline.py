"""The ``secure-training`` Prefect flow: one task per stage, nothing else.

ingest -> validate -> screen -> train -> evaluate -> gate -> register (-> promote)

The logic lives in ``stages``; each task is one call through ``stages.runner.run_stage``
(ledger entries, timing). The flow returns one summary dict, the ``--json`` output.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from stages.core.telemetry import telemetry_off

telemetry_off()  # before Prefect reads its settings at import

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.states import State  # noqa: E402
from prefect.flow_runs import pause_flow_run  # noqa: E402
from prefect.input import RunInput  # noqa: E402

from flows.caching import CACHED_STAGES, key_parts, replay_ledger, stage_outputs  # noqa: E402
from flows.concurrency import model_lock  # noqa: E402
from flows.fanout import FANNED_OUT, PROGRESSED, Progress, make_runner, mapper_for_run, run_mapper, running  # noqa: E402
from flows.server import TEMPORARY_ENV  # noqa: E402
from stages import evaluate, gate, ingest, register, screen, train, validate  # noqa: E402
from stages.core import events  # noqa: E402
from stages.core.errors import GateRejected, PipelineError  # noqa: E402
from stages.core.params import Params, load_params  # noqa: E402
from stages.core.workspace import Workspace, actor, new_run_id  # noqa: E402
from stages.models.promotion import champion_summary, promote, requirement  # noqa: E402
from stages.runner import run_stage  # noqa: E402
from stages.trust import stagecache  # noqa: E402
from stages.trust.context import RunContext  # noqa: E402
from stages.trust.signing import verify_document  # noqa: E402

STAGES = ("ingest", "validate", "screen", "train", "evaluate", "gate", "register")


def _io_error(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    """Retry only when a server or the network failed: never a security check or a decision."""
    try:
        state.result()
    except PipelineError:
        return False
    except (ConnectionError, TimeoutError, OSError):
        return True
    except Exception as err:  # noqa: BLE001 - MLflow wraps transport errors in MlflowException
        text = str(err)
        return type(err).__name__ == "MlflowException" and any(
            s in text for s in ("Max retries exceeded", "Connection", "TEMPORARILY_UNAVAILABLE", "503", "502", "504"))
    return False


def _stage_task(name: str, core):
    @task(name=name, retries=0, cache_policy=NO_CACHE)
    def _run(ctx: RunContext, params: Params, **kwargs: Any) -> dict[str, Any]:
        if name in FANNED_OUT:
            kwargs["mapper"] = run_mapper(ctx.run_id, name)  # not a task parameter: its workers are no data
        if name in PROGRESSED:
            kwargs["progress"] = Progress(name)  # epochs with the time left: run log, terminal, UI artifact
        if name in CACHED_STAGES and params.orchestration.cache and not ctx.paranoid:
            return _cached_stage(name, core, ctx, params, **kwargs)
        result = run_stage(name, core, ctx, params, **kwargs)
        get_run_logger().info("stage %s finished in %.2f s", name, result["seconds"])
        return result

    _run.__doc__ = f"Run the {name} stage core."
    return _run


def _cached_stage(name: str, core, ctx: RunContext, params: Params, **kwargs: Any):
    """Run a cacheable stage, or reuse its result from an earlier run with the same key
    (``stages.trust.stagecache``); a reuse ends the task in Prefect's "Cached" state."""
    from prefect.states import Completed

    key, material = stagecache.cache_key(ctx, name, **dict(zip(("settings", "inputs"), key_parts(ctx, params, name))))
    hit = stagecache.lookup(ctx, name, key)
    logger = get_run_logger()
    if hit is None:
        result = run_stage(name, core, ctx, params, **kwargs)
        stagecache.store(ctx, name, key, material, result={k: v for k, v in result.items() if k != "seconds"},
                         outputs=stage_outputs(ctx, name))
        logger.info("stage %s finished in %.2f s", name, result["seconds"])
        return result
    if name == "screen":  # the findings are reused; the stage still verifies, writes and decides
        kwargs["findings"] = stagecache.reused_json(hit, "screen_report")["findings"]
        ctx.log("stage.cached", {"stage": name, "from_run": hit["run_id"], "key": hit["key"], "reused": "findings"})
        result = run_stage(name, core, ctx, params, **kwargs)
    else:
        def reuse(ctx: RunContext, params: Params, **_: Any) -> dict[str, Any]:
            stagecache.replay(ctx, name, hit)
            entry = replay_ledger(name, hit["result"], params)
            if entry:
                ctx.log(entry[0], {**entry[1], "cached_from": hit["run_id"]})
            return dict(hit["result"])
        result = run_stage(name, reuse, ctx, params)
    stagecache.store(ctx, name, key, material, result={k: v for k, v in result.items() if k != "seconds"},
                     outputs=stage_outputs(ctx, name))
    result = {**result, "cached_from": hit["run_id"]}
    logger.info("stage %s reused from run %s (same verified inputs and settings) in %.2f s", name, hit["run_id"],
                result["seconds"])
    return Completed(data=result, name="Cached", message=f"reused from run {hit['run_id']}")


ingest_task = _stage_task("ingest", ingest.run)
validate_task = _stage_task("validate", validate.run)
screen_task = _stage_task("screen", screen.run)
train_task = _stage_task("train", train.run)
evaluate_task = _stage_task("evaluate", evaluate.run)
gate_task = _stage_task("gate", gate.run)
register_task = _stage_task("register", register.run).with_options(retry_condition_fn=_io_error)


@task(name="champion", retries=2, retry_delay_seconds=[1, 3])
def champion_task(ws: Workspace, name: str) -> dict[str, Any] | None:
    """The current champion's metrics, for the no-regression check."""
    return champion_summary(ws, name)


@task(name="promote")
def promote_task(ws: Workspace, params: Params, version: str, *, reason: str, approvals: list[dict[str, Any]] | None = None,
                 auto: bool = False) -> dict[str, Any]:
    """Move the champion alias to the new version: automatically where the signed policy lets
    it, else with signed approvals (ledger entry with approvals and reason)."""
    return promote(ws, f"{params.project.name}/{version}", reason=reason, approvals=approvals or [], auto=auto)


class Approval(RunInput):
    """What an approver gives a paused run: signed approvals (``mlsec approve ... --out FILE``
    prints one), never a bare name. Declining needs no signature; it promotes nothing."""

    approve: bool
    reason: str
    approvals: list[dict[str, Any]] = []


def _wait_for_approval(params: Params, summary: dict[str, Any]) -> dict[str, Any] | None:
    """Pause the flow run for signed approvals when a real Prefect server is configured."""
    if not os.environ.get("PREFECT_API_URL") or os.environ.get(TEMPORARY_ENV):
        return None  # a temporary server has no UI and no approver

    logger = get_run_logger()
    logger.info("waiting for approval of %s (evidence: verdict and model card in MLflow run %s)",
                summary["model"]["uri"], summary["mlflow_run_id"])
    try:
        answer = pause_flow_run(wait_for_input=Approval, timeout=params.promotion.approval_timeout_s)
    except Exception as err:  # noqa: BLE001 - FlowPauseTimeout and friends: no decision, stays challenger
        logger.warning("no approval within %s s (%s): the model stays challenger; promote it with 'mlsec promote'",
                       params.promotion.approval_timeout_s, type(err).__name__)
        return None
    return answer.model_dump()


@flow(name="secure-training", log_prints=False, validate_parameters=True)
def secure_training(run_id: str | None = None, params_path: str = "params.yaml", overrides: list[str] | None = None,
                    data: str | None = None, paranoid: bool = False, triggered_by: str | None = None) -> dict[str, Any]:
    """Run the secured pipeline once; return the run summary (raises on rejection or failure)."""
    summary: dict[str, Any] = {"run_id": run_id or new_run_id(), "status": "failed"}
    stack = contextlib.ExitStack()
    try:
        with stack:
            return _pipeline(summary, params_path, overrides, data, paranoid, triggered_by, stack)
    except PipelineError as err:
        if isinstance(err, GateRejected):
            summary["status"] = "rejected"
        summary["error"] = str(err)
        err.summary = summary  # the command line prints it with --json
        raise
    except BaseException as err:
        summary["error"] = f"{type(err).__name__}: {err}"[:500]
        raise
    finally:
        _emit_finished(summary, params_path, overrides)


def _emit_finished(summary: dict[str, Any], params_path: str, overrides: list[str] | None) -> None:
    try:
        name = _load(params_path, overrides).project.name
    except PipelineError:
        return  # settings never loaded: no model to name
    payload = {"model": name, "run_id": summary["run_id"], "status": summary["status"],
               "data_sha256": summary.get("data_sha256"), "version": (summary.get("model") or {}).get("version")}
    if summary.get("error"):
        payload["error"] = str(summary["error"])[:500]
    if summary.get("cached"):
        payload["cached"] = sorted(summary["cached"])
    events.emit(events.RUN_FINISHED, payload)


def _pipeline(summary: dict[str, Any], params_path: str, overrides: list[str] | None, data: str | None, paranoid: bool,
              triggered_by: str | None, stack: contextlib.ExitStack) -> dict[str, Any]:
    ws = Workspace.from_env()
    params = _load(params_path, overrides)
    ctx = RunContext(ws, summary["run_id"], paranoid=paranoid)
    summary["flow_run_id"] = str(flow_run.id) if flow_run.id else None  # where to look in the Prefect UI
    who = triggered_by or actor()
    ctx.log("run.start", {"params_sha256": params.digest(), "overrides": overrides or [], "data": data or params.data.source,
                          "triggered_by": who})
    timings: dict[str, float] = {}
    started = time.perf_counter()

    runner = make_runner(params.orchestration)
    if runner is not None:
        runner = stack.enter_context(running(runner))  # one pool of workers for the run's fan-out

    stack.enter_context(mapper_for_run(ctx.run_id, runner))

    def step(task_fn, name: str, **kwargs: Any) -> dict[str, Any]:
        result = task_fn(ctx, params, **kwargs)
        if isinstance(result, State):  # a reused stage ends in the "Cached" state, which carries its result
            result = result.result()
        timings[name] = result["seconds"]
        if result.get("cached_from"):
            summary.setdefault("cached", {})[name] = result["cached_from"]
        return result

    ing = step(ingest_task, "ingest", source=data)
    summary["data_sha256"] = ing["data_sha256"]
    events.emit(events.DATA_INGESTED, {"model": params.project.name, "run_id": ctx.run_id, "source": ing["source"],
                                       "data_sha256": ing["data_sha256"], "rows": ing["n"], "dvc_md5": ing["dvc_md5"]})
    step(validate_task, "validate")
    scr = step(screen_task, "screen")
    summary["quarantined"] = {"count": scr["flagged"], "fraction": scr["flagged_fraction"], "path": scr["quarantine_path"]}
    step(train_task, "train")
    ev = step(evaluate_task, "evaluate")
    summary["metrics"] = ev["metrics"]
    # from the champion read to the alias moves: one run of this model at a time
    lock = contextlib.ExitStack()
    stack.callback(lock.close)  # released at the end of the run at the latest
    lock.enter_context(model_lock(ws, params.project.name, timeout_s=params.orchestration.model_lock_timeout_s,
                                  logger=get_run_logger()))
    champion = champion_task(ws, params.project.name)
    g = step(gate_task, "gate", champion=champion, triggered_by=who)
    summary["gate"] = {"passed": g["passed"], "checks": {c["name"]: {k: c[k] for k in ("value", "threshold", "passed", "reason")}
                                                          for c in g["checks"]}}
    io_retries = params.orchestration.io_retries
    reg = step(register_task.with_options(retries=io_retries, retry_delay_seconds=[2, 5, 15, 30][:io_retries] or 0),
               "register", triggered_by=who, timings=timings)
    summary["mlflow_run_id"] = reg["mlflow_run_id"]
    summary["model"] = reg["model"]
    summary["timings"] = {**timings, "total": round(time.perf_counter() - started, 3)}
    summary.setdefault("cached", {})
    if not g["passed"]:
        summary["status"] = "rejected"
        ctx.log("run.finish", {"status": "rejected"})
        raise GateRejected(gate.rejection_message(_verdict(ctx)))
    verdict = _verdict(ctx)
    summary["policy"] = {k: verdict["policy"][k] for k in ("signed_sha256", "overridden", "weakened", "summary")}
    needed, why_not_auto = requirement(ws, verdict)
    if champion and str(champion.get("version")) == reg["model"]["version"]:
        # a rerun that reproduced the champion's weights: it stays champion; under a weakened
        # policy the run does not claim a promotion it could not have had
        summary["status"] = "promoted" if why_not_auto is None else "unchanged"
    elif why_not_auto is None:
        promote_task(ws, params, reg["model"]["version"], reason=f"gate passed in run {ctx.run_id}", auto=True)
        summary["status"] = "promoted"
    else:
        summary["approval"] = {"needed": needed, "why": why_not_auto}
        ctx.log("promotion.awaiting", {"version": reg["model"]["version"], "needed": needed, "why": why_not_auto})
        lock.close()  # approvers may take hours; promotion has its own lock
        answer = _wait_for_approval(params, summary)
        if answer is None:
            summary["status"] = "awaiting_approval"
        elif answer["approve"]:
            promote_task(ws, params, reg["model"]["version"], reason=answer["reason"], approvals=answer["approvals"])
            summary["status"] = "promoted"
        else:
            ctx.log("promotion.declined", {"reason": answer["reason"], "signed": False})
            summary["status"] = "declined"
    ctx.log("run.finish", {"status": summary["status"], "model": summary["model"]})
    get_run_logger().info("run %s %s in %.1f s (%s)", ctx.run_id, summary["status"], summary["timings"]["total"],
                          ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return summary


def _load(params_path: str, overrides: list[str] | None) -> Params:
    root = Workspace.from_env().root
    return load_params(root / params_path if not os.path.isabs(params_path) else params_path, overrides or [])


def _verdict(ctx: RunContext) -> dict[str, Any]:
    return verify_document(ctx.read_input_json("verdict", where="flow"))


__all__ = ["secure_training", "STAGES"]
