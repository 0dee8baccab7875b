"""Register: record the run in MLflow, and register, sign and attest a blessed model.

Every run is logged to MLflow (params, metrics, reports, Data Docs, plots, quarantine list,
manifest, verdict, ledger head), blessed or not, so rejected models stay inspectable. Only
a version whose signed verdict blesses exactly these weights is registered; it gets the
``challenger`` alias, and ``champion`` only through promotion (``stages.models.promotion``).

A registered model is a pyfunc from code (no pickle), built here as a folder and logged as
it is: ``MLmodel``, ``pyfunc_model.py``, the environment files and input example, and
``artifacts/`` with ``weights/`` (``model.safetensors``, ``model.json`` and ``preprocessing.json``,
the input preprocessing as JSON parameters), ``verdict.json``
(the signed gate verdict) and ``attestation.json`` (an in-toto SLSA provenance statement in
a signed DSSE envelope). ``model.sig`` (OpenSSF model-signing) covers every other file of
the folder, so nothing MLflow serves is unsigned. The ledger's ``register.version`` entry
names the weights and verdict by digest. ``stages.register.load_verified_model`` (from
``stages.models.verify``) checks all of it before any weight is read.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.errors import IntegrityError
from stages.core.params import Params
from stages.core.workspace import actor, write_json
from stages.models.aliases import move_alias
from stages.models.attestation import build_attestation, sign_attestation
from stages.models.card import write_model_card
from stages.models.safety import SIGNATURE_NAME
from stages.models.signing import sign_model_dir
from stages.models.store import (
    CHALLENGER,
    COMPLETE_TAG,
    client,
    complete_version_with_weights,
    drop_incomplete_versions,
    ensure_experiment,
)
from stages.models.verify import load_verified_model, verify_model_tree
from stages.ml.dp_audit import audit_fields
from stages.runner import stage_main
from stages.trust.context import RunContext
from stages.trust.verdict import load_verdict, verdict_digest

__all__ = ["load_verified_model", "run", "main"]  # load_verified_model: the documented way to load a model

STAGE = "register"


def _package(ctx: RunContext, verdict_doc: dict[str, Any], attestation: dict[str, Any]) -> Path:
    """Assemble the folder MLflow will serve (the pyfunc from code, its environment files and
    input example, the weights, the verdict, the attestation) and sign all of it."""
    import mlflow  # slow to import, kept off the command line's start
    from mlflow.models import (
        infer_signature,  # MLflow: slow to import, kept off the command line's start
    )

    pkg, staging = ctx.run_dir / "package", ctx.run_dir / "package-inputs"
    for folder in (pkg, staging):
        shutil.rmtree(folder, ignore_errors=True)
    (staging / "weights").mkdir(parents=True)
    inputs = ctx.input_bytes("weights", "model_config", "preprocessing", where=STAGE)
    (staging / "weights" / "model.safetensors").write_bytes(inputs["weights"])
    (staging / "weights" / "model.json").write_bytes(inputs["model_config"])
    (staging / "weights" / "preprocessing.json").write_bytes(inputs["preprocessing"])
    write_json(staging / "verdict.json", verdict_doc)
    write_json(staging / "attestation.json", attestation)
    config = json.loads(inputs["model_config"])
    example = input_example(json.loads(inputs["preprocessing"]))  # the raw rows callers send
    signature = infer_signature(example, np.zeros((1, config["num_classes"]), dtype=np.float32))
    with warnings.catch_warnings():
        # the signature is given explicitly; MLflow's hint about typed predict() does not apply
        warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")
        mlflow.pyfunc.save_model(
            path=str(pkg), python_model=str(Path(__file__).parent / "models" / "pyfunc_model.py"),
            artifacts={"weights": str(staging / "weights"), "verdict": str(staging / "verdict.json"),
                       "attestation": str(staging / "attestation.json")},
            signature=signature, input_example=example, pip_requirements=["torch==2.13.0", "safetensors", "numpy", "mlflow"])
    shutil.rmtree(staging, ignore_errors=True)
    sign_model_dir(pkg, pkg / SIGNATURE_NAME)
    evidence = verify_model_tree(pkg)  # what was signed is what the gate blessed
    if evidence["verdict_sha256"] != verdict_digest(verdict_doc):
        raise IntegrityError(f"the packaged model of run {ctx.run_id} carries another verdict than the gate's")
    return pkg


def _attest(ctx: RunContext, params: Params, manifest: dict[str, Any], records: dict[str, Any], started: str) -> dict[str, Any]:
    materials = {f"data/{e['path']}": e["sha256"] for e in manifest["files"]}
    materials["manifest.json"] = records["manifest"]["sha256"]
    materials["environment.lock"] = records["environment_lock"]["sha256"]
    materials["verdict.json"] = records["verdict"]["sha256"]
    statement = build_attestation(
        subjects={"model.safetensors": records["weights"]["sha256"], "model.json": records["model_config"]["sha256"],
                  "preprocessing.json": records["preprocessing"]["sha256"]},
        materials=materials,
        builder_id="https://mlsec.local/pipeline/secure-training",
        build_type="https://mlsec.local/secure-training/v1",
        parameters={"params_sha256": params.digest(), "git_commit": manifest["git"]["commit"], "git_dirty": manifest["git"]["dirty"],
                    "data_sha256": manifest["merkle_root"], "dvc_md5": manifest["dvc"]["md5"], "train_mode": params.train.for_kind(manifest.get("kind")).mode},
        run_id=ctx.run_id, started=started, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return sign_attestation(statement)


def run(ctx: RunContext, params: Params, *, triggered_by: str | None = None, timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Log the run to MLflow; register + sign + attest when the verdict blesses the model."""
    import mlflow  # slow to import, kept off the command line's start

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ctx.verify_all(where=STAGE)
    records = ctx.recorded(where=STAGE)
    manifest = ctx.manifest(where=STAGE)
    inputs = ctx.input_bytes("verdict", "evaluation", "screen_report", "train_report", where=STAGE)
    verdict_doc = json.loads(inputs["verdict"])
    verdict = load_verdict(verdict_doc, weights_sha256=records["weights"]["sha256"])
    if verdict.get("run_id") != ctx.run_id:
        raise ctx.violation(file=f"runs/{ctx.run_id}/verdict.json", expected=ctx.run_id, actual=str(verdict.get("run_id")),
                            where=STAGE, reason=f"the verdict was written by run {verdict.get('run_id')!r}")
    evaluation = json.loads(inputs["evaluation"])
    screen = json.loads(inputs["screen_report"])
    name = params.project.name
    c = client(ctx.ws)
    experiment_id = ensure_experiment(ctx.ws, name)
    dropped = drop_incomplete_versions(ctx.ws, name)  # left by a run killed mid-registration
    if dropped:
        ctx.log("register.dropped_incomplete", {"model": name, "versions": dropped})
    who = triggered_by or actor()
    result: dict[str, Any] = {"model": None, "mlflow_run_id": None}
    with mlflow.start_run(experiment_id=experiment_id, run_name=ctx.run_id) as mlrun:
        result["mlflow_run_id"] = mlrun.info.run_id
        flat = {k: ("null" if v is None else str(v))[:500] for k, v in params.flat().items()}
        mlflow.log_params(flat)
        mlflow.log_metrics({k: float(v) for k, v in evaluation["metrics"].items()})
        _log_training(json.loads(inputs["train_report"]))
        if evaluation.get("privacy"):
            # every input of the accountant, so that an auditor can recompute epsilon from MLflow alone
            dp_params, dp_metrics = audit_fields(evaluation["privacy"])
            mlflow.log_params(dp_params)
            mlflow.log_metrics(dp_metrics)
        if timings:
            mlflow.log_metrics({f"seconds_{k}": float(v) for k, v in timings.items()})
        for key in ("validation", "screen_report", "quarantine", "evaluation", "train_report", "verdict", "manifest",
                    "environment_lock", "suspects_png", "robustness_curve", "per_sample"):
            if key in records:
                mlflow.log_artifact(str(ctx.run_dir / records[key]["path"]), artifact_path="reports")
        if (ctx.run_dir / "data_docs").is_dir():
            mlflow.log_artifacts(str(ctx.run_dir / "data_docs"), artifact_path="data_docs")
        mlflow.log_artifact(str(ctx.run_dir / "artifacts.json"), artifact_path="reports")
        head = ctx.ledger.head()
        mlflow.set_tags({
            "mlsec.run_id": ctx.run_id, "mlsec.verdict": verdict["verdict"], "mlsec.data_sha256": manifest["merkle_root"],
            "mlsec.dvc_md5": manifest["dvc"]["md5"], "mlsec.git_commit": str(manifest["git"]["commit"]),
            "mlsec.params_sha256": params.digest(), "mlsec.triggered_by": who,
            "mlsec.ledger_head": json.dumps(head) if head else "null",
        })
        existing = complete_version_with_weights(ctx.ws, name, records["weights"]["sha256"]) if verdict["passed"] else None
        if existing:  # the same weights are already a version (a rerun): no duplicate
            result["model"] = {"name": name, "version": existing, "uri": f"models:/{name}/{existing}", "reused": True}
        elif verdict["passed"]:
            attestation = _attest(ctx, params, manifest, records, started)
            pkg = _package(ctx, verdict_doc, attestation)
            card_md, card_html = write_model_card(ctx, params, manifest=manifest, verdict=verdict, evaluation=evaluation,
                                                  screen=screen, out_dir=ctx.run_dir / "card")
            mlflow.log_artifact(str(card_md), artifact_path="model_card")
            mlflow.log_artifact(str(card_html), artifact_path="model_card")
            mlflow.log_artifact(str(pkg / "artifacts" / "attestation.json"), artifact_path="reports")
            result["model"] = _log_and_register(ctx, params, pkg, records, manifest, evaluation, verdict_doc, who,
                                                mlrun.info.run_id)
    if result["model"]:
        version = result["model"]["version"]
        if result["model"].get("reused"):
            # the version's own registration (weights, the verdict it carries) stays the one the
            # ledger already holds; this run's verdict blessed the same weights again
            ctx.log("register.reused", {**result["model"], "mlflow_run_id": result["mlflow_run_id"],
                                        "weights_sha256": records["weights"]["sha256"],
                                        "verdict_sha256": verdict_digest(verdict_doc)})
        else:
            # The registration the loader and promotion trust: these weights and this verdict, by digest.
            ctx.log("register.version", {**result["model"], "mlflow_run_id": result["mlflow_run_id"],
                                         "weights_sha256": records["weights"]["sha256"],
                                         "verdict_sha256": verdict_digest(verdict_doc),
                                         "policy_overridden": verdict["policy"]["overridden"]})
        move_alias(ctx.ws, name, CHALLENGER, version, reason=f"gated candidate from run {ctx.run_id}", run_id=ctx.run_id)
        # The ledger head after registration is anchored in MLflow too.
        c.set_tag(result["mlflow_run_id"], "mlsec.ledger_head", json.dumps(ctx.ledger.head()))
    else:
        ctx.log("register.skipped", {"reason": "verdict NOT_BLESSED", "mlflow_run_id": result["mlflow_run_id"]})
    return result


