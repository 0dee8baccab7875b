"""Screen: label-integrity and poisoning checks on the training split.

The held-out test split is fixed first (stratified, ``evaluate.seed``) and never screened or
trained on. Every flagged training row goes to ``data/quarantine/<run>/quarantine.json``
with its index in the input as given, the SHA-256 of its bytes, the detectors and their
scores; nothing is dropped silently. Training uses the accepted rows only. Above
``screen.max_flagged_fraction`` the run stops: poisoning suspected (exit 3).
"""

from __future__ import annotations

import hashlib
import shutil
from typing import Any

import numpy as np

from stages.context import RunContext
from stages.errors import PoisoningSuspected
from stages.params import Params

STAGE = "screen"
PLAYBOOK = "docs/playbooks.md#poisoning-suspected"


def _row_digest(X: np.ndarray, y: int, i: int) -> str:
    return hashlib.sha256(np.ascontiguousarray(X[i]).tobytes() + int(y).to_bytes(8, "little", signed=True)).hexdigest()


def run(ctx: RunContext, params: Params) -> dict[str, Any]:
    from stages.data import read_prepared, split_indices
    from stages.detectors import plot_suspects, screen_dataset
    from stages.hashing import merkle_root
    from stages.workspace import write_json

    folder, manifest = ctx.dataset(where=STAGE)
    X, y, ann, meta = read_prepared(folder)
    train_idx, test_idx = split_indices(y, test_fraction=params.evaluate.test_fraction, seed=params.evaluate.seed)
    findings = screen_dataset(X[train_idx], y[train_idx], params=params.screen,
                              annotator_labels=None if ann is None else ann[train_idx])
    labels = np.asarray(findings.labels, dtype=np.int64)
    flagged_local = sorted({int(f["index"]) for f in findings.flags})
    keep = np.ones(len(train_idx), dtype=bool)
    keep[flagged_local] = False
    accepted_idx = train_idx[keep]
    accepted_labels = labels[keep]

    quarantine = []
    for flag in sorted(findings.flags, key=lambda f: int(f["index"])):
        i = int(train_idx[int(flag["index"])])
        quarantine.append({"index": i, "sha256": _row_digest(X, y[i], i), "label": int(y[i]),
                           "detectors": list(flag["detectors"]), "scores": flag["scores"], "reason": flag["reason"]})
    qdir = ctx.ws.quarantine_dir / ctx.run_id
    qpath = qdir / "quarantine.json"
    write_json(qpath, {"run_id": ctx.run_id, "data_sha256": manifest["merkle_root"], "count": len(quarantine),
                       "indices_refer_to": "rows of the input as given", "samples": quarantine})
    accepted_entries = [{"path": f"row/{int(i)}", "sha256": _row_digest(X, int(lab), int(i)), "size": 1}
                        for i, lab in zip(accepted_idx, accepted_labels)]
    accepted_digest = merkle_root(accepted_entries)
    split_path = ctx.path("screen", "split.npz")
    np.savez(split_path, train_idx=train_idx, test_idx=test_idx, accepted_idx=accepted_idx, accepted_labels=accepted_labels)
    fraction = len(quarantine) / max(1, len(train_idx))
    report = {"data_sha256": manifest["merkle_root"], "n_train": int(len(train_idx)), "n_test": int(len(test_idx)),
              "flagged": len(quarantine), "flagged_fraction": round(fraction, 6), "accepted": int(len(accepted_idx)),
              "accepted_sha256": accepted_digest, "max_flagged_fraction": params.screen.max_flagged_fraction,
              "quarantine": str(qpath.relative_to(ctx.ws.root)), "findings": findings.to_dict()}
    report_path = ctx.path("screen", "screen.json")
    write_json(report_path, report)
    outputs = {"split": split_path, "screen_report": report_path}
    try:
        png = ctx.path("screen", "suspects.png")
        plot_suspects(X[train_idx], findings, png)
        outputs["suspects_png"] = png
    except Exception:  # noqa: BLE001 - a plot is a convenience, not a check
        pass
    shutil.copy2(qpath, ctx.path("screen", "quarantine.json"))
    outputs["quarantine"] = ctx.run_dir / "screen" / "quarantine.json"
    ctx.record_outputs(STAGE, outputs)
    ctx.log("screen.quarantine", {"flagged": len(quarantine), "fraction": report["flagged_fraction"],
                                  "quarantine": report["quarantine"], "accepted_sha256": accepted_digest,
                                  "annotators": findings.to_dict().get("annotators")})
    if fraction > params.screen.max_flagged_fraction:
        raise PoisoningSuspected(f"poisoning suspected: {len(quarantine)} of {len(train_idx)} training rows flagged "
                                 f"({fraction:.1%} > screen.max_flagged_fraction {params.screen.max_flagged_fraction:.1%}); "
                                 f"see {report['quarantine']} and the playbook {PLAYBOOK}")
    return {"flagged": len(quarantine), "flagged_fraction": report["flagged_fraction"], "accepted": int(len(accepted_idx)),
            "quarantine_path": str(qpath), "accepted_sha256": accepted_digest}


def main(argv: list[str] | None = None) -> int:
    from stages.runner import stage_main

    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
