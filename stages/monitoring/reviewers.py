"""Who may label a review queue: the reviewers the signed policy names
(``promotion.reviewers``), each with the key the policy owner pinned for them when signing
(``stages.trust.policy``, the same pinning as the approvers').

* Labelling (:func:`authorise_labelling`): the reviewer's key on this machine must be the
  pinned key of a listed reviewer. Otherwise nothing is written; the refusal is a
  ``review.label.refused`` ledger entry and ``GateRejected`` (exit 3, as for an approver the
  policy does not list). An identity anyone can mint with ``mlsec keys create``, a listed
  name re-created with a new key, or a name added to ``params.yaml`` without the policy
  owner's signature is refused alike.
* Retraining (:func:`check_labellers`): every item's final decision (label or discard) must
  come from a label document whose signer, the key the ledger recorded with it, is a pinned
  reviewer of the policy in force at retraining time. A reviewer removed from the policy (or
  whose key the owner replaced) no longer decides what a run learns: the run is refused as a
  whole (``review.retrain.refused``, exit 3) rather than trained on the rest, so that what it
  learns never depends on labels silently left out. A listed reviewer's later labelling of
  the same items replaces the refused decisions; earlier, replaced documents never count.
* A workspace whose signed policy names no reviewers (the project's default) lets nobody
  label; the refusal says how to name them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from stages.core.errors import GateRejected, IntegrityError, PipelineError
from stages.core.workspace import Workspace
from stages.trust.ledger import Ledger
from stages.trust.policy import SignedPolicy, authorised_key, recorded_policy

HOW_TO_NAME = ("list the reviewers in promotion.reviewers of params.yaml and have the policy owner run "
               "'mlsec policy sign'")


def reviewing_policy(ws: Workspace) -> SignedPolicy:
    """The signed policy in force; ``GateRejected`` when the workspace has none yet (nobody
    may label), ``IntegrityError`` when its file was changed or removed."""
    signed = recorded_policy(ws)
    if signed is None:
        raise GateRejected(f"there is no signed policy (audit/policy.json) yet, so nobody may label: {HOW_TO_NAME}")
    return signed


def _check(policy: SignedPolicy, *, identity: str, key_id: str) -> None:
    if not policy.reviewers:
        raise GateRejected(f"identity {identity!r} may not label: the signed policy names no reviewers; {HOW_TO_NAME}")
    # vouched: the key is this machine's key of that identity (labelling) or the key the
    # verified ledger recorded with the document (retraining)
    authorised_key(policy, "reviewers", claimed=identity, key_id=key_id, vouched=True, what="label document")


def authorise_labelling(ws: Workspace, *, queue: str, identity: str, key_id: str) -> SignedPolicy:
    """The signed policy, when it lets ``identity`` (signing with ``key_id``) label ``queue``.

    ``GateRejected`` (exit 3) for a reviewer the policy does not list or pinned with another
    key, ``IntegrityError`` (exit 4) for a key pinned for someone else or a policy file
    changed since the owner signed it; either recorded as ``review.label.refused``.
    """
    try:
        policy = reviewing_policy(ws)
        _check(policy, identity=identity, key_id=key_id)
    except (GateRejected, IntegrityError) as err:
        raise Ledger(ws.ledger_path).refusal("review.label.refused", err, queue=queue, identity=identity,
                                             key_id=key_id) from None
    return policy


def _refused(policy: SignedPolicy, decisions: Iterable[Any]) -> list[tuple[Any, PipelineError]]:
    """The decisions ``policy`` does not accept, each with why."""
    refused: list[tuple[Any, PipelineError]] = []
    for d in decisions:
        try:
            _check(policy, identity=d.identity, key_id=d.key_id)
        except (GateRejected, IntegrityError) as err:
            refused.append((d, err))
    return refused


def policy_in_force(ws: Workspace) -> SignedPolicy | PipelineError:
    """The signed policy a retraining would check labels against now, or why there is none
    (read once by a command that marks many queues' decisions)."""
    try:
        return reviewing_policy(ws)
    except (GateRejected, IntegrityError) as err:
        return err


def decisions_not_counted(policy: SignedPolicy | PipelineError, decisions: Iterable[Any]) -> dict[str, str]:
    """Which decisions a retraining would refuse under ``policy`` (:func:`policy_in_force`),
    by input digest, with why (what ``review list`` and ``review show`` mark); empty when all
    count. Read-only: nothing is written to the ledger. A missing or changed policy counts none."""
    decisions = list(decisions)
    if isinstance(policy, PipelineError):
        return {d.input_sha256: str(policy) for d in decisions}
    return {d.input_sha256: str(err) for d, err in _refused(policy, decisions)}


def check_labellers(ws: Workspace, *, queue: str, decisions: Iterable[Any]) -> SignedPolicy:
    """The signed policy, when every decision (``stages.monitoring.review_labels.Decision``:
    ``input_sha256``, ``identity``, ``key_id``) was made by a pinned reviewer of it.

    Otherwise the retraining is refused, recorded as ``review.retrain.refused`` naming the
    items and who labelled them: ``IntegrityError`` when a document's key is pinned for
    another identity, ``GateRejected`` (exit 3) for anyone the policy does not let label.
    """
    try:
        policy = reviewing_policy(ws)
    except (GateRejected, IntegrityError) as err:
        raise Ledger(ws.ledger_path).refusal("review.retrain.refused", err, queue=queue) from None
    refused = _refused(policy, decisions)
    if not refused:
        return policy
    (first, why), people = refused[0], sorted({d.identity for d, _ in refused})
    kind = IntegrityError if any(isinstance(e, IntegrityError) for _, e in refused) else GateRejected
    err = kind(f"review queue {queue}: {len(refused)} item(s) were last labelled by {', '.join(people)}, whom the signed "
               f"policy in force does not let label (item {first.input_sha256[:16]}...: {why}); nothing was trained: "
               "a listed reviewer labels them again ('mlsec review label'), or the policy owner lists the reviewer again")
    raise Ledger(ws.ledger_path).refusal("review.retrain.refused", err, queue=queue, labelled_by=people,
                                         items=[d.input_sha256 for d, _ in refused]) from None
