"""The prediction service's commands: ``mlsec serve``, ``mlsec clients``, ``mlsec drill``.

Each imports the web stack, torch or the HTTP client only when it runs, so the rest of the
command line starts without them.
"""

from __future__ import annotations

import argparse
import json
import os

from flows.cli_support import emit as _print, workspace as _ws
from stages.core.errors import InvalidInput
from stages.core.params import load_params


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serving.server import serve  # the web stack and torch: only 'serve' needs them

    ws = _ws()
    params = load_params(ws.params_path, args.overrides)
    serve(ws, params, ref=args.model, host=args.host, port=args.port)
    return 0


def cmd_clients(args: argparse.Namespace) -> int:
    from stages.monitoring.access import KeyStore, keys_path

    store = KeyStore(keys_path(_ws()))
    if args.clients_command == "add":
        token = store.add(args.name, role="admin" if args.admin else "client", budget=args.budget, rate=args.rate)
        _print({"client": args.name, "api_key": token}, args.json,
               lambda r: f"API key for {r['client']} (shown once, store it now):\n{r['api_key']}")
    elif args.clients_command == "remove":
        store.remove(args.name)
        _print({"client": args.name, "removed": True}, args.json, lambda r: f"removed the key of {r['client']}")
    else:
        _print(store.clients(), args.json,
               lambda cs: "\n".join(f"{c['name']}  role={c['role']}  budget={c['budget'] or 'default'}  "
                                    f"rate={c['rate'] or 'default'}  created={c['created']}"
                                    for c in cs) or "no clients")
    return 0


def cmd_drill(args: argparse.Namespace) -> int:
    from flows.drill_cli import run_drill  # torch and the HTTP client: only 'drill' needs them

    key = args.key or os.environ.get("MLSEC_API_KEY")
    if not key:
        raise InvalidInput("the drill needs a client key: --key or $MLSEC_API_KEY")
    report = run_drill(_ws(), args.kind, url=args.url, key=key, admin_key=args.admin_key or os.environ.get("MLSEC_ADMIN_KEY"),
                       model=args.model, rows=args.rows, queries=args.queries)
    _print(report, args.json, lambda r: json.dumps(r, indent=2, default=str))
    return 0


def add_commands(sub, common: argparse.ArgumentParser, parser_class) -> None:
    """Add ``serve``, ``clients`` and ``drill`` to the ``mlsec`` subcommands."""
    p = sub.add_parser("serve", parents=[common], help="serve the verified champion over HTTP (FastAPI)")
    p.add_argument("--model", default=None, metavar="NAME@ALIAS", help="default: serving.model, else <project>@champion")
    p.add_argument("--host", default=None, help="default: serving.host (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default: serving.port")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("clients", parents=[common], help="API keys of the prediction service")
    csub = p.add_subparsers(dest="clients_command", required=True, parser_class=parser_class)
    c = csub.add_parser("add", parents=[common], help="issue a key (printed once; only its hash is stored)")
    c.add_argument("name")
    c.add_argument("--admin", action="store_true", help="may read /v1/status, /metrics and the admin routes")
    c.add_argument("--budget", type=int, default=None, help="rows per budget period (default: serving.access.budget)")
    c.add_argument("--rate", default=None, help="request rate such as 5/second (default: serving.access.rate_limit)")
    c.set_defaults(fn=cmd_clients)
    c = csub.add_parser("remove", parents=[common], help="revoke a client's key")
    c.add_argument("name")
    c.set_defaults(fn=cmd_clients)
    c = csub.add_parser("list", parents=[common], help="clients and their budgets")
    c.set_defaults(fn=cmd_clients)

    p = sub.add_parser("drill", parents=[common], help="red-team drill against a running prediction service")
    p.add_argument("kind", choices=["evasion", "extraction"])
    p.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8080")
    p.add_argument("--key", default=None, help="the attacking client's API key (default: $MLSEC_API_KEY)")
    p.add_argument("--admin-key", default=None, help="an administrator key, to read what the service detected "
                   "(default: $MLSEC_ADMIN_KEY)")
    p.add_argument("--model", default=None, metavar="NAME@ALIAS", help="the verified model PGD is crafted on "
                   "(default: <project>@champion of this workspace)")
    p.add_argument("--rows", type=int, default=200, help="evasion: inputs per group")
    p.add_argument("--queries", type=int, default=1000, help="extraction: most queries to send")
    p.set_defaults(fn=cmd_drill)
