"""Benchmark the data defences against label flips and backdoors, over seeds and datasets.

Each (section, dataset, seed, case) is one JSON line in ``--out`` (default
``bench/out/poisoning.jsonl``; cases already there for the same recipe, settings and code, are skipped, so an
interrupted run resumes); the Markdown tables (mean, worst and spread over seeds) are printed from that
file at the end, or alone with ``--report``. Runs are long on a small CPU: run pieces in
the background under ``nice`` and combine them through the one file.

Sections:
  clean      flags on clean training rows; clean accuracy of the final model (tables: and of
             logistic regression on the same rows)
  flips      random label flips (10%; ``--flip-rates``): precision, recall, F1 of the flags
  targeted   rows of classes 1 and 4 relabelled 7, and half of class 1 relabelled 7 (images)
  backdoors  every trigger family at 1%, 5% and 10% (``--rates``): recall and precision of
             the flags, attack success (ASR) on the clean, undefended and defended models
  scan       the model-level backdoor scan on the clean model and on every undefended
             (and defended) backdoored model of the ``backdoors`` section
  features   spectral signatures on the screening network's learned features, alone (the
             measurement that keeps them out of the screen; ``bench/poison/features.py``)
  ceiling    the same flips found by the screen's models fitted on the true labels, at the
             best threshold in hindsight: what the screen cannot be expected to beat
             (``bench/poison/ceiling.py``)
  calibrate-labels, calibrate-shortcuts
             what a grid of detector thresholds would flag (``bench/poison/calibrate.py``);
             run them on the calibration seeds (100-104), never on the reported ones

Seeds draw the split (and the MNIST subset); thresholds were calibrated on seeds 100-104,
so measure on others (the default 0-4).

``--quick`` (what fits in about an hour on two CPU cores): one trigger per family (the
first listed), a plain quick network as the final model on images (tables keep the train
stage's fit), and on MNIST the ``clean`` and ``flips`` sections only.

    python -m bench.poisoning --datasets digits wine --seeds 0 1 2 3 4 --sections clean flips
    python -m bench.poisoning --datasets mnist --sections backdoors scan --families "random position"
    python -m bench.poisoning --quick --datasets digits mnist breast_cancer wine
    python -m bench.poisoning --report
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script too

from bench.poison import calibrate, cases, ceiling, features
from bench.poison.data import DATASETS, load_split, mnist_available
from bench.poison.report import read_records, render
from bench.poison.triggers import Attack, image_attacks, table_attacks
from stages.core.params import load_params

SECTIONS = ("clean", "flips", "targeted", "backdoors", "scan", "features", "ceiling", "calibrate-labels", "calibrate-shortcuts")
OUT = Path(__file__).resolve().parent / "out" / "poisoning.jsonl"


def recipe_digest(args: argparse.Namespace) -> str:
    """A digest (16 hex digits of SHA-256) naming what a record measured: the settings (params file, overrides, the
    options that shape a case) and the code (git's tree of ``stages`` and ``bench``, plus any
    uncommitted change there). An interrupted run resumes only its own recipe's cases; after a
    change to the detectors or the bench every case is measured again."""
    root = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout  # noqa: E731
    settings = {"params": load_params(args.params, args.overrides).model_dump(mode="json"), "final": args.final,
                "quick": args.quick, "rates": args.rates, "flip_rates": args.flip_rates, "scan_rates": args.scan_rates}
    code = git("rev-parse", "HEAD:stages", "HEAD:bench") + git("diff", "HEAD", "--", "stages", "bench")
    if not code.strip():
        code = "no git"   # outside a git checkout: settings only
    return hashlib.sha256((json.dumps(settings, sort_keys=True) + code).encode()).hexdigest()[:16]


def _write(out: Path, rec: dict[str, Any]) -> None:
    rec = {**rec, "load": round(os.getloadavg()[0], 2), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(json.dumps({k: v for k, v in rec.items() if k not in ("per_detector",)}), file=sys.stderr, flush=True)


def _selected(attacks: list[Attack], args: argparse.Namespace) -> list[Attack]:
    """The attacks ``--families`` names (all by default); with ``--quick`` the first of each family."""
    out, families = [], set()
    for a in attacks:
        if args.families and not any(f in a.family or f in a.name for f in args.families):
            continue
        if args.quick and a.family in families:
            continue
        families.add(a.family)
        out.append(a)
    return out


def run_dataset(name: str, seed: int, args: argparse.Namespace, done: set[tuple], out: Path) -> None:
    params = load_params(args.params, args.overrides)
    screen = params.screen
    split = load_split(name, seed=seed)
    plain = name == "mnist" or (args.quick and not split.is_table)
    train = cases.make_trainer(args.final or ("plain" if plain else "pipeline"), params, split=split, seed=seed)
    sections = [s for s in args.sections if not (args.quick and name == "mnist" and s not in ("clean", "flips"))]
    args = argparse.Namespace(**{**vars(args), "sections": sections})
    key = lambda section, case, rate=None: (section, name, seed, case, rate)  # noqa: E731
    scan = (lambda m: cases.scan_summary(m, split, params)) if "scan" in args.sections else None
    threshold = params.gate.max_backdoor_anomaly
    base = {"dataset": name, "seed": seed, "recipe": args.recipe}

    clean_model = None
    if "clean" in args.sections and key("clean", "clean") not in done:
        rec, clean_model = cases.clean_case(split, screen, train)
        _write(out, {"section": "clean", "case": "clean", **base, **rec})
    if clean_model is None and ("backdoors" in args.sections or scan is not None):
        clean_model = train(split.Xtr, split.ytr, split.K)
    if scan is not None and key("scan", "clean") not in done:
        s = scan(clean_model)
        _write(out, {"section": "scan", "case": "clean", "model": "clean", **base, **s, "flagged": s["max_anomaly_index"] > threshold})

    if "flips" in args.sections:
        for rate in args.flip_rates:
            case = f"random {rate:.0%}"
            if key("flips", case) in done:
                continue
            yn = cases.flip_labels(split.ytr, split.K, rate=rate, seed=seed)
            _write(out, {"section": "flips", "case": case, **base, **cases.flips_case(split, screen, yn)})

    if "ceiling" in args.sections:
        for rate in args.flip_rates:
            case = f"random {rate:.0%}"
            if key("ceiling", case) not in done:
                _write(out, {"section": "ceiling", "case": case, **base, **ceiling.ceiling_case(split, screen, rate=rate)})

    if "targeted" in args.sections and not split.is_table:
        rng = np.random.default_rng(seed + 4)
        src = np.where(np.isin(split.ytr, [1, 4]))[0]
        yn = split.ytr.copy()
        yn[rng.choice(src, min(len(src) // 2, int(0.05 * len(yn))), replace=False)] = 7
        if key("flips", "1, 4 -> 7, 5% of rows") not in done:
            _write(out, {"section": "flips", "case": "1, 4 -> 7, 5% of rows", **base, **cases.flips_case(split, screen, yn)})
        ones = np.where(split.ytr == 1)[0]
        yn = split.ytr.copy()
        yn[rng.choice(ones, len(ones) // 2, replace=False)] = 7
        if key("flips", "1 -> 7, 50% of class 1") not in done:
            _write(out, {"section": "flips", "case": "1 -> 7, 50% of class 1", **base, **cases.flips_case(split, screen, yn)})

    if "calibrate-labels" in args.sections and key("calibrate", "label_issues") not in done:
        _write(out, {"section": "calibrate", "case": "label_issues", **base, "rows": len(split.ytr), **calibrate.label_grid(split, screen)})
    if "calibrate-shortcuts" in args.sections and key("calibrate", "shortcuts") not in done:
        attacks = _selected(table_attacks(split.Xtr, split.K) if split.is_table else image_attacks(split.K), args)
        _write(out, {"section": "calibrate", "case": "shortcuts", **base, "rows": len(split.ytr),
                     "cases": calibrate.shortcut_grid(split, screen, attacks, args.rates)})

    if "features" in args.sections and key("features", "spectral_features") not in done:
        attacks = _selected(table_attacks(split.Xtr, split.K) if split.is_table else image_attacks(split.K), args)
        _write(out, {"section": "features", "case": "spectral_features", **base, "rows": len(split.ytr),
                     "cases": features.features_case(split, screen, attacks, args.rates)})

    if "backdoors" in args.sections:
        for attack in _selected(table_attacks(split.Xtr, split.K) if split.is_table else image_attacks(split.K), args):
            for rate in args.rates:
                if key("backdoors", attack.name, rate) in done:
                    continue
                rec = cases.backdoor_case(split, screen, train, attack, rate=rate, clean_model=clean_model,
                                          scan=scan if rate in args.scan_rates else None)
                for which in ("undefended", "defended"):
                    s = rec.pop(f"scan_{which}", None)
                    if s is not None:
                        _write(out, {"section": "scan", "case": attack.name, "rate": rate, "model": f"backdoored, {which}",
                                     "asr": rec[f"asr_{which}"], **base, **s, "flagged": s["max_anomaly_index"] > threshold})
                _write(out, {"section": "backdoors", "case": attack.name, **base, **rec})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, default=["digits"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=["clean", "flips", "backdoors"])
    ap.add_argument("--rates", nargs="+", type=float, default=[0.01, 0.05, 0.1], help="backdoor poisoning rates")
    ap.add_argument("--flip-rates", nargs="+", type=float, default=[0.1])
    ap.add_argument("--scan-rates", nargs="+", type=float, default=[0.05], help="backdoor rates whose models the scan section scans")
    ap.add_argument("--families", nargs="+", default=None, help="only triggers whose family or name contains one of these")
    ap.add_argument("--final", choices=["pipeline", "plain"], default=None,
                    help="final model: the train stage's fit (default; tables: standard mode, MLP) or a plain quick CNN (default on MNIST)")
    ap.add_argument("--quick", action="store_true", help="one trigger per family, plain final models on images, MNIST: clean and flips only")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override, e.g. screen.detectors=[...]")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report", action="store_true", help="only print the tables from --out")
    args = ap.parse_args(argv)
    if not args.report:
        torch.set_num_threads(1)  # small nets: one thread beats several on a small shared CPU
        args.recipe = recipe_digest(args)
        done = {(r["section"], r["dataset"], r["seed"], r["case"], r.get("rate")) for r in read_records(args.out)
                if r.get("recipe") == args.recipe}
        for name in args.datasets:
            if name == "mnist" and not mnist_available():
                print("MNIST not found: skipped (set MLSEC_MNIST_DIR)", file=sys.stderr)
                continue
            for seed in args.seeds:
                run_dataset(name, seed, args, done, args.out)
    print(f"# Data defences benchmark ({args.out.name})\n")
    records = read_records(args.out)
    if not args.report:
        records = [r for r in records if r.get("recipe") == args.recipe]   # this run's recipe only
    elif len({r.get("recipe") for r in records}) > 1:
        print(f"Note: {args.out.name} holds records of {len({r.get('recipe') for r in records})} recipes (the code or "
              "settings changed between runs); these tables mix them. Use a fresh --out for one recipe's tables.\n")
    print(render([r for r in records if r["section"] not in ("calibrate", "features", "ceiling")]))
    if any(r["section"] == "ceiling" for r in records):
        print("## Random flips: the screen's models fitted on the true labels, best threshold in hindsight\n")
        print(ceiling.ceiling_table(records) + "\n")
    if any(r["section"] == "features" for r in records):
        print("## Spectral signatures on learned features, alone\n")
        print(features.features_table([r for r in records if r["section"] == "features"]) + "\n")
    if any(r["section"] == "calibrate" for r in records):
        print("## Calibration (seeds " + ",".join(sorted({str(r["seed"]) for r in records if r["section"] == "calibrate"})) + ")\n")
        print(calibrate.pick(records))


if __name__ == "__main__":
    main()
