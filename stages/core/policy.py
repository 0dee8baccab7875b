"""The governed policy and what "weaker" means: pure functions over ``params.yaml``'s
``gate:`` and ``promotion:`` sections (signing them: ``stages.trust.policy``).

A run's effective policy is what its settings say after ``--set``; the signed policy is what
the policy owner signed. :func:`policy_differences` lists every setting where they differ
and whether the run's value is weaker, setting by setting:

* ``min_*`` thresholds: lower, or off (null) where the signed policy has one;
* ``max_*`` thresholds: higher, or off;
* ``min_robust_accuracy``: any signed epsilon missing or with a lower floor;
* ``require_*``: false where the signed policy says true;
* ``no_regression``: off, or a larger tolerance;
* ``promotion.mode``: auto where the signed policy says manual; ``four_eyes``: off where on;
* ``promotion.approvers``, ``promotion.reviewers``: a name the signed policy does not list
  (labels and approvals count only from the signed list, whatever a run's settings say);
* ``promotion.approval_timeout_s``: a difference, never weaker;
* ``gate.table`` (the thresholds for tables): weaker when any setting of the gate as it
  applies to tables is weaker by the rules above;
* anything else (a setting this code does not know): weaker (fail closed).
"""

from __future__ import annotations

from typing import Any

GOVERNED_SECTIONS = ("gate", "promotion")
NEUTRAL = frozenset({"promotion.approval_timeout_s"})


def effective_policy(params: Any) -> dict[str, Any]:
    """The governed part of ``params`` (a ``Params``), as plain JSON values."""
    return {"gate": params.gate.model_dump(mode="json"), "promotion": params.promotion.model_dump(mode="json")}


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def _weaker(key: str, signed: Any, effective: Any) -> bool:
    name = key.rsplit(".", 1)[-1]
    if key in NEUTRAL:
        return False
    if key == "promotion.mode":
        return signed == "manual" and effective != "manual"
    if key in ("promotion.approvers", "promotion.reviewers"):
        return bool(set(effective or []) - set(signed or []))
    if name.startswith("require_") or key == "promotion.four_eyes":
        return bool(signed) and not bool(effective)
    if key == "gate.min_robust_accuracy":
        signed, effective = signed or {}, effective or {}
        return any(eps not in effective or _num(effective[eps]) < _num(floor) for eps, floor in signed.items())
    if key == "gate.no_regression":
        if signed is None:
            return False
        if effective is None:
            return True
        return any(_num(effective.get(k)) is None or _num(effective[k]) > _num(v) for k, v in signed.items())
    if name.startswith("min_"):
        return signed is not None and (effective is None or _num(effective) < _num(signed))
    if name.startswith("max_"):
        return signed is not None and (effective is None or _num(effective) > _num(signed))
    return True  # a setting without known semantics: fail closed


def _for_tables(section: dict[str, Any]) -> dict[str, Any]:
    """A section as it applies to tables: its ``table:`` overlay over its own keys."""
    return {**{k: v for k, v in section.items() if k != "table"}, **(section.get("table") or {})}


def policy_differences(signed: dict[str, Any], effective: dict[str, Any]) -> list[dict[str, Any]]:
    """Every governed setting where ``effective`` differs from ``signed``:
    ``{"setting": "gate.min_clean_accuracy", "signed": 0.9, "effective": 0.0, "weaker": True}``.
    A changed ``table:`` overlay is weaker when the section as it applies to tables is weaker
    in any setting."""
    out = []
    for section in GOVERNED_SECTIONS:
        a, b = signed.get(section) or {}, effective.get(section) or {}
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                key = f"{section}.{name}"
                if name == "table":
                    ta, tb = _for_tables(a), _for_tables(b)
                    weaker = any(_weaker(f"{section}.{k}", ta.get(k), tb.get(k)) for k in set(ta) | set(tb)
                                 if ta.get(k) != tb.get(k))
                else:
                    weaker = _weaker(key, a.get(name), b.get(name))
                out.append({"setting": key, "signed": a.get(name), "effective": b.get(name), "weaker": weaker})
    return out


def describe_differences(differences: list[dict[str, Any]]) -> str:
    """One line: ``gate.min_clean_accuracy 0.9 -> 0.0 (weaker); ...``."""
    return "; ".join(f"{d['setting']} {d['signed']!r} -> {d['effective']!r}{' (weaker)' if d['weaker'] else ''}"
                     for d in differences)
