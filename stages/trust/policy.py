"""The signed gate policy: ``gate:`` and ``promotion:`` of ``params.yaml`` as the policy owner
signed them, in ``audit/policy.json``, with the public key of each person it names pinned
(``promotion.approvers``, who may approve a promotion, and ``promotion.reviewers``, who may
label a review queue).

* ``mlsec policy sign``: the policy owner signs ``params.yaml``'s governed sections (their
  key: ``stages.trust.identities``); every approver and reviewer named must have a public
  key here.
* The first run of a workspace that has no signed policy and whose ledger never recorded one
  signs the policy as committed (``git show HEAD:params.yaml``; the file on disk when it is
  not committed) with a new local policy owner key: trust on first use, a ``policy.sign``
  ledger entry with ``"trust": "first-use"``. A fresh clone runs unattended this way.
* After that, a missing, unsigned or otherwise-signed policy file is an integrity violation
  (exit 4): deleting it does not buy a second first use.

A run compares its effective settings with the signed policy (``stages.core.policy``); the
gate records the signed policy's digest and the differences in its verdict. A person's signed
decision (an approval, a labelling) counts only through :func:`authorised_key`: their name in
the signed list of their role, and the key pinned for that name.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from stages.core.canonical import canonical_json
from stages.core.errors import GateRejected, IntegrityError, InvalidInput
from stages.core.params import GateParams, PromotionParams
from stages.core.workspace import Workspace, write_json
from stages.trust.identities import (
    identity_public,
    policy_owner_keys,
    policy_owner_signer,
    public_key_from_pem,
)
from stages.trust.keys import PublicKey
from stages.trust.ledger import Ledger
from stages.trust.provenance import git_show
from stages.trust.signing import sign_document, verify_document

POLICY_SCHEMA = "mlsec.policy/v1"
# the people the policy names, by role: promotion.<role> lists them, the signed document pins
# their keys under <singular>_keys and lists the ones signed without a key under unpinned_<role>
ROLES = {"approvers": "approve", "reviewers": "label"}   # role -> what it lets a person do


@dataclass(frozen=True)
class SignedPolicy:
    """A verified signed policy: its payload, the SHA-256 of the payload's canonical JSON and
    the policy owner key that signed it."""

    payload: dict[str, Any]
    sha256: str
    key_id: str

    @property
    def policy(self) -> dict[str, Any]:
        """The governed sections, ``{"gate": ..., "promotion": ...}``, with the defaults of
        settings newer than the document filled in."""
        return check_policy(self.payload, what="the signed policy")

    def members(self, role: str) -> list[str]:
        """The identities the signed policy lists under ``promotion.<role>``."""
        return list(self.payload["promotion"].get(role) or [])

    @property
    def approvers(self) -> list[str]:
        return self.members("approvers")

    @property
    def reviewers(self) -> list[str]:
        return self.members("reviewers")

    def pinned_keys(self, role: str) -> dict[str, tuple[str, PublicKey]]:
        """Name -> (key id, public key) of every member of ``role`` whose key is pinned."""
        out = {}
        for name, rec in (self.payload.get(_keys_field(role)) or {}).items():
            if name in self.members(role):
                out[name] = (rec["key_id"], public_key_from_pem(rec["public_key"], what=f"pinned key of {role[:-1]} {name!r}"))
        return out

    def summary(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "key_id": self.key_id, "trust": self.payload.get("trust"),
                "signed_at": self.payload.get("signed_at"), "source": self.payload.get("source")}


def _keys_field(role: str) -> str:
    return f"{role[:-1]}_keys"          # approver_keys, reviewer_keys


def authorised_key(policy: SignedPolicy, role: str, *, claimed: str, key_id: str, vouched: bool,
                   what: str) -> PublicKey:
    """The pinned key that a ``what`` (an approval, a label document) claiming identity
    ``claimed`` and signed with key ``key_id`` must verify under, when the signed policy lets
    ``claimed`` act in ``role``.

    ``vouched``: whether something the caller trusts (this machine's key folder, the ledger's
    record of the signature) ties ``key_id`` to ``claimed``. ``GateRejected`` (exit 3): a
    vouched identity the policy does not list, lists without a pinned key, or pinned with
    another key (a re-created identity counts only once the policy owner signs its new key).
    ``IntegrityError`` (exit 4): a key pinned for another identity, or an unvouched key the
    policy did not pin.
    """
    pinned = policy.pinned_keys(role)
    owner = next((name for name, (kid, _) in pinned.items() if kid == key_id), None)
    if owner is not None and owner != claimed:
        raise IntegrityError(f"{what} claims identity {claimed!r} but is signed with the key of {owner!r}")
    if owner is None and not vouched:
        raise IntegrityError(f"{what} for {claimed!r} is signed by unknown key {key_id[:16]}: neither the signed "
                             "policy nor this key folder holds it")
    if owner is None:
        members, verb = policy.members(role), ROLES[role]
        if claimed in pinned:
            raise GateRejected(f"{claimed!r} signed with key {key_id[:16]}, not the key the signed policy pinned for them "
                               f"({pinned[claimed][0][:16]}): a new key counts only once the policy owner signs the policy "
                               "again with it ('mlsec policy sign')")
        if claimed in members:
            raise GateRejected(f"identity {claimed!r} may not {verb} yet: the signed policy names it without a pinned "
                               "key; the policy owner signs again once its public key is here ('mlsec policy sign')")
        raise GateRejected(f"identity {claimed!r} may not {verb} under the signed policy ({role}: "
                           f"{', '.join(members) or 'none'}): the policy owner lists it in promotion.{role} of "
                           "params.yaml and signs it ('mlsec policy sign')")
    return pinned[owner][1]


def policy_path(ws: Workspace) -> Path:
    return ws.audit_dir / "policy.json"


def check_policy(raw: dict[str, Any], *, what: str) -> dict[str, Any]:
    """The governed sections of ``raw`` validated and as plain JSON; ``InvalidInput`` when malformed."""
    if not isinstance(raw, dict) or not isinstance(raw.get("gate"), dict) or not isinstance(raw.get("promotion"), dict):
        raise InvalidInput(f"{what} must hold 'gate:' and 'promotion:' mappings")
    try:
        gate = GateParams.model_validate(raw["gate"]).model_dump(mode="json")
        promotion = PromotionParams.model_validate(raw["promotion"]).model_dump(mode="json")
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"{what} is malformed: {loc or 'policy'}: {first['msg']}") from None
    return {"gate": gate, "promotion": promotion}


def committed_policy(ws: Workspace) -> tuple[dict[str, Any], str]:
    """The governed sections of ``params.yaml`` as committed (else as on disk) and where from."""
    text, source = git_show(ws.root, "params.yaml")
    if text is None:
        try:
            text, source = ws.params_path.read_text(), "params.yaml (not committed)"
        except FileNotFoundError:
            raise InvalidInput(f"no policy to sign: {ws.params_path} not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InvalidInput(f"{source} is not valid YAML: {str(err).splitlines()[0]}") from None
    return check_policy(raw if isinstance(raw, dict) else {}, what=source), source


def _pin(names: list[str], role: str, *, first_use: bool) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The public keys of ``names`` on this machine, ``({name: {key_id, public_key}}, unpinned)``."""
    pinned, unpinned = {}, []
    for name in names:
        found = identity_public(name)
        if found is None:
            if not first_use:
                raise InvalidInput(f"{role[:-1]} {name!r} has no public key here: create it ('mlsec keys create --identity "
                                   f"{name}') or copy theirs into the key folder's identities/")
            unpinned.append(name)
        else:
            pinned[name] = {"key_id": found[0], "public_key": found[1]}
    return pinned, unpinned


