"""Calibration of the screening thresholds, on seeds the benchmark does not report (100-104).

For each calibration split this records what a grid of thresholds would flag, from the
detectors' own evidence (computed once per split with the thresholds in the code):

``label_issues``  F1 of 10% random flips and the share of clean rows flagged, for each
                  ``LABEL_MAX_PROB`` in ``LABEL_GRID``.
``shortcuts``     poisoned rows caught and clean rows flagged for each (``SHORTCUT_MAX_PROB``,
                  ``SHORTCUT_MIN_DROP``) in ``SHORTCUT_GRID``, and for each
                  ``SHORTCUT_NO_CHANCE`` in ``NO_CHANCE_GRID`` beside the chosen pair, on clean
                  rows and on every trigger family at 1%, 5% and 10%.

``pick`` then chooses, per threshold, the value with the best worst-case F1 (or recall)
over every calibration split whose clean-row flags stay at or below 1%.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from bench.poison.cases import flip_labels
from bench.poison.data import Split
from bench.poison.triggers import Attack, poison
from stages.core.params import ScreenParams

LABEL_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
SHORTCUT_GRID = tuple((p, d) for p in (0.05, 0.1, 0.2) for d in (0.2, 0.3, 0.4, 0.5))
NO_CHANCE_GRID = (0.0, 0.005, 0.01, 0.02, 0.05)  # 0: the (max prob, min drop) rule alone


def _context(X: np.ndarray, y: np.ndarray, screen: ScreenParams) -> Any:
    from stages.screening.context import ScreenContext, check_screen_inputs

    X, y, _, k = check_screen_inputs(X, y, None)
    return ScreenContext(X, y, params=screen, num_classes=k, annotator_labels=None)


def label_grid(split: Split, screen: ScreenParams) -> dict[str, Any]:
    from stages.screening.labels import label_probs

    out: dict[str, Any] = {}
    yn = flip_labels(split.ytr, split.K, rate=0.1, seed=split.seed)
    truth = yn != split.ytr
    for tag, labels in (("flips", yn), ("clean", split.ytr)):
        probs = label_probs(_context(split.Xtr, labels, screen))
        given = probs[np.arange(len(labels)), labels]
        for t in LABEL_GRID:
            flagged = given < t
            if tag == "clean":
                out[f"clean@{t}"] = float(flagged.mean())
            else:
                tp = int((flagged & truth).sum())
                p, r = tp / max(1, int(flagged.sum())), tp / max(1, int(truth.sum()))
                out[f"f1@{t}"] = 2 * p * r / (p + r) if p + r else 0.0
    return out


def shortcut_grid(split: Split, screen: ScreenParams, attacks: list[Attack], rates: list[float]) -> list[dict[str, Any]]:
    from stages.screening.backdoor.shortcuts import SHORTCUT_MAX_PROB, SHORTCUT_MIN_DROP, shortcut_probs

    recs = []
    cases = [("clean", None, 0.0)] + [(a.name, a, r) for a in attacks for r in rates]
    for name, attack, rate in cases:
        if attack is None:
            X, y, truth = split.Xtr, split.ytr, np.zeros(len(split.ytr), dtype=bool)
        else:
            X, y, truth = poison(split.Xtr, split.ytr, attack, rate=rate, seed=split.seed + 3)
        ctx = _context(X, y, screen)
        rows = np.arange(len(y))
        without, doubted = shortcut_probs(ctx)
        before, after = ctx.pred_probs()[rows, y], without[rows, y]
        rec: dict[str, Any] = {"case": name, "rate": rate, "poisoned": int(truth.sum()), "doubted_poisoned": int((doubted & truth).sum())}
        for p, d in SHORTCUT_GRID:
            hit = doubted & (after < p) & (before - after >= d)
            rec[f"{p}/{d}"] = [int((hit & truth).sum()), int((hit & ~truth).sum())]
        fell = (after < SHORTCUT_MAX_PROB) & (before - after >= SHORTCUT_MIN_DROP)
        for n in NO_CHANCE_GRID:
            hit = doubted & (fell | (after < n))
            rec[f"no-chance {n}"] = [int((hit & truth).sum()), int((hit & ~truth).sum())]
        recs.append(rec)
    return recs


def pick(records: list[dict[str, Any]]) -> str:
    """Markdown: per grid value, the worst and mean figure over the calibration splits."""
    lines = []
    labels = [r for r in records if r["section"] == "calibrate" and r["case"] == "label_issues"]
    if labels:
        lines += ["### label_issues: LABEL_MAX_PROB", "", "| value | F1 mean | F1 worst | worst dataset | clean flags % worst |", "|---|---|---|---|---|"]
        for t in LABEL_GRID:
            f1 = [(r[f"f1@{t}"], r["dataset"]) for r in labels]
            worst = min(f1)
            lines.append(f"| {t} | {np.mean([v for v, _ in f1]):.3f} | {worst[0]:.3f} | {worst[1]} | {100 * max(r[f'clean@{t}'] for r in labels):.2f} |")
    shortcuts = [r for r in records if r["section"] == "calibrate" and r["case"] == "shortcuts"]
    if shortcuts:
        lines += ["", "### shortcuts: (SHORTCUT_MAX_PROB, SHORTCUT_MIN_DROP), and SHORTCUT_NO_CHANCE beside the chosen pair", "",
                  "| value | poisoned caught (all cases) | clean rows flagged on clean data, worst split | false flags, all poisoned cases |", "|---|---|---|---|"]
        grid = [f"{p}/{d}" for p, d in SHORTCUT_GRID] + [f"no-chance {n}" for n in NO_CHANCE_GRID]
        for value in grid:
            if any(value not in c for r in shortcuts for c in r["cases"]):
                continue  # recorded before this grid value existed
            caught = total = clean_worst = false = 0
            by_split: dict[tuple, int] = defaultdict(int)
            for r in shortcuts:
                for c in r["cases"]:
                    tp, fp = c[value]
                    if c["case"] == "clean":
                        clean_worst = max(clean_worst, fp / max(1, r["rows"]))
                    else:
                        caught, total, false = caught + tp, total + c["poisoned"], false + fp
                        by_split[(r["dataset"], r["seed"])] += fp
            lines.append(f"| {value.replace('/', ', ')} | {caught}/{total} ({caught / max(1, total):.1%}) | {100 * clean_worst:.2f}% | {false} |")
    return "\n".join(lines)
