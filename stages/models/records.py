"""What the ledger says about a model version: that the pipeline registered it (with the
digests of its weights and of its signed verdict), and whether it was revoked.

MLflow's registry can be edited by anyone who can write its store; the ledger cannot be
edited without breaking its chain. So a version counts as the pipeline's only when a
``register.version`` entry names it with the digest of the weights it serves, and
``mlsec revoke`` writes a ``model.revoke`` entry that loading and promotion obey (exit 4).
"""

from __future__ import annotations

from typing import Any

from stages.core.errors import IntegrityError, InvalidInput, ModelRevoked
from stages.core.workspace import Workspace
from stages.trust.ledger import Ledger


def _entries(ws: Workspace, event: str) -> list[dict[str, Any]]:
    return [e for e in Ledger(ws.ledger_path).entries() if e.get("event") == event]


def registration(ws: Workspace, name: str, version: str) -> dict[str, Any]:
    """The ledger's ``register.version`` payload for ``name``/``version``; ``IntegrityError`` if none."""
    found = [e["payload"] for e in _entries(ws, "register.version")
             if e["payload"].get("name") == name and str(e["payload"].get("version")) == str(version)]
    if not found or not found[-1].get("weights_sha256"):
        raise IntegrityError(f"{name}/{version} is in MLflow but the ledger holds no registration of it with its "
                             "weights digest: it was not registered by the pipeline (or predates signed registrations)")
    return found[-1]


def revocation(ws: Workspace, *, name: str, version: str | None = None, weights_sha256: str | None = None) -> dict[str, Any] | None:
    """The ``model.revoke`` payload that covers this version or these weights, or None."""
    for entry in reversed(_entries(ws, "model.revoke")):
        p = entry["payload"]
        if (p.get("model") == name and version is not None and str(p.get("version")) == str(version)) or \
                (weights_sha256 is not None and p.get("weights_sha256") == weights_sha256):
            return {**p, "seq": entry["seq"], "time": entry["time"], "actor": entry["actor"]}
    return None


def assert_not_revoked(ws: Workspace, *, name: str, version: str | None = None, weights_sha256: str | None = None) -> None:
    hit = revocation(ws, name=name, version=version, weights_sha256=weights_sha256)
    if hit:
        raise ModelRevoked(f"{hit['model']}/{hit['version']} was revoked by {hit['actor']} at {hit['time']} "
                           f"(ledger seq {hit['seq']}): {hit['reason']}")


def revoke(ws: Workspace, name: str, version: str, *, reason: str) -> dict[str, Any]:
    """Record that ``name``/``version`` (and its weights, wherever they turn up) must not be loaded or promoted."""
    from stages.models.store import client  # MLflow: slow to import, kept off the command line's start

    if not reason or not reason.strip():
        raise InvalidInput("a revocation needs --reason")
    record = registration(ws, name, version)
    if revocation(ws, name=name, version=version):
        raise InvalidInput(f"{name}/{version} is already revoked")
    entry = Ledger(ws.ledger_path).append("model.revoke", {"model": name, "version": str(version),
                                                             "weights_sha256": record["weights_sha256"],
                                                             "reason": reason.strip()})
    client(ws).set_model_version_tag(name, str(version), "mlsec.revoked", f"ledger seq {entry['seq']}: {reason.strip()}"[:500])
    return {"model": name, "version": str(version), "weights_sha256": record["weights_sha256"], "ledger_seq": entry["seq"],
            "reason": reason.strip()}
