"""The model inventory: every registered model with its versions, aliases, owner, purpose, risk
class, data sources, and whether its aliases agree with the ledger."""

from __future__ import annotations

from typing import Any

from stages.core.workspace import Workspace
from stages.models.aliases import alias_drift
from stages.models.records import revocation
from stages.models.store import client


def inventory(ws: Workspace) -> list[dict[str, Any]]:
    """Every registered model with versions, aliases, owner, purpose, risk class, data sources
    and whether its aliases agree with the ledger."""
    c = client(ws)
    out = []
    for rm in c.search_registered_models():
        versions = c.search_model_versions(f"name='{rm.name}'")
        tags = dict(rm.tags or {})
        out.append({
            "name": rm.name,
            "owner": tags.get("mlsec.owner"), "purpose": tags.get("mlsec.purpose"), "risk_class": tags.get("mlsec.risk_class"),
            "aliases": {a: str(v) for a, v in (rm.aliases or {}).items()},
            "alias_drift": alias_drift(ws, rm.name),
            "versions": sorted(({"version": str(v.version), "run_id": (v.tags or {}).get("mlsec.run_id"),
                                 "verdict": (v.tags or {}).get("mlsec.verdict"), "data_sha256": (v.tags or {}).get("mlsec.data_sha256"),
                                 "data_source": (v.tags or {}).get("mlsec.data_source"),
                                 "robust_accuracy": (v.tags or {}).get("mlsec.robust_accuracy"),
                                 "dp_epsilon": (v.tags or {}).get("mlsec.dp_epsilon"),
                                 "revoked": bool(revocation(ws, name=rm.name, version=str(v.version))),
                                 "created": v.creation_timestamp} for v in versions), key=lambda v: int(v["version"])),
        })
    return out
