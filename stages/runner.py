"""One way to run a stage, shared by the Prefect tasks and ``python -m stages.<name>``
(the ``dvc repro`` path): ledger entries at start and finish, errors mapped to exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

from stages.core.errors import PipelineError
from stages.core.params import Params, load_params
from stages.core.telemetry import telemetry_off
from stages.core.workspace import Workspace
from stages.trust.context import RunContext


def run_stage(name: str, fn: Callable[..., dict[str, Any]], ctx: RunContext, params: Params, **kwargs: Any) -> dict[str, Any]:
    """Run one stage core with its ledger entries; re-raise its error after recording it."""
    ctx.log("stage.start", {"stage": name})
    started = time.perf_counter()
    try:
        result = fn(ctx, params, **kwargs)
    except PipelineError as err:
        ctx.log("stage.fail", {"stage": name, "error": type(err).__name__, "message": str(err),
                               "seconds": round(time.perf_counter() - started, 3)})
        raise
    except Exception as err:
        ctx.log("stage.fail", {"stage": name, "error": type(err).__name__, "message": str(err)[:500],
                               "seconds": round(time.perf_counter() - started, 3)})
        raise
    seconds = round(time.perf_counter() - started, 3)
    result = {**result, "seconds": seconds}
    ctx.log("stage.finish", {"stage": name, "seconds": seconds})
    return result


def stage_main(name: str, fn: Callable[..., dict[str, Any]], argv: list[str] | None = None, *, source_arg: bool = False) -> int:
    """``python -m stages.<name>``: the same core the Prefect task calls, for ``dvc repro``."""
    telemetry_off()
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    parser.add_argument("--run-id", default=os.environ.get("MLSEC_RUN_ID", "dvc"))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--paranoid", action="store_true")
    if source_arg:
        parser.add_argument("--data", default=None)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
        ctx = RunContext(Workspace.from_env(), args.run_id, paranoid=args.paranoid)
        kwargs = {"source": args.data} if source_arg else {}
        result = run_stage(name, fn, ctx, params, **kwargs)
    except PipelineError as err:
        print(f"mlsec {name}: {err}", file=sys.stderr)
        return err.exit_code
    print(json.dumps(result, sort_keys=True, default=str))
    return 0
