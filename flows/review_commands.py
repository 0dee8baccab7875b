"""The review queue's commands (docs/playbooks.md, "Evasion"):

    mlsec review list
    mlsec review show QUEUE
    mlsec review label QUEUE --identity NAME (--labels FILE | --item DIGEST (--label CLASS | --discard)) [--reason TEXT]
    mlsec review retrain QUEUE --reason TEXT [--set key=value ...]

Every command reads a queue and its labels through their signatures and the ledger
(``stages.monitoring.review``, ``stages.monitoring.review_labels``): a changed file is an
integrity violation (exit 4). Bad input (an unknown queue or digest, a label outside the
class list, an empty label file, a reviewer without an identity key) is one line and exit 2,
with nothing stored changed. Only the reviewers the signed policy names (``promotion.reviewers``),
each with the key it pinned, may label, and a retraining uses only their decisions
(``stages.monitoring.reviewers``): anyone else is refused with exit 3, as an approver the
policy does not list is, with a ``review.label.refused`` or ``review.retrain.refused`` ledger
entry and nothing else stored.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from flows.cli_support import emit as _print, quiet_expected_failures, services, workspace as _ws
from stages.core.errors import InvalidInput, PipelineError
from stages.core.params import load_params
from stages.trust.identities import identity_signer


def cmd_review_list(args: argparse.Namespace) -> int:
    from stages.monitoring.review import queue_names  # numpy: kept off the command line's start
    from stages.monitoring.review_labels import open_review, queue_status, verified_entries
    from stages.monitoring.reviewers import decisions_not_counted, policy_in_force

    ws = _ws()
    entries = verified_entries(ws)
    policy = policy_in_force(ws)
    rows: list[dict[str, Any]] = []
    for name in queue_names(ws):
        try:
            review = open_review(ws, name, where="review list", entries=entries)
            rows.append(queue_status(review.queue, review.final, entries, decisions_not_counted(policy, review.final.values())))
        except PipelineError as err:
            rows.append({"queue": name, "status": "integrity violation", "error": str(err)})

    def text(rows: list[dict[str, Any]]) -> str:
        if not rows:
            return "no review queues (the evasion-response playbook writes them)"
        lines = []
        for r in rows:
            if "error" in r:
                lines.append(f"{r['queue']}  INTEGRITY VIOLATION: {r['error']}")
                continue
            runs = ", ".join(f"{t['run_id']} ({t['items']} items)" for t in r["trained_in"])
            lines.append(f"{r['queue']}  {r['model']}  {r['status']}  items {r['items']}  labelled {r['labelled']}  "
                         f"discarded {r['discarded']}  pending {r['pending']}" + _not_counted_text(r)
                         + (f"  trained in {runs}" if runs else ""))
        return "\n".join(lines)

    _print(rows, args.json, text)
    return 4 if any("error" in r for r in rows) else 0


def _not_counted_text(r: dict[str, Any]) -> str:
    if not r["not_counted"]:
        return ""
    return (f"  not counted {r['not_counted']} (labelled by {', '.join(r['not_counted_labellers'])}, whom the signed "
            "policy no longer lets label: a listed reviewer labels them again)")


def cmd_review_show(args: argparse.Namespace) -> int:
    from stages.monitoring.review_labels import open_review, queue_status  # numpy: kept off the command line's start
    from stages.monitoring.reviewers import decisions_not_counted, policy_in_force

    ws = _ws()
    review = open_review(ws, args.queue, where="review show")
    not_counted = decisions_not_counted(policy_in_force(ws), review.final.values())
    q = review.queue
    items = []
    for item in q.items:
        d = review.final.get(item["input_sha256"])
        items.append({**item, "prediction_class": q.class_name(item["prediction"]),
                      "decision": d.decision if d else None, "label": d.label if d else None,
                      "labelled_by": d.identity if d else None, "labelled_at": d.labelled_at if d else None,
                      "not_counted": not_counted.get(item["input_sha256"])})
    out = {**queue_status(q, review.final, review.entries, not_counted), "classes": q.classes,
           "input_shape": q.payload["input_shape"], "columns": q.columns, "queue_sha256": q.sha256, "items_detail": items}

    def text(r: dict[str, Any]) -> str:
        lines = [f"queue {r['queue']}  model {r['model']}  {r['status']}  created {r['created_at']}  reason: {r['reason']}",
                 f"classes {r['classes']}  input shape {r['input_shape']}" + _not_counted_text(r),
                 "input_sha256      client            time                  version  prediction  score    label"]
        for it in r["items_detail"]:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(it["time"]))
            label = {"label": f"{it['label']} by {it['labelled_by']}", "discard": f"discard by {it['labelled_by']}"}.get(
                it["decision"] or "", "-") + ("  NOT COUNTED under the signed policy in force" if it["not_counted"] else "")
            lines.append(f"{it['input_sha256'][:16]}  {it['client'][:16]:<16}  {when}  {it['model_version']:>7}  "
                         f"{str(it['prediction_class']):>10}  {it['detector_score']:7.3f}  {label}")
            if it.get("row") is not None:    # a table's row as the client sent it, by column name
                lines.append("    " + ", ".join(f"{name}={'null' if v is None else v}" for name, v in it["row"].items()))
        return "\n".join(lines)

    _print(out, args.json, text)
    return 0


def cmd_review_label(args: argparse.Namespace) -> int:
    if bool(args.labels) == bool(args.item):
        raise InvalidInput("give either --labels FILE or --item DIGEST with --label CLASS or --discard")
    if args.item and (args.label is None) == (not args.discard):
        raise InvalidInput("--item needs exactly one of --label CLASS or --discard")
    if not args.item and (args.label is not None or args.discard):
        raise InvalidInput("--label and --discard go with --item; a label file holds its own labels")
    identity_signer(args.identity)   # a reviewer without an identity key is refused before anything is read
    from stages.monitoring.review_labels import (  # numpy: kept off the command line's start
        open_review,
        read_label_file,
        record_labels,
        resolve_labels,
    )

    pairs = read_label_file(args.labels) if args.labels else [(args.item, None if args.discard else args.label)]
    ws = _ws()
    review = open_review(ws, args.queue, where="review label")
    labels = resolve_labels(review.queue, pairs)
    result = record_labels(ws, review.queue, labels, identity=args.identity, reason=args.reason or "")
    _print(result, args.json, lambda r: f"{r['identity']} labelled {r['labelled']} and discarded {r['discarded']} items of "
                                        f"queue {r['queue']} (key {r['key_id'][:16]}, ledger seq {r['ledger_seq']})")
    return 0


def cmd_review_retrain(args: argparse.Namespace) -> int:
    from flows.playbooks import check_queue_retrain, run_playbook  # the registry and flows: kept off the start
    from stages.monitoring.review_labels import open_review

    if not args.reason or not args.reason.strip():
        raise InvalidInput("review retrain needs --reason")
    ws = _ws()
    model = open_review(ws, args.queue, where="review retrain").queue.model
    params = load_params(ws.params_path, args.overrides)      # bad settings fail here, before any service starts
    check_queue_retrain(ws, queue=args.queue, model=model, retrain=True)   # and a queue with nothing to train on
    if not args.debug:
        quiet_expected_failures()
    with services(ws, params) as server:
        server.ready()
        result = run_playbook(ws, "evasion-response", model=model, reason=args.reason, retrain=True,
                              overrides=list(args.overrides), queue=args.queue)
    retrain = result.get("retrain") or {}
    _print(result, args.json, lambda r: f"queue {args.queue}: {r['review_items']['items']} labelled items added to "
                                        f"{r['review_items']['champion_rows']} champion rows; run {retrain.get('run_id')}: "
                                        f"{retrain.get('status')}" + (f" ({retrain['error']})" if retrain.get("error") else ""))
    status = retrain.get("status")
    if status in ("promoted", "awaiting_approval", "declined", "unchanged"):
        return 0
    return 3 if status == "rejected" else int(retrain.get("exit_code") or 1)


def add_commands(sub, common: argparse.ArgumentParser, parser_class) -> None:
    """Add ``review list|show|label|retrain`` to the ``mlsec`` subcommands."""
    p = sub.add_parser("review", parents=[common], help="label the inputs the detector flagged, and retrain with them")
    rsub = p.add_subparsers(dest="review_command", required=True, parser_class=parser_class)
    c = rsub.add_parser("list", parents=[common], help="review queues: items, labelled, discarded, status")
    c.set_defaults(fn=cmd_review_list)
    c = rsub.add_parser("show", parents=[common], help="a queue's items: digest, client, prediction, score, label "
                        "(and a table's rows by column name)")
    c.add_argument("queue")
    c.set_defaults(fn=cmd_review_show)
    c = rsub.add_parser("label", parents=[common], help="label items with your identity key (signed, in the ledger)")
    c.add_argument("queue")
    c.add_argument("--identity", required=True, help="your identity: a reviewer the signed policy names "
                   "(promotion.reviewers), with its private key on this machine")
    c.add_argument("--labels", metavar="FILE", help="CSV (input_sha256,label) or JSON ({digest: label}); "
                   "label 'discard' (JSON null) marks an item as not an attack")
    c.add_argument("--item", metavar="DIGEST", help="one item's input digest (or a unique prefix of 8+ hex digits)")
    c.add_argument("--label", metavar="CLASS", help="the item's class: a name of the champion's class list")
    c.add_argument("--discard", action="store_true", help="the item is not an attack: never trained on")
    c.add_argument("--reason", default="", help="a note kept with the signed labels")
    c.set_defaults(fn=cmd_review_label)
    c = rsub.add_parser("retrain", parents=[common], help="adversarial retraining with the queue's labelled items, "
                        "through the normal gate (evasion-response --retrain --queue)")
    c.add_argument("queue")
    c.add_argument("--reason", required=True)
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="settings of the retraining run")
    c.set_defaults(fn=cmd_review_retrain)
