"""Tables: the default table model against logistic regression on clean data.

For breast cancer and wine (scikit-learn) over several held-out splits, the pipeline's own
path on the training rows of each split (the label mapping, the stratified split of
``evaluate.test_fraction``, the preprocessing fitted on the training rows, ``fit`` with the
table defaults of ``params.yaml``) against scikit-learn's logistic regression on
standardised features, fitted and scored on the same rows. Also the clean and robust
accuracy of adversarial training at the table epsilon, for comparison. Screening is not run
here (the end-to-end test covers the whole run); every training row is used by both models.

    python bench/tables.py [--splits 5] [--json out.json]

Prints one Markdown table per dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _dataset(name: str):
    import pandas as pd
    from sklearn.datasets import load_breast_cancer, load_wine

    d = {"breast_cancer": load_breast_cancer, "wine": load_wine}[name](as_frame=True)
    frame = d.data.copy()
    frame["label"] = [str(d.target_names[t]) for t in d.target]
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from stages.core.params import load_params
    from stages.data.io import load_source
    from stages.data.prepared import data_schema, split_indices
    from stages.data.preprocessing import fit_model_preprocessing, model_inputs
    from stages.ml.robustness import applicable_attacks, evaluate_robustness
    from stages.ml.runtime import predict_logits
    from stages.ml.training import fit

    torch.set_num_threads(1)
    params = load_params(ROOT / "params.yaml")
    train = params.train.for_kind("table")
    ev = params.evaluate.for_kind("table")
    adversarial = train.model_copy(update={"mode": "adversarial",
                                           "adversarial": train.adversarial.model_copy(update={"epsilon": ev.epsilon})})
    results = {}
    for name in ("breast_cancer", "wine"):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            csv = Path(tmp) / f"{name}.csv"
            _dataset(name).to_csv(csv, index=False)
            d = load_source(str(csv))
        meta = {**data_schema(d), "input_shape": list(d.input_shape)}
        raw = d.X.astype(np.float64)
        rows = []
        for split in range(args.splits):
            tr, te = split_indices(d.y, test_fraction=ev.test_fraction, seed=split)
            lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(raw[tr], d.y[tr])
            spec, X_train = fit_model_preprocessing(d.X[tr], meta)
            X_test = model_inputs(d.X[te], meta, spec)
            row = {"split": split, "n_train": int(len(tr)), "n_test": int(len(te)),
                   "logistic_regression": float(lr.score(raw[te], d.y[te]))}
            for label, tp in (("default", train), ("adversarial", adversarial)):
                started = time.perf_counter()
                model = fit(X_train, d.y[tr], params=tp, num_classes=d.num_classes, progress=False).model
                seconds = time.perf_counter() - started
                report = evaluate_robustness(model, X_test, d.y[te], epsilons=[ev.epsilon], pgd_steps=ev.pgd_steps,
                                             restarts=ev.restarts, apgd_steps=ev.apgd_steps,
                                             attacks=applicable_attacks(ev.attacks, d.num_classes),
                                             sample=None, seed=ev.seed)
                row[label] = float((predict_logits(model, X_test).argmax(1) == d.y[te]).mean())
                row[f"{label}_robust"] = float(report.robust_accuracy[ev.epsilon])
                row[f"{label}_seconds"] = round(seconds, 2)
            rows.append(row)
        results[name] = rows
        attacks = applicable_attacks(ev.attacks, d.num_classes)
        print(f"\n### {name}: {len(d.y)} rows, {d.X.shape[1]} columns, classes {list(d.classes)}; "
              f"default = {train.mode} {train.model}; robust at eps {ev.epsilon:g} on the scaled features "
              f"(worst case per row over {', '.join(attacks)})\n")
        print("| split | LR clean | default clean | default robust | adversarial clean | adversarial robust |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['split']} | {r['logistic_regression']:.4f} | {r['default']:.4f} | {r['default_robust']:.4f} | "
                  f"{r['adversarial']:.4f} | {r['adversarial_robust']:.4f} |")
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("logistic_regression", "default", "default_robust",
                                                                   "adversarial", "adversarial_robust")}
        print(f"| mean | {mean['logistic_regression']:.4f} | {mean['default']:.4f} | {mean['default_robust']:.4f} | "
              f"{mean['adversarial']:.4f} | {mean['adversarial_robust']:.4f} |")
        at_least = sum(r["default"] >= r["logistic_regression"] for r in rows)
        print(f"\ndefault >= logistic regression on {at_least} of {len(rows)} splits")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
