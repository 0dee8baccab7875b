"""How well random label flips can be found at all: the screen's own models, fitted on the
true labels (which no screen has), flag each row whose given label they rate below a
threshold, and the threshold is picked in hindsight, the one with the best mean F1 over
the seeds. A screen with these models sees only the flipped labels: it cannot be expected to
do better.

Where two classes overlap (breast cancer's benign and malignant rows), a flipped row that
lies on the other class's side carries the label its content suggests, and a clean row
there looks flipped: no rule on the rows and their labels tells those apart.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.poison.calibrate import _context
from bench.poison.cases import flip_labels, prf
from bench.poison.data import Split
from stages.core.params import ScreenParams

GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


def ceiling_case(split: Split, screen: ScreenParams, *, rate: float) -> dict[str, Any]:
    """F1 of flagging p(given label) < t, for each t of ``GRID``, with the K-fold
    out-of-sample probabilities of the screening models fitted on the true labels; the
    flips are those of the ``flips`` section (same rate and seed)."""
    yn = flip_labels(split.ytr, split.K, rate=rate, seed=split.seed)
    truth = yn != split.ytr
    probs = _context(split.Xtr, split.ytr, screen).pred_probs()
    given = probs[np.arange(len(yn)), yn]
    return {"flipped": int(truth.sum()), **{f"f1@{t}": prf(given < t, truth)["f1"] for t in GRID}}


def ceiling_table(records: list[dict[str, Any]]) -> str:
    """Per dataset and flip rate: the best threshold in hindsight and its F1 (mean, worst,
    per seed), beside the screen's F1 on the same flips where the ``flips`` section ran."""
    out = ["| dataset | flips | seeds | best threshold | F1 mean | F1 worst | per seed | the screen's F1 (mean, worst) |",
           "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r["section"] == "ceiling":
            groups.setdefault((r["dataset"], r["case"]), []).append(r)
    for (ds, case), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["seed"])
        best = max(GRID, key=lambda t: np.mean([r[f"f1@{t}"] for r in rs]))
        f1 = [r[f"f1@{best}"] for r in rs]
        seeds = {r["seed"] for r in rs}
        screen = [r["f1"] for r in records if r["section"] == "flips" and r["dataset"] == ds and r["case"] == case
                  and r["seed"] in seeds]
        measured = f"{np.mean(screen):.3f}, {min(screen):.3f}" if len(screen) == len(seeds) else "-"
        out.append(f"| {ds} | {case} | {','.join(str(s) for s in sorted(seeds))} | {best} | {np.mean(f1):.3f} | {min(f1):.3f} | "
                   f"{' '.join(f'{v:.3f}' for v in f1)} | {measured} |")
    return "\n".join(out)
