"""Train: fit the model on the accepted rows only, in the mode ``params.yaml`` names.

Outputs ``model/model.safetensors`` (weights, never pickle), ``model/preprocessing.json``
(the input preprocessing, fitted on the accepted training rows only: JSON parameters, never a
pickled object) and ``model/model.json`` (the architecture, shapes, class list and the SHA-256
of the preprocessing), plus ``train.json`` (history, privacy) and, for a table,
``feature_statistics.json``: the statistics of the scaled training features the network sees
(``dataset_statistics``, the structure of the image drift reference), recorded in the run's
signed artifact index; serving reads them as its drift reference for this version.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from stages.core.fanout import Progress
from stages.core.params import Params
from stages.core.workspace import write_json
from stages.data.expectations.statistics import dataset_statistics
from stages.data.prepared import accepted_rows_digest, load_npz_bytes, parse_prepared
from stages.data.preprocessing import fit_model_preprocessing
from stages.models.weights import save_model
from stages.runner import stage_main
from stages.trust.context import RunContext
from stages.trust.hashing import sha256_file
from stages.trust.signing import derive_secret

STAGE = "train"
CHECKPOINT_KEY_LABEL = b"mlsec.checkpoint/v1"  # the checkpoint seal: derived from the signing key


def run(ctx: RunContext, params: Params, *, progress: Progress | None = None) -> dict[str, Any]:
    """Train on the rows screening accepted (``progress``: told of each epoch with the time
    left, e.g. the flow's reporter to its log and the Prefect UI)."""
    # torch and Opacus: slow to import, kept off the command line's start
    from stages.ml.training import fit
    from stages.ml.training.checkpoints import CheckpointRefused, CheckpointStore

    files, manifest = ctx.dataset_bytes(where=STAGE)
    inputs = ctx.input_bytes("split", "screen_report", where=STAGE)
    X, _, _, meta = parse_prepared(files)
    split = load_npz_bytes(inputs["split"])
    accepted_idx, accepted_labels = split["accepted_idx"], split["accepted_labels"]
    _check_accepted(ctx, json.loads(inputs["screen_report"]), manifest, accepted_rows_digest(X, accepted_idx, accepted_labels))
    # fitted on the accepted training rows only; saved with the weights and bound to them by model.json,
    # with the unseen-category policy the served model applies (a later params.yaml edit cannot change it)
    spec, X_model = fit_model_preprocessing(X[accepted_idx], meta, unknown_category=params.data.unknown_category)
    tp = params.train.for_kind(manifest.get("kind"))  # the defaults for this kind of data
    store = CheckpointStore(ctx.run_dir / "checkpoints", run_id=ctx.run_id, key=derive_secret(CHECKPOINT_KEY_LABEL))
    try:
        result = fit(X_model, accepted_labels, params=tp, num_classes=int(meta["num_classes"]),
                     checkpoints=store, progress=sys.stderr.isatty(), on_epoch=progress)
    except CheckpointRefused as err:
        raise ctx.violation(file=str(err.path.relative_to(ctx.ws.root)), expected=f"a checkpoint sealed for run {ctx.run_id}",
                            actual="refused", where=STAGE, reason=err.reason) from None
    preprocessing = ctx.path("model", "preprocessing.json")  # written with the weights, once training succeeded
    write_json(preprocessing, spec)
    if store.discarded:
        ctx.log("train.checkpoint_discarded", {"checkpoint": str(store.path.relative_to(ctx.ws.root)), "reason": store.discarded})
    config = {"architecture": result.model_name, "input_shape": list(X_model.shape[1:]), "num_classes": int(meta["num_classes"]),
              "classes": list(meta.get("classes") or range(int(meta["num_classes"]))), "kind": spec["kind"],
              "dropout": tp.dropout, "mode": tp.mode, "input": "rows as given, through preprocessing.json; "
              "the network: float32 on the [0, 1] scale", "output": "logits, one per class in 'classes'",
              "preprocessing": "preprocessing.json", "preprocessing_sha256": sha256_file(preprocessing),
              "data_sha256": manifest["merkle_root"]}
    files = save_model(result.model, ctx.run_dir / "model", config)
    files["preprocessing"] = preprocessing
    report = {"mode": tp.mode, "features": spec.get("features"), "architecture": result.model_name, "device": result.device,
              "n_train": int(len(accepted_idx)), "history": result.history, "privacy": result.privacy,
              "collapse_guard": result.guard}
    report_path = ctx.path("train.json")
    write_json(report_path, report)
    files["train_report"] = report_path
    if spec["kind"] == "table":   # the served version's drift reference, on the scale the network sees
        files["feature_statistics"] = ctx.path("feature_statistics.json")
        write_json(files["feature_statistics"], {
            "run_id": ctx.run_id, "data_sha256": manifest["merkle_root"], "scale": "scaled features (preprocessing.json)",
            "statistics": dataset_statistics(X_model, accepted_labels)})
    records = ctx.record_outputs(STAGE, files)
    ctx.log("train.model", {"weights_sha256": records["weights"]["sha256"], "architecture": result.model_name,
                            "mode": tp.mode, "privacy": result.privacy,
                            "collapse_guard": _guard_summary(result.guard)})
    for event in (result.guard or {}).get("events", []):
        ctx.log("train.catastrophic_overfitting", event)
    if result.guard and result.guard["selected_epoch"] != result.guard["last_epoch"]:
        ctx.log("train.best_epoch_kept", {k: result.guard[k] for k in ("selected_epoch", "selected", "last_epoch")})
    last = result.history[-1] if result.history else {}
    return {"weights_sha256": records["weights"]["sha256"], "architecture": result.model_name, "mode": tp.mode, "device": result.device,
            "epochs": len(result.history), "train_accuracy": last.get("accuracy"), "privacy": result.privacy}


def _check_accepted(ctx: RunContext, screen: dict[str, Any], manifest: dict[str, Any], digest: str) -> None:
    """The rows about to be trained on are the ones screening accepted, from this run's data."""
    rel = f"runs/{ctx.run_id}/screen/split.npz"
    if screen.get("data_sha256") != manifest["merkle_root"]:
        raise ctx.violation(file=rel, expected=manifest["merkle_root"], actual=str(screen.get("data_sha256")), where=STAGE,
                            reason="the screen report is about other data than this run's manifest")
    if screen.get("accepted_sha256") != digest:
        raise ctx.violation(file=rel, expected=str(screen.get("accepted_sha256")), actual=digest, where=STAGE,
                            reason=f"the accepted rows digest {digest[:16]}... differs from the screen's accepted_sha256 "
                                   f"{str(screen.get('accepted_sha256'))[:16]}...")


def _guard_summary(guard: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the ledger keeps of the collapse guard: whether it ran, what it did, the final step."""
    if guard is None:
        return None
    return {"restores": guard["restores"], "collapses": len(guard["events"]), "final_method": guard["final_method"],
            "final_alpha": guard["final_alpha"], "stopped_early": any(e["new_alpha"] is None for e in guard["events"]),
            "selected_epoch": guard["selected_epoch"], "last_epoch": guard["last_epoch"]}


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
