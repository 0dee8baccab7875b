"""People's keys: approver identities and the policy owner's key (the pipeline's own keys:
``stages.trust.keys``).

The pipeline's keys sign what the pipeline did (manifests, verdicts, the ledger); they can
neither approve a model nor change the gate policy. Those are people's decisions, signed
with their own Ed25519 keys, kept in the same key folder::

    identities/<name>.pem        an approver's private key (mode 0600), on that person's machine
    identities/<name>.pub.pem    their public key (copy it to the machines that check approvals)
    policy_ed25519.pem           the policy owner's private key: signs the gate policy
    policy_ed25519.pub.pem       its public key: the only key a signed policy is accepted from

``mlsec keys create --identity NAME`` creates an identity; the policy owner's key is created
by the first run that finds no signed policy (trust on first use, ``stages.trust.policy``)
or by ``mlsec policy sign``. Files are created with ``O_EXCL`` under the key folder's lock
and read with the same checks as the pipeline's keys (no symlinks, no loose permissions).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from stages.core.errors import IntegrityError, InvalidInput
from stages.core.params import IDENTITY_RE
from stages.trust.keys import (
    PublicKey,
    Signer,
    _check_dir,
    _ensure_pair,
    _load_private,
    _locked,
    _parse_public,
    _public_pem,
    _read_key_file,
    ensure_keys,
    key_dir,
    key_id_of,
)

IDENTITIES_DIR = "identities"
POLICY_PRIVATE = "policy_ed25519.pem"
POLICY_PUBLIC = "policy_ed25519.pub.pem"


def check_identity_name(name: str) -> str:
    if not isinstance(name, str) or not IDENTITY_RE.match(name):
        raise InvalidInput(f"identity name {name!r} must start with a letter and hold only letters, digits, '.', '_', '-' "
                           "(at most 64 characters)")
    return name


def _signer(key: ed25519.Ed25519PrivateKey) -> Signer:
    pub = key.public_key()
    return Signer(key_id=key_id_of(pub), public_pem=_public_pem(pub).decode("ascii"), _private=key)


def _identities_dir(*, create: bool) -> Path:
    directory = ensure_keys() if create else key_dir()
    ids = directory / IDENTITIES_DIR
    if create and not os.path.lexists(ids):
        try:
            ids.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise IntegrityError(f"cannot create {ids}: {exc.strerror}") from None
    if os.path.lexists(ids):
        _check_dir(ids)
    return ids


def create_identity(name: str) -> tuple[str, str]:
    """Create the key pair of identity ``name``; return ``(key_id, public PEM)``.

    Refuses (``InvalidInput``) when the identity already has a key: a key is never replaced.
    """
    check_identity_name(name)
    ids = _identities_dir(create=True)
    with _locked(key_dir()):
        if os.path.lexists(ids / f"{name}.pem") or os.path.lexists(ids / f"{name}.pub.pem"):
            raise InvalidInput(f"identity {name!r} already has a key in {ids}; an identity's key is never replaced")
        _ensure_pair(ids, f"{name}.pem", f"{name}.pub.pem", "ed25519")
        key = _load_private(ids, f"{name}.pem", f"{name}.pub.pem", "ed25519")
    signer = _signer(key)
    return signer.key_id, signer.public_pem


def identity_signer(name: str) -> Signer:
    """The signing key of identity ``name`` on this machine (``InvalidInput`` when absent)."""
    check_identity_name(name)
    ids = _identities_dir(create=False)
    if not os.path.lexists(ids / f"{name}.pem"):
        raise InvalidInput(f"this machine holds no private key for identity {name!r} "
                           f"(create one with 'mlsec keys create --identity {name}')")
    with _locked(key_dir()):
        return _signer(_load_private(ids, f"{name}.pem", f"{name}.pub.pem", "ed25519"))


def identity_public(name: str) -> tuple[str, str] | None:
    """``(key_id, public PEM)`` of identity ``name``, or None when this machine has no key for it."""
    check_identity_name(name)
    path = _identities_dir(create=False) / f"{name}.pub.pem"
    if not os.path.lexists(path):
        return None
    key = _parse_public(path, _read_key_file(path, private=False))
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise IntegrityError(f"key file {path} is not an Ed25519 identity key")
    return key_id_of(key), _public_pem(key).decode("ascii")


def local_identities() -> dict[str, str]:
    """Identity name -> key id of every identity public key in this key folder."""
    ids = _identities_dir(create=False)
    out: dict[str, str] = {}
    if os.path.lexists(ids):
        for path in sorted(ids.glob("*.pub.pem")):
            name = path.name.removesuffix(".pub.pem")
            if IDENTITY_RE.match(name):
                found = identity_public(name)
                if found:
                    out[name] = found[0]
    return out


def public_key_from_pem(pem: str, *, what: str) -> PublicKey:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError):
        raise IntegrityError(f"{what}: not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise IntegrityError(f"{what}: not an Ed25519 key")
    return key


def policy_owner_signer(*, create: bool) -> Signer:
    """The policy owner's signing key; with ``create``, made on first use (trust on first use).

    Raises ``InvalidInput`` when this machine holds no policy owner key and ``create`` is False.
    """
    directory = ensure_keys()
    with _locked(directory):
        if not os.path.lexists(directory / POLICY_PRIVATE):
            if not create:
                raise InvalidInput(f"this machine holds no policy owner key ({directory / POLICY_PRIVATE}): only the "
                                   "policy owner can sign the policy")
            _ensure_pair(directory, POLICY_PRIVATE, POLICY_PUBLIC, "ed25519")
        return _signer(_load_private(directory, POLICY_PRIVATE, POLICY_PUBLIC, "ed25519"))


def policy_owner_keys() -> dict[str, PublicKey]:
    """The key id -> public key a signed policy is accepted from (empty when there is none)."""
    path = key_dir() / POLICY_PUBLIC
    if not os.path.lexists(path):
        return {}
    key = _parse_public(path, _read_key_file(path, private=False))
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise IntegrityError(f"key file {path} is not an Ed25519 policy key")
    return {key_id_of(key): key}