def _log_training(report: dict[str, Any]) -> None:
    """Per-epoch training figures as MLflow metric histories, and what the collapse guard did."""
    import mlflow  # slow to import, kept off the command line's start

    for entry in report.get("history", []):
        step = int(entry["epoch"])
        mlflow.log_metrics({f"train.{k}": float(v) for k, v in entry.items() if k != "epoch" and v is not None}, step=step)
    guard = report.get("collapse_guard")
    if guard:
        mlflow.log_metrics({"train.guard_restores": float(guard["restores"]),
                            "train.guard_collapses": float(len(guard["events"])),
                            "train.final_alpha": float(guard["final_alpha"]),
                            "train.guard_final_method_n_fgsm": float(guard["final_method"] == "n_fgsm"),
                            "train.guard_selected_epoch": float(guard["selected_epoch"]),
                            "train.guard_last_epoch": float(guard["last_epoch"])})
        for event in guard["events"]:
            mlflow.log_metrics({"train.collapse_pgd_accuracy": float(event["guard_pgd_accuracy"]),
                                "train.collapse_fgsm_accuracy": float(event["guard_fgsm_accuracy"])},
                               step=int(event["epoch"]))


def _log_and_register(ctx, params, pkg: Path, records, manifest, evaluation, verdict_doc, who: str,
                      mlflow_run_id: str) -> dict[str, Any]:
    """Log the signed folder as it is (no re-serialisation by MLflow) and register it."""
    import mlflow  # slow to import, kept off the command line's start

    name = params.project.name
    mlflow.log_artifacts(str(pkg), artifact_path="model")
    mv = mlflow.register_model(f"runs:/{mlflow_run_id}/model", name, tags={COMPLETE_TAG: "pending"})
    try:
        return _finish_version(ctx, params, mv, records, manifest, evaluation, verdict_doc, who, mlflow_run_id)
    except BaseException:  # cancelled, killed by a signal, or failed: leave no half-registered version
        client(ctx.ws).delete_model_version(name, mv.version)
        raise


