"""Gate: a fail-closed security decision with evidence, written as one signed verdict.

:func:`decide` is pure: evidence + policy (+ the champion's metrics) -> verdict. With no
thresholds configured it rejects (it will not bless by accident); a check whose input is
missing fails. :func:`run` gathers the evidence from the run's verified records, decides
under the run's settings and under the signed policy (``stages.trust.policy``), signs the
verdict (bound to the weights' SHA-256, with the signed policy's digest and every setting
in which the run differs from it) and writes a ledger entry. Registration refuses without a
passing, correctly signed verdict for the same weights; promotion refuses to promote
automatically what was blessed under a weakened policy.
"""

from __future__ import annotations

import json
import time
from typing import Any

from stages.core.errors import GateRejected
from stages.core.params import GateParams, Params
from stages.core.policy import describe_differences, effective_policy, policy_differences
from stages.core.workspace import actor
from stages.runner import stage_main
from stages.trust.context import RunContext
from stages.trust.policy import SignedPolicy, policy_for_run
from stages.trust.signing import sign_document
from stages.trust.verdict import VERDICT_SCHEMA

STAGE = "gate"


def _check(name: str, value: Any, threshold: Any, passed: bool, reason: str) -> dict[str, Any]:
    return {"name": name, "value": value, "threshold": threshold, "passed": bool(passed), "reason": reason}


def _at_least(name: str, value: float | None, threshold: float) -> dict[str, Any]:
    if value is None:
        return _check(name, None, threshold, False, "input missing: check cannot run, counted as failed")
    ok = value >= threshold
    return _check(name, round(float(value), 6), threshold, ok, f"{value:.4f} {'>=' if ok else '<'} {threshold}")


def _at_most(name: str, value: float | None, threshold: float) -> dict[str, Any]:
    if value is None:
        return _check(name, None, threshold, False, "input missing: check cannot run, counted as failed")
    ok = value <= threshold
    return _check(name, round(float(value), 6), threshold, ok, f"{value:.4f} {'<=' if ok else '>'} {threshold}")


