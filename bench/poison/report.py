"""Markdown tables from the benchmark's JSON-lines records: mean, worst and spread over seeds."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stat(values: list[float], *, worst: str) -> str:
    """``mean ± SD (worst)`` over seeds; ``worst`` is ``min`` or ``max``."""
    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return "-"
    w = v.min() if worst == "min" else v.max()
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f} ({w:.3f})" if len(v) > 1 else f"{v.mean():.3f}"


def trigger(name: str) -> str:
    """An attack's name without its seed-drawn table columns ("columns 5,16: rare pair" ->
    "columns a,b: rare pair"), so that the seeds of one table trigger are one row."""
    return re.sub(r"and \d+,\d+", "and c,d", re.sub(r"columns \d+,\d+", "columns a,b", name))


def _seeds(rows: list[dict[str, Any]]) -> str:
    return ",".join(str(s) for s in sorted({r["seed"] for r in rows}))


def _load(rows: list[dict[str, Any]]) -> str:
    loads = [r.get("load", float("nan")) for r in rows]
    return f"{np.nanmin(loads):.1f}-{np.nanmax(loads):.1f}"


def clean_table(recs: list[dict[str, Any]]) -> str:
    out = ["| dataset | seeds | rows | flagged % mean ± SD (worst) | per detector (mean flags) | clean acc | logistic regression acc | screening s | load |",
           "|---|---|---|---|---|---|---|---|---|"]
    by = defaultdict(list)
    for r in recs:
        by[r["dataset"]].append(r)
    for ds, rows in by.items():
        dets = defaultdict(list)
        for r in rows:
            for k, v in r["per_detector"].items():
                dets[k].append(v["flagged"])
        per = ", ".join(f"{k} {np.mean(v):.1f}" for k, v in dets.items() if np.mean(v) > 0) or "none"
        out.append(f"| {ds} | {_seeds(rows)} | {rows[0]['rows']} | {_stat([100 * r['flagged_fraction'] for r in rows], worst='max')} | {per} "
                   f"| {_stat([r['clean_acc'] for r in rows], worst='min')} | {_stat([r.get('logreg_acc') for r in rows], worst='min')} "
                   f"| {np.mean([r['screen_s'] for r in rows]):.0f} | {_load(rows)} |")
    return "\n".join(out)


def flips_table(recs: list[dict[str, Any]]) -> str:
    out = ["| dataset | flips | seeds | flipped | F1 mean ± SD (worst) | precision | recall | F1 label_issues only | screening s | load |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    by = defaultdict(list)
    for r in recs:
        by[(r["dataset"], r["case"])].append(r)
    for (ds, case), rows in by.items():
        out.append(f"| {ds} | {case} | {_seeds(rows)} | {np.mean([r['flipped'] for r in rows]):.0f} | {_stat([r['f1'] for r in rows], worst='min')} "
                   f"| {_stat([r['precision'] for r in rows], worst='min')} | {_stat([r['recall'] for r in rows], worst='min')} "
                   f"| {_stat([r['f1_label_issues'] for r in rows], worst='min')} | {np.mean([r['screen_s'] for r in rows]):.0f} | {_load(rows)} |")
    return "\n".join(out)


def backdoor_table(recs: list[dict[str, Any]]) -> str:
    out = ["| dataset | trigger | family | rate | seeds | recall mean ± SD (worst) | precision | ASR clean | ASR undefended | ASR defended mean ± SD (worst) "
           "| ASR defended - clean (worst) | acc undefended | acc defended | screening s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = defaultdict(list)
    for r in recs:
        by[(r["dataset"], trigger(r["attack"]), r["rate"])].append(r)
    for (ds, attack, rate), rows in by.items():
        fam = rows[0]["family"] + (" (new)" if rows[0].get("new") else "")
        out.append(f"| {ds} | {attack} | {fam} | {rate:.0%} | {_seeds(rows)} | {_stat([r['recall'] for r in rows], worst='min')} "
                   f"| {_stat([r['precision'] for r in rows], worst='min')} | {_stat([r['asr_clean'] for r in rows], worst='max')} "
                   f"| {_stat([r['asr_undefended'] for r in rows], worst='max')} | {_stat([r['asr_defended'] for r in rows], worst='max')} "
                   f"| {max(r['asr_defended'] - r['asr_clean'] for r in rows):.3f} "
                   f"| {_stat([r['acc_undefended'] for r in rows], worst='min')} | {_stat([r['acc_defended'] for r in rows], worst='min')} "
                   f"| {np.mean([r['screen_s'] for r in rows]):.0f} |")
    return "\n".join(out)


def scan_table(recs: list[dict[str, Any]]) -> str:
    out = ["| dataset | model | seeds | models | anomaly index mean (max) | flagged at the gate's threshold | scan s |", "|---|---|---|---|---|---|---|"]
    by = defaultdict(list)
    for r in recs:
        by[(r["dataset"], r["model"])].append(r)
    for (ds, model), rows in by.items():
        idx = [r["max_anomaly_index"] for r in rows]
        flagged = sum(r["flagged"] for r in rows)
        out.append(f"| {ds} | {model} | {_seeds(rows)} | {len(rows)} | {np.mean(idx):.2f} ({np.max(idx):.2f}) | {flagged} of {len(rows)} "
                   f"| {np.mean([r['seconds'] for r in rows]):.0f} |")
    return "\n".join(out)


def render(records: list[dict[str, Any]]) -> str:
    parts = []
    by = defaultdict(list)
    for r in records:
        by[r["section"]].append(r)
    titles = {"clean": ("Clean data", clean_table), "flips": ("Label flips", flips_table),
              "backdoors": ("Backdoors", backdoor_table), "scan": ("Model-level backdoor scan", scan_table)}
    for section, (title, fn) in titles.items():
        if by.get(section):
            parts.append(f"## {title}\n\n{fn(by[section])}\n")
    return "\n".join(parts)
