"""What an auditor needs to recompute a DP-SGD model's epsilon, and the recomputation itself.

The train stage's privacy report holds every input of the accountant; registration logs them
as MLflow params ``dp.noise_multiplier``, ``dp.sample_rate``, ``dp.steps``, ``dp.accountant``,
``dp.delta`` (plus ``dp.max_grad_norm`` and ``dp.poisson_sampling``) and the metric
``dp.epsilon_spent``. :func:`recompute_epsilon` reads those params back into a fresh Opacus
accountant. Nothing here imports torch, so registration pays nothing for it at start.
"""

from __future__ import annotations

from typing import Any

from stages.core.errors import InvalidInput

AUDIT_PARAMS = ("noise_multiplier", "sample_rate", "steps", "accountant", "delta", "max_grad_norm", "poisson_sampling")


def audit_fields(privacy: dict[str, Any]) -> tuple[dict[str, str], dict[str, float]]:
    """(MLflow params, MLflow metrics) from a privacy report: ``dp.<name>`` for every input of
    the accountant (floats written so that they read back exactly) and ``dp.epsilon_spent``."""
    params = {f"dp.{k}": repr(privacy[k]) if isinstance(privacy[k], float) else str(privacy[k]) for k in AUDIT_PARAMS}
    return params, {"dp.epsilon_spent": float(privacy["epsilon_spent"])}


def recompute_epsilon(logged: dict[str, str]) -> float:
    """Epsilon from logged ``dp.*`` params alone, with Opacus' own accountant: what an auditor
    runs against an MLflow run (``client.get_run(id).data.params``)."""
    from opacus.accountants import (
        create_accountant,  # Opacus: about 3.5 s to import, only when auditing
    )

    try:
        accountant = create_accountant(logged["dp.accountant"])
        accountant.history = [(float(logged["dp.noise_multiplier"]), float(logged["dp.sample_rate"]),
                               int(logged["dp.steps"]))]
        return float(accountant.get_epsilon(delta=float(logged["dp.delta"])))
    except (KeyError, ValueError) as err:
        raise InvalidInput(f"cannot recompute epsilon from the logged DP params: {err!r}") from None
