"""Validate: the Great Expectations suite on the verified prepared data; failure stops the run.

Drift is measured against the statistics of the last accepted dataset of this project
(``data/reference/<project>.json``, signed; written when a model trained on that data is
promoted), so an attacker cannot ratchet the reference by submitting rejected data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.context import RunContext
from stages.errors import IntegrityError, ValidationFailed
from stages.params import Params

STAGE = "validate"


def reference_path(ctx: RunContext, params: Params) -> Path:
    return ctx.ws.reference_dir / f"{params.project.name}.json"


def load_reference(ctx: RunContext, params: Params) -> dict[str, Any] | None:
    from stages.keys import verify_document

    path = reference_path(ctx, params)
    if not path.exists():
        return None
    try:
        return verify_document(json.loads(path.read_text()))["statistics"]
    except (ValueError, KeyError):
        raise IntegrityError(f"drift reference {path} is unreadable; restore it or remove it to start a new baseline") from None


def save_reference(ctx: RunContext, params: Params, statistics: dict[str, Any], *, data_sha256: str) -> Path:
    from stages.keys import sign_document
    from stages.workspace import write_json

    path = reference_path(ctx, params)
    write_json(path, sign_document({"project": params.project.name, "data_sha256": data_sha256, "statistics": statistics}))
    return path


def run(ctx: RunContext, params: Params) -> dict[str, Any]:
    from stages.data import read_prepared
    from stages.expectations import validate_arrays

    folder, manifest = ctx.dataset(where=STAGE)
    X, y, _, meta = read_prepared(folder)
    reference = load_reference(ctx, params)
    docs_dir = ctx.run_dir / "data_docs"
    report = validate_arrays(X, y, params=params.validate_, num_classes=int(meta["num_classes"]), reference=reference,
                             docs_dir=docs_dir)
    body = report.to_dict()
    body["data_sha256"] = manifest["merkle_root"]
    body["drift_reference"] = "none (first accepted version)" if reference is None else str(reference_path(ctx, params).relative_to(ctx.ws.root))
    path = ctx.write_output_json(STAGE, "validation", "validation.json", body)
    outputs = {}
    if report.docs_path and Path(report.docs_path).exists():
        outputs["data_docs"] = Path(report.docs_path)
        ctx.record_outputs(STAGE, outputs)
    ctx.log("validate.result", {"success": report.success, "summary": report.summary, "report": str(path.relative_to(ctx.ws.root))})
    if not report.success:
        raise ValidationFailed(f"data validation failed: {report.summary}")
    return {"success": True, "summary": report.summary, "report": str(path)}


def main(argv: list[str] | None = None) -> int:
    from stages.runner import stage_main

    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
