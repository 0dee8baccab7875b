"""The ``mlsec drill`` command: data, the verified model and the campaign (``flows.drill``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from flows.drill import Target, drill_evasion, drill_extraction
from stages.core.errors import InvalidInput
from stages.core.params import load_params
from stages.core.workspace import Workspace
from stages.trust.ledger import Ledger


def client_of(key: str) -> str | None:
    """The client name a service key carries (``mlsec_<client>_<43 random characters>``)."""
    if key.startswith("mlsec_") and len(key) > 6 + 44 and key[-44] == "_":
        return key[6:-44]
    return None


def run_drill(ws: Workspace, kind: str, *, url: str, key: str, admin_key: str | None, model: str | None, rows: int,
              queries: int) -> dict[str, Any]:
    import torch  # the campaign crafts inputs with torch

    from stages.data.io import load_source
    from stages.models.verify import load_verified_model

    if rows < 10 or queries < 50:
        raise InvalidInput(f"--rows must be at least 10 and --queries at least 50, got {rows} and {queries}")
    params = load_params(ws.params_path)
    ref = model or f"{params.project.name}@champion"
    target = Target(url, key, admin_key)
    champion = load_verified_model(ref)
    data = load_source("sklearn:digits")                  # public data, as an outside attacker would have
    X = np.ascontiguousarray(data.X, dtype=np.float32)
    y = np.asarray(data.y, dtype=np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(X))
    client = client_of(key)
    if kind == "evasion":
        pick = order[:rows]
        report = drill_evasion(target, model=champion, X=X[pick], y=y[pick],
                               epsilons=list(params.serving.detectors.calibration_epsilons), client=client)
    else:
        seeds = np.concatenate([order[y[order] == c][:5] for c in range(10)])
        test = np.setdiff1d(order, seeds)[:500]
        with torch.no_grad():
            labels = champion(torch.from_numpy(X[test])).argmax(1).numpy()
        report = drill_extraction(target, seeds=X[seeds], test=X[test], champion_labels=labels, client=client,
                                  max_queries=queries)
    Ledger(ws.ledger_path).append(f"drill.{kind}", {"url": url, "client": client, "report": report})
    return report
