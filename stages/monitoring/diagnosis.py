"""Tell drift from attack in a window of telemetry (the degradation-response report).

Drift moves many clients' inputs the same way, and the input detector stays quiet on them,
since drifted inputs are still plausible inputs; an attack comes from few clients, and
their inputs are flagged (evasion) or their query streams are (extraction). The report
gives the evidence for each reading and the verdict: ``attack``, ``drift``, ``attack and
drift`` or ``inconclusive``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


def diagnose(predictions: list[dict[str, Any]], alerts: list[dict[str, Any]], *, max_detector_rate: float,
             low_confidence: float) -> dict[str, Any]:
    """``predictions`` and ``alerts``: telemetry rows of the window (``stages.monitoring.store``)."""
    n = len(predictions)
    flagged = [p for p in predictions if p["flagged"]]
    by_client = Counter(p["client"] for p in flagged)
    top_client, top_count = by_client.most_common(1)[0] if by_client else (None, 0)
    kinds = Counter(a["kind"] for a in alerts)
    evidence = {
        "predictions": n,
        "clients": len({p["client"] for p in predictions}),
        "flagged_share": round(len(flagged) / n, 4) if n else 0.0,
        "low_confidence_share": round(sum(p["confidence"] < low_confidence for p in predictions) / n, 4) if n else 0.0,
        "flagged_by_top_client": {"client": top_client, "share": round(top_count / len(flagged), 4) if flagged else 0.0},
        "extraction_flagged_clients": sorted({p["client"] for p in predictions if p["extraction_flagged"]}),
        "alerts": dict(kinds),
    }
    attack_reasons, drift_reasons = [], []
    if evidence["extraction_flagged_clients"] or kinds.get("extraction"):
        attack_reasons.append("clients flagged for model extraction")
    if evidence["flagged_share"] > max_detector_rate and evidence["flagged_by_top_client"]["share"] >= 0.5:
        attack_reasons.append(f"{evidence['flagged_share']:.0%} of inputs flagged, most of them from client {top_client!r}")
    elif kinds.get("evasion"):
        attack_reasons.append("evasion alerts (a high share of flagged inputs)")
    if kinds.get("drift"):
        spread = evidence["flagged_share"] <= max_detector_rate
        drift_reasons.append("drift alerts" + (" while the input detector stayed quiet" if spread else ""))
    verdict = ("attack and drift" if attack_reasons and drift_reasons else "attack" if attack_reasons
               else "drift" if drift_reasons else "inconclusive")
    return {"verdict": verdict, "attack_evidence": attack_reasons, "drift_evidence": drift_reasons, "evidence": evidence}
