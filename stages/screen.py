"""Screen: label-integrity and poisoning checks on every row, before anything trains.

The held-out test split is fixed first (stratified, ``evaluate.seed``) and never trained
on. It comes from the same, possibly poisoned, source, so the detectors run on all rows at
once (more rows make every detector stronger): flagged training rows are left out of
training, and flagged test rows out of the evaluation, where a poisoned row's label would
count a model that resists the backdoor as wrong. Every flagged row goes to
``data/quarantine/<run>/quarantine.json`` with its index in the input as given, its split,
the SHA-256 of its bytes, the detectors and their scores; nothing is dropped silently.
With annotators, rows carry the trusted annotators' consensus label in training and
evaluation. Above ``screen.max_flagged_fraction`` of all rows the run stops: poisoning
suspected (exit 3).
"""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np

from stages.core.errors import PoisoningSuspected
from stages.core.fanout import Mapper
from stages.core.params import Params
from stages.core.workspace import write_json
from stages.data.prepared import accepted_rows_digest, class_name, parse_prepared, row_digest, row_values, split_indices
from stages.data.preprocessing import categorical_blocks, fit_model_preprocessing, model_inputs
from stages.runner import stage_main
from stages.trust.context import RunContext

STAGE = "screen"
PLAYBOOK = "docs/playbooks.md#poisoning-suspected"


def run(ctx: RunContext, params: Params, *, mapper: Mapper | None = None, findings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Screen the run's verified data (``findings``: the detectors' findings reused from an
    earlier run with the same data and settings, instead of running them again)."""
    from stages.screening import (  # torch, sklearn, cleanlab: slow to import
        ScreenFindings,
        plot_suspects,
        screen_dataset,
    )

    files, manifest = ctx.dataset_bytes(where=STAGE)
    X, y, ann, meta = parse_prepared(files)
    ev = params.evaluate.for_kind(manifest.get("kind"))
    train_idx, test_idx = split_indices(y, test_fraction=ev.test_fraction, seed=ev.seed)
    order = np.concatenate([train_idx, test_idx])  # screened rows, by position
    is_train = np.arange(len(order)) < len(train_idx)
    # tables are screened on [0, 1] features scaled by a fit on the training split (before any
    # row is accepted); the model's own preprocessing is refitted on the accepted rows in train
    spec = fit_model_preprocessing(X[train_idx], meta)[0]
    X_screened = model_inputs(X[order], meta, spec)
    if findings is None:
        findings = screen_dataset(X_screened, y[order], params=params.screen,
                                  annotator_labels=None if ann is None else ann[order], mapper=mapper,
                                  categorical=categorical_blocks(spec), row_ids=order)
    else:
        findings = ScreenFindings.from_dict(findings, n_rows=len(order))
    findings_dict = findings.to_dict()
    labels = np.asarray(findings.labels, dtype=np.int64)
    keep = np.ones(len(order), dtype=bool)
    keep[sorted({int(f["index"]) for f in findings.flags})] = False
    accepted_idx, accepted_labels = order[keep & is_train], labels[keep & is_train]
    eval_idx, eval_labels = order[keep & ~is_train], labels[keep & ~is_train]

    quarantine = []
    for flag in sorted(findings.flags, key=lambda f: int(order[int(f["index"])])):
        pos = int(flag["index"])
        i = int(order[pos])
        quarantine.append({"index": i, "split": "train" if is_train[pos] else "test", "sha256": row_digest(X, y[i], i),
                           "label": class_name(meta, int(y[i])), "label_index": int(y[i]),
                           **row_values(X, meta, i), "detectors": list(flag["detectors"]), "scores": flag["scores"],
                           "reason": flag["reason"]})
    qdir = ctx.ws.quarantine_dir / ctx.run_id
    qpath = qdir / "quarantine.json"
    write_json(qpath, {"run_id": ctx.run_id, "data_sha256": manifest["merkle_root"], "count": len(quarantine),
                       "indices_refer_to": "rows of the input as given", "classes": meta.get("classes"),
                       "label_index_refers_to": "positions in classes", "samples": quarantine})
    accepted_digest = accepted_rows_digest(X, accepted_idx, accepted_labels)
    split_path = ctx.path("screen", "split.npz")
    np.savez(split_path, train_idx=train_idx, test_idx=test_idx, accepted_idx=accepted_idx, accepted_labels=accepted_labels,
             eval_idx=eval_idx, eval_labels=eval_labels)
    fraction = len(quarantine) / max(1, len(order))
    flagged_test = sum(1 for q in quarantine if q["split"] == "test")
    report = {"data_sha256": manifest["merkle_root"], "n_train": int(len(train_idx)), "n_test": int(len(test_idx)),
              "n_screened": int(len(order)), "flagged": len(quarantine), "flagged_train": len(quarantine) - flagged_test,
              "flagged_test": flagged_test, "flagged_fraction": round(fraction, 6), "accepted": int(len(accepted_idx)),
              "evaluated": int(len(eval_idx)),
              "accepted_sha256": accepted_digest, "max_flagged_fraction": params.screen.max_flagged_fraction,
              "quarantine": str(qpath.relative_to(ctx.ws.root)), "findings": findings_dict}
    report_path = ctx.path("screen", "screen.json")
    write_json(report_path, report)
    outputs = {"split": split_path, "screen_report": report_path}
    try:
        png = ctx.path("screen", "suspects.png")
        plot_suspects(X_screened, findings, png)
        outputs["suspects_png"] = png
    except Exception:  # noqa: BLE001 - a plot is a convenience, not a check
        pass
    shutil.copy2(qpath, ctx.path("screen", "quarantine.json"))
    outputs["quarantine"] = ctx.run_dir / "screen" / "quarantine.json"
    ctx.record_outputs(STAGE, outputs)
    ctx.log("screen.quarantine", {"flagged": len(quarantine), "fraction": report["flagged_fraction"],
                                  "quarantine": report["quarantine"], "accepted_sha256": accepted_digest,
                                  "annotators": findings_dict.get("annotators")})
    if fraction > params.screen.max_flagged_fraction:
        raise PoisoningSuspected(f"poisoning suspected: {len(quarantine)} of {len(order)} rows flagged "
                                 f"({fraction:.1%} > screen.max_flagged_fraction {params.screen.max_flagged_fraction:.1%}); "
                                 f"see {report['quarantine']} and the playbook {PLAYBOOK}")
    return {"flagged": len(quarantine), "flagged_fraction": report["flagged_fraction"], "accepted": int(len(accepted_idx)),
            "quarantine_path": str(qpath), "accepted_sha256": accepted_digest}


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
