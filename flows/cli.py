"""The ``mlsec`` command line.

Exit codes: 0 done (and promoted where asked), 2 bad input or usage, 3 gate rejected /
poisoning suspected / promotion refused, 4 integrity or security violation, 1 anything
else. Errors are one line on stderr; ``--debug`` shows the traceback. ``--json`` prints
one machine-readable object on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from typing import Any

from flows.server import configured_server
from stages.core import events
from stages.core.errors import InvalidInput, PipelineError
from stages.core.params import load_params
from stages.core.telemetry import telemetry_off
from stages.core.workspace import write_default_params
from stages.models.inventory import inventory
from stages.models.lineage import audit_verify, lineage, render_lineage
from stages.models.promotion import promote, rollback
from stages.trust.keys import rotate_keys
from stages.trust.ledger import Ledger
from stages.trust.provenance import init_repo
from flows import review_commands, serving_commands, trust_commands
from flows.cli_support import emit as _print, workspace as _ws
from flows.cli_support import quiet_expected_failures as _quiet_expected_failures
from flows.cli_support import services as _services
from flows.trust_commands import read_approvals

telemetry_off()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors: one line, exit 2
        print(f"mlsec: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)



def cmd_run(args: argparse.Namespace) -> int:
    ws = _ws()
    params_path = args.params if os.path.isabs(args.params) else str(ws.root / args.params)
    params = load_params(params_path, args.overrides)  # bad settings fail here, before any service starts
    if args.data and args.data != "sklearn:digits" and not os.path.exists(args.data):
        raise InvalidInput(f"data source not found: {args.data}")
    with _services(ws, params) as server:
        from flows.pipeline import (
            secure_training,  # Prefect: slow to import (while the temporary server starts); only the flow commands need it
        )

        server.ready()
        if not args.debug:
            _quiet_expected_failures()
        summary = secure_training(params_path=params_path, overrides=list(args.overrides), data=args.data,
                                  paranoid=args.paranoid, triggered_by=args.actor)

    def text(s: dict[str, Any]) -> str:
        m = s.get("metrics", {})
        model = s.get("model") or {}
        return (f"run {s['run_id']}: {s['status']}; clean accuracy {m.get('clean_accuracy', float('nan')):.4f}, "
                f"robust accuracy {m.get('robust_accuracy', float('nan')):.4f}; quarantined {s['quarantined']['count']}; "
                f"model {model.get('uri', '-')}; total {s['timings']['total']:.1f} s")

    _print(summary, args.json, text)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    report = audit_verify(_ws())
    _print(report, args.json, lambda r: ("ledger OK: " if r["ok"] else "LEDGER BROKEN: ") +
           (f"{r['entries']} entries, head seq {r['head']['seq'] if r['head'] else '-'}" if r["ok"] else
            f"line {r['first_bad_line']}: {r['reason']}"))
    return 0 if report["ok"] else 4


def cmd_lineage(args: argparse.Namespace) -> int:
    result = lineage(_ws(), args.ref, verify=args.verify, restore=args.restore)
    _print(result, args.json, render_lineage)
    return 4 if args.verify and not result["verified"] else 0


def cmd_promote(args: argparse.Namespace) -> int:
    result = promote(_ws(), args.ref, reason=args.reason, approvals=read_approvals(args.approvals))
    _print(result, args.json, lambda r: f"{r['model']}@champion -> version {r['version']} (was {r['previous']}), "
                                        f"approved by {', '.join(r['approvers'])}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    result = rollback(_ws(), args.model, reason=args.reason)
    _print(result, args.json, lambda r: f"{r['model']}@champion rolled back to version {r['version']} (was {r['previous']})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    models = inventory(_ws())

    def text(items: list[dict[str, Any]]) -> str:
        if not items:
            return "no registered models"
        lines = []
        for m in items:
            lines.append(f"{m['name']}  owner={m['owner']}  risk={m['risk_class']}  aliases={m['aliases']}  purpose={m['purpose']}")
            for d in m["alias_drift"]:
                lines.append(f"  ! alias {d['alias']} is version {d['mlflow']} in MLflow, the ledger says {d['ledger']}: moved outside the pipeline")
            for v in m["versions"]:
                lines.append(f"  v{v['version']}  {v['verdict']}{'  REVOKED' if v['revoked'] else ''}  robust={v['robust_accuracy']}  dp_eps={v['dp_epsilon']}  "
                             f"data={str(v['data_sha256'])[:16]}  source={v['data_source']}")
        return "\n".join(lines)

    _print(models, args.json, text)
    return 4 if any(m["alias_drift"] for m in models) else 0


def cmd_init(args: argparse.Namespace) -> int:
    root = _ws().root
    params = write_default_params(root)   # first: an installation without defaults changes nothing
    result = {**init_repo(root), "params": params}
    _print(result, args.json, lambda r: (f"initialised {r['root']} (git: {r['git']}, dvc: {r['dvc']}, remote: {r['remote']}, "
                                         f"params.yaml: {r['params']})"))
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    old, new = rotate_keys()
    Ledger(_ws().ledger_path).append("keys.rotate", {"old_key_id": old, "new_key_id": new})
    _print({"old_key_id": old, "new_key_id": new}, args.json, lambda r: f"rotated signing keys: {old[:16]} -> {new[:16]}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import deploy  # Prefect: slow to import; only the commands that talk to Prefect

    result = deploy(_ws(), pool=args.pool, overrides=list(args.overrides), data=args.data, create_pool=args.create_pool)

    def text(r: dict[str, Any]) -> str:
        lines = [f"deployment {d['name']} on work pool {d['pool']} ({r['api']})" for d in r["deployments"].values()]
        lines += [f"automation {a}" for a in r["automations"]]
        if not r["workers_online"]:
            lines.append(f"no worker polls work pool {r['pool']['name']!r} yet: start one with "
                         f"'prefect worker start --pool {r['pool']['name']}'")
        return "\n".join(lines)

    _print(result, args.json, text)
    return 0


def cmd_schedule_create(args: argparse.Namespace) -> int:
    from flows.schedule import create_schedule  # Prefect: slow to import; only the commands that talk to Prefect

    r = create_schedule(_ws(), cron=args.cron, interval=args.interval, rrule=args.rrule, timezone=args.timezone,
                        on_change=args.on_change, data=args.data, overrides=list(args.overrides))
    if not r["workers_online"]:
        print(f"mlsec: no worker polls work pool {r['pool']!r}: nothing runs the schedule until one does "
              f"('prefect worker start --pool {r['pool']}')", file=sys.stderr)
    _print(r, args.json, lambda r: f"schedule {r['id']} on {r['deployment']}: {r['schedule']}")
    return 0


def cmd_schedule_list(args: argparse.Namespace) -> int:
    from flows.schedule import list_schedules  # Prefect: slow to import; only the commands that talk to Prefect

    rows = list_schedules(_ws())
    _print(rows, args.json, lambda rows: "\n".join(f"{r['id']}  {r['deployment']}  {r['schedule']}"
                                                    f"{'' if r['active'] else '  (paused)'}  {r['parameters'] or ''}"
                                                    for r in rows) or "no schedules")
    return 0


def cmd_schedule_remove(args: argparse.Namespace) -> int:
    from flows.schedule import remove_schedules  # Prefect: slow to import; only the commands that talk to Prefect

    removed = remove_schedules(_ws(), schedule_id=args.id, remove_all=args.all)
    _print({"removed": removed}, args.json, lambda r: f"removed {len(r['removed'])} schedule(s)")
    return 0


def cmd_playbook(args: argparse.Namespace) -> int:
    from flows.playbooks import (
        run_playbook,  # Prefect: slow to import; only 'run', 'schedule' and 'playbook' need the flows
    )

    if args.playbook == "serve":
        from flows.playbooks.automations import serve_playbooks  # Prefect: only serving the playbooks needs it

        serve_playbooks(args.model)
        return 0
    if not args.reason:
        raise InvalidInput(f"playbook {args.playbook} needs --reason")
    if not args.debug:
        _quiet_expected_failures()
    if args.since_hours is not None and not args.since_hours > 0:
        raise InvalidInput(f"--since-hours must be positive, got {args.since_hours}")
    for path in (args.digests, args.trigger):
        if path and not os.path.isfile(path):
            raise InvalidInput(f"file not found: {path}")
    ws = _ws()
    with _services(ws, load_params(ws.params_path)) if args.retrain else contextlib.nullcontext(configured_server()) as server:
        server.ready()
        result = run_playbook(ws, args.playbook, model=args.model, run_id=args.run_id, reason=args.reason,
                              retrain=args.retrain, since_hours=args.since_hours, digests=args.digests,
                              trigger=args.trigger, overrides=list(args.overrides), queue=args.queue)
    _print(result, args.json, lambda r: json.dumps(r, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    def options(default: Any) -> argparse.ArgumentParser:
        common = argparse.ArgumentParser(add_help=False)
        common.add_argument("--json", action="store_true", default=default, help="print one machine-readable JSON object")
        common.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
        return common

    # the options are taken before or after the command (`mlsec --json init`, `mlsec init --json`):
    # a command's parser leaves them alone unless given there, rather than resetting them to False
    parser = _Parser(prog="mlsec", description="A secure training pipeline with an auditable lineage.", parents=[options(False)])
    common = options(argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", parents=[common], help="run the secure-training flow once")
    p.add_argument("--data", help="data source: .npz, .csv, .parquet, an MNIST IDX folder or sklearn:digits (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a setting of params.yaml")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--paranoid", action="store_true", help="re-hash every input at every stage (no stat cache)")
    p.add_argument("--actor", default=None, help="who triggered the run (default: $MLSEC_ACTOR or the OS user)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("lineage", parents=[common], help="the chain from a model back to its data bytes")
    p.add_argument("ref", metavar="MODEL@ALIAS|MODEL/VERSION")
    p.add_argument("--verify", action="store_true", help="re-check every digest and signature in the chain")
    p.add_argument("--restore", metavar="DIR", help="bring back the exact training data through DVC")
    p.set_defaults(fn=cmd_lineage)

    p = sub.add_parser("audit", parents=[common], help="audit-trail commands")
    asub = p.add_subparsers(dest="audit_command", required=True, parser_class=_Parser)
    v = asub.add_parser("verify", parents=[common], help="verify the hash-chained ledger against its signed head and MLflow")
    v.set_defaults(fn=cmd_audit_verify)

    p = sub.add_parser("promote", parents=[common], help="make a gated version the champion (with the signed approvals it needs)")
    p.add_argument("ref", metavar="MODEL/VERSION")
    p.add_argument("--reason", required=True)
    p.add_argument("--approval", dest="approvals", action="append", default=[], metavar="FILE",
                   help="a signed approval made elsewhere ('mlsec approve --out'); recorded ones count too")
    p.set_defaults(fn=cmd_promote)
    trust_commands.add_commands(sub, common, _Parser)

    p = sub.add_parser("rollback", parents=[common], help="point champion back at the previous champion")
    p.add_argument("model")
    p.add_argument("--reason", required=True)
    p.set_defaults(fn=cmd_rollback)

    p = sub.add_parser("models", parents=[common], help="the model inventory")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("deploy", parents=[common], help="register the deployments on a Prefect work pool (and their automations)")
    p.add_argument("--pool", help="work pool (default: orchestration.work_pool of params.yaml)")
    p.add_argument("--create-pool", action="store_true", help="create the work pool (process type) when it is missing")
    p.add_argument("--data", default=None, help="data source of the deployed runs (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_deploy)

    p = sub.add_parser("schedule", parents=[common], help="scheduled retraining on the deployments (cron, interval, RRule, on data change)")
    ssub = p.add_subparsers(dest="schedule_command", required=True, parser_class=_Parser)
    c = ssub.add_parser("create", parents=[common], help="add a schedule")
    group = c.add_mutually_exclusive_group(required=True)
    group.add_argument("--cron", help="cron expression, e.g. '0 3 * * *'")
    group.add_argument("--interval", type=float, help="seconds between runs (or between looks at the data with --on-change)")
    group.add_argument("--rrule", help="iCalendar RRULE, e.g. 'FREQ=WEEKLY;BYDAY=MO;BYHOUR=3'")
    c.add_argument("--timezone", default=None, help="IANA time zone of a cron or RRule schedule (default UTC)")
    c.add_argument("--on-change", action="store_true", help="run only when the data source's bytes changed")
    c.add_argument("--data", default=None)
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.set_defaults(fn=cmd_schedule_create)
    ls = ssub.add_parser("list", parents=[common], help="the schedules on the project's deployments")
    ls.set_defaults(fn=cmd_schedule_list)
    rm = ssub.add_parser("remove", parents=[common], help="remove a schedule by id (or all of them)")
    rm.add_argument("id", nargs="?")
    rm.add_argument("--all", action="store_true")
    rm.set_defaults(fn=cmd_schedule_remove)

    p = sub.add_parser("playbook", parents=[common], help="incident playbooks (docs/playbooks.md)")
    p.add_argument("playbook", choices=["rollback", "purge-retrain", "evasion-response", "degradation-response",
                                        "poisoning-response", "serve"],
                   help="'serve': serve the incident playbooks as deployments started by their alerts' automations")
    p.add_argument("--model", required=True)
    p.add_argument("--run-id", help="the run whose quarantine to purge (purge-retrain)")
    p.add_argument("--reason", default=None, help="why (required except for serve)")
    p.add_argument("--retrain", action="store_true", help="start a new run after purging (purge-retrain) or adversarial "
                   "retraining through the gate (evasion-response)")
    p.add_argument("--since-hours", type=float, default=None, help="telemetry window (evasion: 24, degradation: 1)")
    p.add_argument("--digests", help="poisoning-response: suspect sample digests, one per line, or a quarantine list")
    p.add_argument("--trigger", help="poisoning-response: a trigger .npz with 'mask' and 'pattern'")
    p.add_argument("--queue", help="evasion-response --retrain: retrain with the labelled items of this review queue "
                   "('mlsec review list') instead of queueing new ones")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="settings of a retraining run")
    p.set_defaults(fn=cmd_playbook)

    serving_commands.add_commands(sub, common, _Parser)
    review_commands.add_commands(sub, common, _Parser)

    p = sub.add_parser("init", parents=[common], help="make the current folder a pipeline workspace (git + DVC + local remote)")
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("keys", parents=[common], help="signing keys")
    ksub = p.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    r = ksub.add_parser("rotate", parents=[common], help="retire the current keys (still trusted to verify) and create new ones")
    r.set_defaults(fn=cmd_keys_rotate)
    c = ksub.add_parser("create", parents=[common], help="create an approver's identity key")
    c.add_argument("--identity", required=True, metavar="NAME")
    c.set_defaults(fn=trust_commands.cmd_keys_create)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        try:
            return args.fn(args)
        finally:
            events.flush()  # events sent outside a flow run (alias moves of promote, rollback)
    except PipelineError as err:
        if args.debug:
            traceback.print_exc()
        summary = getattr(err, "summary", None)
        if args.json:
            print(json.dumps({**(summary or {}), "status": (summary or {}).get("status", "failed"), "error": str(err),
                              "exit_code": err.exit_code}, sort_keys=True, default=str))
        print(f"mlsec: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("mlsec: interrupted", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, exit 1
        if args.debug:
            traceback.print_exc()
        print(f"mlsec: unexpected {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} (rerun with --debug)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
