"""The command line's trust commands: people's keys, the signed policy, approvals, revocation.

    mlsec keys create --identity NAME
    mlsec policy show | sign
    mlsec approve MODEL/VERSION --identity NAME --reason TEXT [--out FILE]
    mlsec revoke MODEL/VERSION --reason TEXT

Each prints one line (or ``--json``) and maps errors to the documented exit codes through
``flows.cli.main``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from flows.cli_support import emit as _print, workspace as _ws
from stages.core.errors import InvalidInput
from stages.core.params import read_params_yaml
from stages.core.policy import describe_differences, policy_differences
from stages.core.workspace import Workspace
from stages.trust.identities import create_identity, key_dir
from stages.trust.ledger import Ledger
from stages.trust.policy import ROLES, check_policy, committed_policy, load_signed_policy, policy_path, sign_policy


def cmd_keys_create(args: argparse.Namespace) -> int:
    key_id, _ = create_identity(args.identity)
    Ledger(_ws().ledger_path).append("keys.identity", {"identity": args.identity, "key_id": key_id})
    public = key_dir() / "identities" / f"{args.identity}.pub.pem"
    _print({"identity": args.identity, "key_id": key_id, "public_key": str(public)}, args.json,
           lambda r: f"created identity {r['identity']} (key {r['key_id'][:16]}); public key {r['public_key']}: list the "
                     "name in promotion.approvers (who may approve) or promotion.reviewers (who may label review "
                     "queues) and have the policy owner run 'mlsec policy sign'")
    return 0


def _params_policy(ws: Workspace) -> dict[str, Any]:
    return check_policy(read_params_yaml(ws.params_path), what=str(ws.params_path.name))


def cmd_policy_show(args: argparse.Namespace) -> int:
    ws = _ws()
    signed = load_signed_policy(ws)
    current = _params_policy(ws)
    if signed is None:
        committed, source = committed_policy(ws)
        out = {"signed": None, "path": str(policy_path(ws)), "first_use_would_sign": source,
               "params_differences": policy_differences(committed, current)}
        _print(out, args.json, lambda r: f"no signed policy yet: the first run signs the gate: and promotion: of {source} "
                                         "with a new local policy owner key (trust on first use)")
        return 0
    entry = next((e for e in reversed(Ledger(ws.ledger_path).entries())
                  if e.get("event") == "policy.sign" and e["payload"].get("sha256") == signed.sha256), None)
    diffs = policy_differences(signed.policy, current)
    people = {}
    for role in ROLES:
        people[role] = {n: kid for n, (kid, _) in signed.pinned_keys(role).items()}
        people[f"unpinned_{role}"] = [n for n in signed.members(role) if n not in people[role]]
    out = {"signed": {**signed.summary(), **signed.policy, **people},
           "ledger_seq": entry["seq"] if entry else None, "path": str(policy_path(ws)), "params_differences": diffs}

    def text(r: dict[str, Any]) -> str:
        s = r["signed"]
        how = "trusted on first use" if s["trust"] == "first-use" else "signed by the policy owner"
        lines = [f"policy {s['sha256'][:16]}  {how} at {s['signed_at']} (ledger seq {r['ledger_seq']}), "
                 f"key {s['key_id'][:16]}, from {s['source']}"]
        for role in ROLES:
            named = ", ".join(f"{n} (key {k[:16]})" for n, k in s[role].items()) or "none"
            lines.append(f"{role}: {named}" + (f"; unpinned: {', '.join(s['unpinned_' + role])}"
                                               if s["unpinned_" + role] else ""))
        lines += ["gate: " + ", ".join(f"{k}={v}" for k, v in s["gate"].items()),
                  "promotion: " + ", ".join(f"{k}={v}" for k, v in s["promotion"].items()),
                  "params.yaml: " + (f"differs: {describe_differences(r['params_differences'])}" if r["params_differences"]
                                     else "as signed")]
        return "\n".join(lines)

    _print(out, args.json, text)
    return 0


def cmd_policy_sign(args: argparse.Namespace) -> int:
    ws = _ws()
    previous = load_signed_policy(ws) if policy_path(ws).exists() else None
    policy = _params_policy(ws)
    signed = sign_policy(ws, policy, source=f"{ws.params_path.name} as signed by the policy owner")
    diffs = policy_differences(previous.policy, signed.policy) if previous else []
    _print({**signed.summary(), "changes": diffs}, args.json,
           lambda r: f"signed policy {r['sha256'][:16]} with key {r['key_id'][:16]}"
                     + (f"; changes: {describe_differences(diffs)}" if diffs else ""))
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    from stages.models.promotion import approve  # MLflow: slow to import, kept off the command line's start

    result = approve(_ws(), args.ref, identity=args.identity, reason=args.reason)
    if args.out:
        Path(args.out).write_text(json.dumps(result["approval"], indent=2, sort_keys=True) + "\n")
    _print(result, args.json, lambda r: f"{r['identity']} approved {r['model']}/{r['version']} (ledger seq {r['ledger_seq']}; "
                                        f"promotion needs {r['needed']} approval{'s' if r['needed'] > 1 else ''})")
    return 0


def read_approvals(paths: list[str]) -> list[dict[str, Any]]:
    out = []
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InvalidInput(f"approval file not found: {path}") from None
        except (ValueError, UnicodeDecodeError):
            raise InvalidInput(f"approval file {path} is not JSON") from None
        out.append(doc)
    return out


def cmd_revoke(args: argparse.Namespace) -> int:
    from stages.models.records import revoke  # MLflow: slow to import, kept off the command line's start
    from stages.models.store import parse_ref

    name, alias, version = parse_ref(args.ref)
    if alias:
        raise InvalidInput(f"revoke names a version (MODEL/VERSION), not an alias: {args.ref}")
    result = revoke(_ws(), name, version, reason=args.reason)
    _print(result, args.json, lambda r: f"revoked {r['model']}/{r['version']} (weights {r['weights_sha256'][:16]}, ledger seq "
                                        f"{r['ledger_seq']}): loading and promotion refuse it")
    return 0


def add_commands(sub, common: argparse.ArgumentParser, parser_class) -> None:
    """Add ``approve``, ``revoke`` and ``policy`` to the ``mlsec`` subcommands."""
    p = sub.add_parser("approve", parents=[common], help="sign an approval of a gated version with your identity key")
    p.add_argument("ref", metavar="MODEL/VERSION")
    p.add_argument("--identity", required=True, help="your identity (its private key must be on this machine)")
    p.add_argument("--reason", required=True)
    p.add_argument("--out", metavar="FILE", help="also write the signed approval here (for a paused run's input)")
    p.set_defaults(fn=cmd_approve)

    p = sub.add_parser("revoke", parents=[common], help="withdraw a version: loading and promotion refuse it")
    p.add_argument("ref", metavar="MODEL/VERSION")
    p.add_argument("--reason", required=True)
    p.set_defaults(fn=cmd_revoke)

    p = sub.add_parser("policy", parents=[common], help="the signed gate and promotion policy")
    psub = p.add_subparsers(dest="policy_command", required=True, parser_class=parser_class)
    psub.add_parser("show", parents=[common], help="the signed policy and how params.yaml differs from it").set_defaults(
        fn=cmd_policy_show)
    psub.add_parser("sign", parents=[common], help="sign params.yaml's gate: and promotion: (policy owner)").set_defaults(
        fn=cmd_policy_sign)
