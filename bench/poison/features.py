"""Whether a detector on learned features earns a place: spectral signatures (Tran et al.) on
the penultimate features of the screening network, as published, measured alone.

The screen does not run it (``stages/screening/backdoor/spectral.py`` splits the cross-class
residuals in input space instead); this section keeps the measurement that decided it:
on each split, the rows it would flag on clean data and, for every trigger family at the
given rates, the poisoned rows it catches and the clean rows it flags.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bench.poison.data import Split
from bench.poison.report import trigger
from bench.poison.triggers import Attack, poison
from stages.core.params import ScreenParams


def feature_flags(X: np.ndarray, y: np.ndarray, screen: ScreenParams) -> np.ndarray:
    """Mask of the rows the class splits of ``spectral`` flag on the screening network's
    penultimate features (the network the screen trains: same view, epochs and seed)."""
    from stages.screening.backdoor.spectral import _spectral_on
    from stages.screening.evidence import _batched, _train_net, screening_view
    from stages.screening.neighbours import _cross_class_residuals

    view = screening_view(X)
    model, _ = _train_net(view, y, int(y.max()) + 1, epochs=screen.backdoor_epochs, seed=screen.seed)
    feats = _batched(model, torch.from_numpy(view), lambda out, sl: out, forward="features_of")
    residuals = _cross_class_residuals(X.reshape(len(X), -1), y)  # for the rows of each class and its neighbour purity
    idx, _, _, _ = _spectral_on({c: (ic, feats[ic], pur) for c, (ic, _, pur) in residuals.items()}, "penultimate-feature signature")
    mask = np.zeros(len(y), dtype=bool)
    mask[idx] = True
    return mask


def features_case(split: Split, screen: ScreenParams, attacks: list[Attack], rates: list[float]) -> list[dict[str, Any]]:
    recs = [{"case": "clean", "rate": 0.0, "poisoned": 0, "caught": 0, "clean_flagged": int(feature_flags(split.Xtr, split.ytr, screen).sum())}]
    for attack in attacks:
        for rate in rates:
            X, y, truth = poison(split.Xtr, split.ytr, attack, rate=rate, seed=split.seed + 3)
            m = feature_flags(X, y, screen)
            recs.append({"case": attack.name, "rate": rate, "poisoned": int(truth.sum()), "caught": int((m & truth).sum()),
                         "clean_flagged": int((m & ~truth).sum())})
    return recs


def features_table(records: list[dict[str, Any]]) -> str:
    out = ["| dataset | seeds | case | rate | poisoned rows caught | clean rows flagged (mean, worst) |", "|---|---|---|---|---|---|"]
    rows: dict[tuple, list] = {}
    for r in records:
        for c in r["cases"]:
            rows.setdefault((r["dataset"], trigger(c["case"]), c["rate"]), []).append((r["seed"], c))
    for (ds, case, rate), cs in rows.items():
        caught, total = sum(c["caught"] for _, c in cs), sum(c["poisoned"] for _, c in cs)
        fl = [c["clean_flagged"] for _, c in cs]
        seeds = ",".join(str(s) for s in sorted({s for s, _ in cs}))
        out.append(f"| {ds} | {seeds} | {case} | {rate:.0%} | {caught}/{total} | {np.mean(fl):.1f}, {max(fl)} |")
    return "\n".join(out)