def _finish_version(ctx, params, mv, records, manifest, evaluation, verdict_doc, who: str, mlflow_run_id: str) -> dict[str, Any]:
    name = params.project.name
    verdict = verdict_doc["payload"]
    c = client(ctx.ws)
    metrics = evaluation["metrics"]
    # Tags are for people browsing MLflow; decisions read the signed records and the ledger.
    tags = {
        "mlsec.run_id": ctx.run_id, "mlsec.mlflow_run_id": mlflow_run_id, "mlsec.weights_sha256": records["weights"]["sha256"],
        "mlsec.data_sha256": manifest["merkle_root"], "mlsec.data_source": manifest["source"], "mlsec.dvc_md5": manifest["dvc"]["md5"],
        "mlsec.git_commit": str(manifest["git"]["commit"]), "mlsec.verdict": verdict["verdict"],
        "mlsec.verdict_sha256": verdict_digest(verdict_doc), "mlsec.robust_accuracy": f"{metrics.get('robust_accuracy', float('nan')):.4f}",
        "mlsec.clean_accuracy": f"{metrics.get('clean_accuracy', float('nan')):.4f}",
        "mlsec.dp_epsilon": f"{metrics['dp_epsilon']:.4f}" if "dp_epsilon" in metrics else "none",
        "mlsec.triggered_by": who, "mlsec.four_eyes": str(params.promotion.four_eyes).lower(), "mlsec.train_mode": params.train.for_kind(manifest.get("kind")).mode,
        "mlsec.policy_overridden": str(verdict["policy"]["overridden"]).lower(),
    }
    for key, value in tags.items():
        c.set_model_version_tag(name, mv.version, key, value)
    for key, value in {"mlsec.owner": params.project.owner, "mlsec.purpose": params.project.purpose,
                       "mlsec.risk_class": params.project.risk_class}.items():
        c.set_registered_model_tag(name, key, value)
    c.update_model_version(name, mv.version, description=f"Gated by run {ctx.run_id}: {verdict['verdict']}"
                           + (f" (policy overridden: {verdict['policy']['summary']})" if verdict["policy"]["overridden"] else ""))
    c.set_model_version_tag(name, mv.version, COMPLETE_TAG, "complete")  # last: the version is whole
    return {"name": name, "version": str(mv.version), "uri": f"models:/{name}/{mv.version}"}


def input_example(spec: dict[str, Any]):
    """One made-up row in the form callers send (never a training row): for tables a pandas
    DataFrame of the raw columns (each numeric column at the middle of its training range,
    each categorical at its first category); for images zeros of the raw dtype and layout."""
    if spec["kind"] == "table":
        import pandas as pd  # slow to import, kept off the command line's start

        return pd.DataFrame({c["name"]: [(c["low"] + c["high"]) / 2.0] if c["type"] == "numeric" else [c["categories"][0]]
                             for c in spec["columns"]})
    c, h, w = spec["input_shape"]
    dtype = np.uint8 if spec.get("scaled_from") == "uint8/255" else np.float32
    shape = {"NHWC": (1, h, w, c), "NHW": (1, h, w)}.get(spec.get("layout"), (1, c, h, w))
    return np.zeros(shape, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
