"""Validate: the Great Expectations suite on the verified prepared data; failure stops the run.

Drift is measured against the statistics of the last accepted dataset of this project
(``data/reference/<project>.json``, signed; written when a model trained on that data is
promoted, ``stages.data.reference``), so an attacker cannot ratchet the reference by
submitting rejected data. A project with a champion must have its reference: a missing or
replaced one fails closed (exit 4) instead of turning drift checks off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.core.errors import IntegrityError, ValidationFailed
from stages.core.params import Params
from stages.data.prepared import parse_prepared
from stages.data.reference import load_reference, reference_path
from stages.models.aliases import ledger_aliases
from stages.models.store import CHAMPION
from stages.runner import stage_main
from stages.trust.context import RunContext

STAGE = "validate"


def run(ctx: RunContext, params: Params) -> dict[str, Any]:
    from stages.data.expectations import (
        validate_arrays,  # pandas and Great Expectations: slow to import
    )

    files, manifest = ctx.dataset_bytes(where=STAGE)
    X, y, _, meta = parse_prepared(files)
    reference = load_reference(ctx.ws, params.project.name)
    champion = ledger_aliases(ctx.ws, params.project.name)[0].get(CHAMPION)
    if reference is None and champion is not None:  # fail closed: drift checks must run against the champion's data
        raise IntegrityError(f"{params.project.name} has a champion (version {champion}) but no drift reference "
                             f"{reference_path(ctx.ws, params.project.name).relative_to(ctx.ws.root)}: drift checks cannot run")
    docs_dir = ctx.run_dir / "data_docs"
    schema = {key: manifest[key] for key in ("kind", "classes", "columns") if key in manifest}
    classes = schema.get("classes")
    # the label set comes from the class list declared at ingest (signed in the manifest), never from y
    report = validate_arrays(X, y, params=params.validate_, num_classes=len(classes) if classes else int(meta["num_classes"]),
                             reference=reference, docs_dir=docs_dir, schema=schema or None,
                             allow_missing=manifest.get("missing") == "impute")
    body = report.to_dict()
    body["data_sha256"] = manifest["merkle_root"]
    body["drift_reference"] = "none (first accepted version)" if reference is None else str(reference_path(ctx.ws, params.project.name).relative_to(ctx.ws.root))
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
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