def sample_lower_bound(accuracy: float, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower bound of an accuracy measured on ``n`` rows drawn at
    random: the true figure is at least this with probability ``confidence``. Conservative
    for rows drawn without replacement from a finite set (their count varies less)."""
    from scipy.stats import beta  # SciPy: slow to import, only a sampled evaluation needs it

    k = int(round(accuracy * n))
    return 0.0 if k <= 0 else float(beta.ppf(1.0 - confidence, k, n - k + 1))


def _robust_check(eps: float, metrics: dict[str, Any], evaluated_rows: int | None, threshold: float,
                  confidence: float | None, full_strength: list[float] | None = None) -> dict[str, Any]:
    """Robust accuracy at ``eps``: the figure itself when every evaluated row was attacked; when
    the attacks ran on a sample (``evaluate.attack_rows``), its lower confidence bound, so that a
    small sample cannot pass by luck. An evaluation that does not say how many rows it
    evaluated is taken as a sample of the rows it attacked. A figure measured with the curve's
    cheaper attacks only (``eps`` not in the evaluation's ``full_strength`` epsilons) fails:
    it would overstate robustness. An evaluation that does not list them ran every attack at
    every epsilon."""
    name = f"robust_accuracy@{eps:g}"
    value, n = metrics.get(f"robust_accuracy_eps_{eps:g}"), metrics.get("attacked_rows")
    if value is not None and full_strength is not None and float(eps) not in {float(e) for e in full_strength}:
        return _check(name, round(float(value), 6), threshold, False,
                      f"measured with evaluate.curve_attacks only (full strength at {sorted(full_strength)}): "
                      "not a figure to decide on, counted as failed")
    if value is None or n is None or confidence is None or (evaluated_rows is not None and n >= evaluated_rows):
        return _at_least(name, value, threshold)
    n = int(n)
    bound = sample_lower_bound(float(value), n, confidence)
    ok = bound >= threshold
    of = f"{n} of {evaluated_rows}" if evaluated_rows is not None else f"{n}"
    return _check(name, round(bound, 6), threshold, ok,
                  f"lower {confidence:g} confidence bound {bound:.4f} {'>=' if ok else '<'} {threshold} "
                  f"(measured {float(value):.4f} on a sample of {of} rows)")


def _backdoor_check(value: float | None, scan: dict[str, Any] | None, threshold: float) -> dict[str, Any]:
    """The model-level backdoor scan: the largest anomaly index of any class's smallest trigger."""
    if value is None:
        why = (scan or {}).get("error") or "scan did not run"
        return _check("backdoor_scan", None, threshold, False, f"{why}: check cannot run, counted as failed")
    ok = value <= threshold
    detail = ""
    if scan and scan.get("classes"):
        top = scan["classes"][int(scan["suspect_class"])]
        detail = (f"; class {top['class']} reachable with a {top['trigger_size']:g}-{scan['size_unit']} trigger "
                  f"(median class {scan['median_trigger_size']:g})")
    return _check("backdoor_scan", round(float(value), 6), threshold, ok, f"anomaly index {value:.2f} {'<=' if ok else '>'} {threshold}{detail}")


def decide(evidence: dict[str, Any], policy: GateParams, *, champion: dict[str, Any] | None) -> dict[str, Any]:
    """Apply the policy to the evidence. ``evidence`` keys: metrics (dict), validation_passed,
    integrity_verified, flagged_fraction, backdoor_scan (the scan's report, for the reason),
    evaluated_rows (held-out rows evaluated, of which ``metrics["attacked_rows"]`` were
    attacked), full_strength_epsilons (where every attack ran; None: everywhere), data_kind
    (the policy's per-kind thresholds apply: ``gate.table`` for tables).
    ``champion``: None or {"version", "metrics"} (from the champion's signed verdict;
    ``"revoked": True`` when it was revoked)."""
    policy = policy.for_kind(evidence.get("data_kind"))
    metrics = evidence.get("metrics") or {}
    checks: list[dict[str, Any]] = []
    if policy.min_clean_accuracy is not None:
        checks.append(_at_least("clean_accuracy", metrics.get("clean_accuracy"), policy.min_clean_accuracy))
    if policy.min_clean_accuracy_all_test is not None:
        checks.append(_at_least("clean_accuracy_all_test", metrics.get("clean_accuracy_all_test"),
                                policy.min_clean_accuracy_all_test))
    if policy.max_test_flagged_fraction is not None:
        checks.append(_at_most("test_flagged_fraction", metrics.get("test_flagged_fraction"), policy.max_test_flagged_fraction))
    for eps, threshold in sorted(policy.min_robust_accuracy.items()):
        checks.append(_robust_check(eps, metrics, evidence.get("evaluated_rows"), threshold, policy.min_sample_confidence,
                                    evidence.get("full_strength_epsilons")))
    if policy.max_dp_epsilon is not None:
        checks.append(_at_most("dp_epsilon", metrics.get("dp_epsilon"), policy.max_dp_epsilon))
    if policy.max_mia_auc is not None:
        checks.append(_at_most("mia_auc", metrics.get("mia_auc"), policy.max_mia_auc))
    if policy.max_flagged_fraction is not None:
        checks.append(_at_most("flagged_fraction", evidence.get("flagged_fraction"), policy.max_flagged_fraction))
    if policy.max_backdoor_anomaly is not None:
        checks.append(_backdoor_check(metrics.get("backdoor_anomaly_index"), evidence.get("backdoor_scan"), policy.max_backdoor_anomaly))
    if policy.require_validation:
        v = evidence.get("validation_passed")
        checks.append(_check("validation", v, True, v is True, "suite passed" if v is True else "validation did not pass or did not run"))
    if policy.require_integrity:
        v = evidence.get("integrity_verified")
        checks.append(_check("integrity", v, True, v is True, "all inputs matched their records" if v is True else "integrity not verified"))
    if policy.no_regression is not None:
        if champion is None:
            checks.append(_check("no_regression", None, None, True, "no champion yet: nothing to regress against"))
        elif champion.get("revoked"):
            checks.append(_check("no_regression", None, None, True,
                                 f"champion v{champion.get('version')} is revoked: nothing to regress against"))
        else:
            tol = policy.no_regression
            for key, allowed in (("clean_accuracy", tol.clean_accuracy), ("robust_accuracy", tol.robust_accuracy)):
                mine, theirs = metrics.get(key), (champion.get("metrics") or {}).get(key)
                name = f"no_regression.{key}"
                if mine is None or theirs is None:
                    checks.append(_check(name, mine, None, False, f"cannot compare with champion v{champion.get('version')}: metric missing"))
                    continue
                floor = round(float(theirs) - allowed, 6)
                ok = mine >= floor
                checks.append(_check(name, round(float(mine), 6), floor, ok,
                                     f"{mine:.4f} vs champion v{champion.get('version')} {theirs:.4f} - {allowed}"))
    thresholds = [c for c in checks if c["name"] not in ("validation", "integrity", "no_regression")]
    if not thresholds:
        checks.append(_check("policy", None, None, False, "no thresholds configured: refusing to bless (fail closed)"))
    passed = bool(checks) and all(c["passed"] for c in checks)
    return {"passed": passed, "checks": checks, "failed": [c["name"] for c in checks if not c["passed"]]}


def policy_record(signed: SignedPolicy, params: Params, evidence: dict[str, Any],
                  champion: dict[str, Any] | None) -> dict[str, Any]:
    """The verdict's ``policy`` section: the signed policy, the run's, and how they differ."""
    effective = effective_policy(params)
    differences = policy_differences(signed.policy, effective)
    under_signed = decide(evidence, GateParams.model_validate(signed.payload["gate"]), champion=champion)
    return {"signed_sha256": signed.sha256, "signed_by": signed.key_id, "trust": signed.payload.get("trust"),
            "effective": effective, "overridden": bool(differences), "weakened": any(d["weaker"] for d in differences),
            "differences": differences, "summary": describe_differences(differences) or "as signed",
            "signed_policy_passed": under_signed["passed"], "signed_policy_failed": under_signed["failed"]}


def run(ctx: RunContext, params: Params, *, champion: dict[str, Any] | None = None, raise_on_reject: bool = False,
        triggered_by: str | None = None) -> dict[str, Any]:
    signed = policy_for_run(ctx.ws)
    integrity = ctx.verify_all(where=STAGE)
    inputs = ctx.input_bytes("validation", "screen_report", "evaluation", where=STAGE)
    evaluation = json.loads(inputs["evaluation"])
    records = ctx.recorded(where=STAGE)
    evidence = {
        "metrics": evaluation["metrics"],
        "validation_passed": bool(json.loads(inputs["validation"]).get("success")),
        "integrity_verified": integrity,
        "flagged_fraction": json.loads(inputs["screen_report"]).get("flagged_fraction"),
        "data_kind": ctx.manifest(where=STAGE).get("kind"),
        "backdoor_scan": evaluation.get("backdoor_scan"),
        "evaluated_rows": evaluation.get("n_test"),
        "full_strength_epsilons": evaluation.get("robustness", {}).get("full_strength_epsilons"),
    }
    decision = decide(evidence, params.gate, champion=champion)
    verdict = {
        "schema": VERDICT_SCHEMA,
        "run_id": ctx.run_id,
        "verdict": "BLESSED" if decision["passed"] else "NOT_BLESSED",
        **decision,
        "weights_sha256": records["weights"]["sha256"],
        "model_config_sha256": records["model_config"]["sha256"],
        "data_sha256": ctx.manifest(where=STAGE)["merkle_root"],
        "metrics": evaluation["metrics"],
        # the evidence read, by digest: promotion takes the drift statistics from exactly these bytes
        "evidence_sha256": {name: records[name]["sha256"] for name in ("validation", "screen_report", "evaluation")},
        "policy": policy_record(signed, params, evidence, champion),
        "data_kind": evidence["data_kind"],
        "triggered_by": triggered_by or actor(),
        "champion": champion,
        "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = ctx.write_output_json(STAGE, "verdict", "verdict.json", sign_document(verdict))
    ctx.log("gate.verdict", {"verdict": verdict["verdict"], "failed": decision["failed"], "weights_sha256": verdict["weights_sha256"],
                             "verdict_path": str(path.relative_to(ctx.ws.root)),
                             "policy_sha256": signed.sha256, "policy_overridden": verdict["policy"]["overridden"],
                             "policy_weakened": verdict["policy"]["weakened"], "policy_differences": verdict["policy"]["summary"]})
    if raise_on_reject and not decision["passed"]:
        raise GateRejected(rejection_message(verdict))
    return {"passed": decision["passed"], "checks": decision["checks"], "verdict_path": str(path)}


def rejection_message(verdict: dict[str, Any]) -> str:
    failed = [c for c in verdict["checks"] if not c["passed"]]
    parts = [f"{c['name']} ({c['reason']})" for c in failed[:3]]
    more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
    return f"gate rejected the model: {'; '.join(parts)}{more}"


def main(argv: list[str] | None = None) -> int:
    def gate_and_raise(ctx: RunContext, params: Params) -> dict[str, Any]:
        from stages.models.promotion import champion_summary  # MLflow: slow to import

        return run(ctx, params, champion=champion_summary(ctx.ws, params.project.name), raise_on_reject=True,
                   triggered_by=actor())

    return stage_main(STAGE, gate_and_raise, argv)


if __name__ == "__main__":
    raise SystemExit(main())