def sign_policy(ws: Workspace, policy: dict[str, Any], *, source: str, first_use: bool = False) -> SignedPolicy:
    """Sign ``policy`` with the policy owner's key into ``audit/policy.json`` and record it.

    Every approver and reviewer must have a public key on this machine (pinned into the
    document); on first use the ones without a key are left unpinned (they cannot approve or
    label until the owner signs again). Raises ``InvalidInput`` for a malformed policy or a
    missing key.
    """
    policy = check_policy(policy, what="the policy")
    people, recorded = {}, {}
    for role in ROLES:
        pinned, unpinned = _pin(policy["promotion"][role], role, first_use=first_use)
        people.update({_keys_field(role): pinned, f"unpinned_{role}": unpinned})
        recorded.update({role: {n: r["key_id"] for n, r in pinned.items()}, f"unpinned_{role}": unpinned})
    signer = policy_owner_signer(create=first_use or not policy_owner_keys())
    payload = {"schema": POLICY_SCHEMA, **policy, **people, "source": source,
               "trust": "first-use" if first_use else "policy-owner",
               "signed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    previous = load_signed_policy(ws) if policy_path(ws).exists() else None
    write_json(policy_path(ws), sign_document(payload, signer=signer))
    signed = SignedPolicy(payload, hashlib.sha256(canonical_json(payload)).hexdigest(), signer.key_id)
    Ledger(ws.ledger_path).append("policy.sign", {**signed.summary(), **recorded,
                                                  "previous_sha256": previous.sha256 if previous else None})
    return signed


def load_signed_policy(ws: Workspace) -> SignedPolicy | None:
    """The verified signed policy, or None when the workspace has none yet.

    Raises ``IntegrityError`` when the file is not a policy signed by the policy owner's key.
    """
    path = policy_path(ws)
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_bytes())
    except ValueError:
        raise IntegrityError(f"signed policy {path} is not valid JSON") from None
    keys = policy_owner_keys()
    if not keys:
        raise IntegrityError(f"signed policy {path} exists but this machine trusts no policy owner key")
    try:
        payload = verify_document(doc, keys=keys)
    except IntegrityError as err:
        raise IntegrityError(f"signed policy {path}: {err} (only the policy owner's key may sign it)") from None
    if payload.get("schema") != POLICY_SCHEMA:
        raise IntegrityError(f"signed policy {path} has an unknown schema {payload.get('schema')!r}")
    try:
        check_policy(payload, what="the signed policy")
    except InvalidInput as err:
        raise IntegrityError(str(err)) from None
    return SignedPolicy(payload, hashlib.sha256(canonical_json(payload)).hexdigest(), doc["signature"]["key_id"])


def recorded_policy(ws: Workspace) -> SignedPolicy | None:
    """The verified signed policy, or None when the workspace never had one.

    ``IntegrityError`` when the file is not the policy owner's, or is missing while the ledger
    records a signed policy (deleting it buys no second first use)."""
    signed = load_signed_policy(ws)
    if signed is not None:
        return signed
    recorded = [e for e in Ledger(ws.ledger_path).entries() if e.get("event") == "policy.sign"]
    if recorded:
        raise IntegrityError(f"signed policy {policy_path(ws)} is missing, but the ledger records policy "
                             f"{recorded[-1]['payload'].get('sha256', '?')[:16]}... signed at seq {recorded[-1]['seq']}: "
                             "restore it, or have the policy owner run 'mlsec policy sign'")
    return None


def policy_for_run(ws: Workspace) -> SignedPolicy:
    """The signed policy a run is judged against; signs the committed one on first use."""
    signed = recorded_policy(ws)
    if signed is not None:
        return signed
    policy, source = committed_policy(ws)
    return sign_policy(ws, policy, source=source, first_use=True)
