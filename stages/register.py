"""Register: record the run in MLflow, and register, sign and attest a blessed model.

Every run is logged to MLflow (params, metrics, reports, Data Docs, plots, quarantine list,
manifest, verdict, ledger head), blessed or not, so rejected models stay inspectable. Only
a version whose signed verdict blesses exactly these weights is registered; it gets the
``challenger`` alias, and ``champion`` only through promotion (``stages.registry.promote``).

A registered model is a pyfunc logged as code (no pickle) whose ``artifacts/`` folder holds
``weights/`` (``model.safetensors`` + ``model.json``), ``model.sig`` (OpenSSF model-signing
over ``weights/``), ``verdict.json`` (signed gate verdict) and ``attestation.json`` (an
in-toto SLSA provenance statement in a signed DSSE envelope). :func:`load_verified_model`
checks all of it before any weight is read.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from stages.context import RunContext
from stages.errors import IntegrityError, InvalidInput, SecurityError
from stages.params import Params
from stages.workspace import Workspace, actor, read_json, write_json

STAGE = "register"
# Files MLflow itself writes next to the artifacts (text metadata and the pyfunc code file).
MLFLOW_METADATA = {"MLmodel", "registered_model_meta", "requirements.txt", "conda.yaml", "python_env.yaml",
                   "input_example.json", "serving_input_example.json"}


# --------------------------------------------------------------------------- verification
def _locate(root: Path) -> Path:
    """The folder that holds weights/, model.sig and verdict.json inside a model tree."""
    for candidate in (root / "artifacts", root):
        if (candidate / "weights").is_dir():
            return candidate
    raise IntegrityError(f"{root} holds no pipeline model (no weights/ folder): refusing to load it")


def _scan_tree(root: Path, artifacts: Path) -> None:
    """No pickle anywhere; only allow-listed formats where weights are read from."""
    from stages.modelsafety import assert_safe_model_dir, scan_model_file

    assert_safe_model_dir(artifacts)
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        if artifacts in path.parents:
            continue
        if path.parent == root and not path.is_symlink() and (path.suffix == ".py" or path.name in MLFLOW_METADATA):
            head = path.read_bytes()[:4096]
            if b"\0" in head or (len(head) > 1 and head[0] == 0x80):
                raise SecurityError(f"unsafe file in model: {path.name} is not text")
            continue  # MLflow's own metadata and the pyfunc code file; load_verified_model never runs them
        result = scan_model_file(path, relative_to=root)
        if not result.safe:
            raise SecurityError(f"unsafe file in model: {result.reason}")


def verify_model_tree(root: Path) -> dict[str, Any]:
    """Verify a model tree (MLflow download or a run's package); return its evidence."""
    from stages.gate import load_verdict
    from stages.hashing import sha256_file
    from stages.modelsafety import verify_attestation, verify_model_dir

    root = Path(root)
    artifacts = _locate(root)
    _scan_tree(root, artifacts)
    weights_dir, sig = artifacts / "weights", artifacts / "model.sig"
    if not sig.is_file():
        raise IntegrityError("model has no signature (model.sig): refusing to load unsigned weights")
    verify_model_dir(weights_dir, sig)
    weights_sha = sha256_file(weights_dir / "model.safetensors")
    verdict_path = artifacts / "verdict.json"
    if not verdict_path.is_file():
        raise IntegrityError("model has no gate verdict: refusing to load it")
    verdict = load_verdict(read_json(verdict_path), weights_sha256=weights_sha)
    config_sha = sha256_file(weights_dir / "model.json")
    if verdict.get("model_config_sha256") != config_sha:
        raise IntegrityError("model.json does not match the configuration the gate saw")
    attestation = None
    if (artifacts / "attestation.json").is_file():
        attestation = verify_attestation(read_json(artifacts / "attestation.json"),
                                         expected_subjects={"model.safetensors": weights_sha, "model.json": config_sha})
    return {"weights_dir": weights_dir, "weights_sha256": weights_sha, "verdict": verdict, "attestation": attestation}


def _download(uri: str, dest: Path) -> Path:
    import mlflow

    from stages.registry import client

    client(Workspace.from_env())
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds
        raise InvalidInput(f"cannot fetch model {uri}: {str(err).splitlines()[0]}") from None


def load_verified_model(uri: str):
    """Load a registered model as a ``torch.nn.Module`` in eval mode, after verification.

    ``uri``: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``NAME/VERSION``, ``NAME@ALIAS``,
    any MLflow artifact URI, or a local model folder. Refuses (IntegrityError, exit 4) on
    a missing or bad signature, a changed or added file, a verdict that does not bless
    these weights, or any pickle-bearing file. The model takes float32 inputs on the
    [0, 1] scale and returns logits.
    """
    from stages.train import load_model_folder

    local = Path(uri)
    if local.exists():
        evidence = verify_model_tree(local)
        return load_model_folder(evidence["weights_dir"])
    mlflow_uri = uri
    tag_sha = None
    if not uri.startswith(("models:/", "runs:/", "file:", "mlflow-artifacts:")):
        mlflow_uri = f"models:/{uri}"
    if mlflow_uri.startswith("models:/"):
        from stages.registry import resolve

        mv = resolve(Workspace.from_env(), mlflow_uri)
        tag_sha = (mv.tags or {}).get("mlsec.weights_sha256")
        mlflow_uri = f"models:/{mv.name}/{mv.version}"
    with tempfile.TemporaryDirectory(prefix="mlsec-model-") as tmp:
        root = _download(mlflow_uri, Path(tmp))
        evidence = verify_model_tree(root)
        if tag_sha is not None and tag_sha != evidence["weights_sha256"]:
            raise IntegrityError(f"weights {evidence['weights_sha256'][:16]}... differ from the registered {tag_sha[:16]}...")
        if not evidence["verdict"].get("passed"):
            raise IntegrityError("the model's verdict is NOT_BLESSED: refusing to load it")
        return load_model_folder(evidence["weights_dir"])


def verify_registered_version(ws: Workspace, mv) -> dict[str, Any]:
    """Download a version, verify it fully and check it against its registry tags."""
    tags = dict(mv.tags or {})
    with tempfile.TemporaryDirectory(prefix="mlsec-verify-") as tmp:
        root = _download(f"models:/{mv.name}/{mv.version}", Path(tmp))
        evidence = verify_model_tree(root)
        evidence.pop("weights_dir")
    if tags.get("mlsec.weights_sha256") != evidence["weights_sha256"]:
        raise IntegrityError(f"{mv.name}/{mv.version}: weights in the artifact store differ from the registered digest")
    from stages.registry import client

    run = client(ws).get_run(mv.run_id)
    try:
        import mlflow

        vpath = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="reports/validation.json")
        evidence["validation"] = read_json(Path(vpath))
    except Exception:  # noqa: BLE001 - older runs may lack it; promotion then keeps the old reference
        evidence["validation"] = {}
    evidence["run_metrics"] = dict(run.data.metrics)
    return evidence


# --------------------------------------------------------------------------- the stage
def _package(ctx: RunContext, verdict_doc: dict[str, Any], attestation: dict[str, Any]) -> Path:
    """Assemble and sign the folder that becomes the model's MLflow artifacts."""
    from stages.modelsafety import sign_model_dir

    pkg = ctx.run_dir / "package"
    shutil.rmtree(pkg, ignore_errors=True)
    (pkg / "weights").mkdir(parents=True)
    inputs = ctx.inputs("weights", "model_config", where=STAGE)
    shutil.copy2(inputs["weights"], pkg / "weights" / "model.safetensors")
    shutil.copy2(inputs["model_config"], pkg / "weights" / "model.json")
    sign_model_dir(pkg / "weights", pkg / "model.sig")
    write_json(pkg / "verdict.json", verdict_doc)
    write_json(pkg / "attestation.json", attestation)
    return pkg


def _attest(ctx: RunContext, params: Params, manifest: dict[str, Any], records: dict[str, Any], started: str) -> dict[str, Any]:
    from stages.modelsafety import build_attestation, sign_attestation

    materials = {f"data/{e['path']}": e["sha256"] for e in manifest["files"]}
    materials["manifest.json"] = records["manifest"]["sha256"]
    materials["environment.lock"] = records["environment_lock"]["sha256"]
    materials["verdict.json"] = records["verdict"]["sha256"]
    statement = build_attestation(
        subjects={"model.safetensors": records["weights"]["sha256"], "model.json": records["model_config"]["sha256"]},
        materials=materials,
        builder_id="https://mlsec.local/pipeline/secure-training",
        build_type="https://mlsec.local/secure-training/v1",
        parameters={"params_sha256": params.digest(), "git_commit": manifest["git"]["commit"], "git_dirty": manifest["git"]["dirty"],
                    "data_sha256": manifest["merkle_root"], "dvc_md5": manifest["dvc"]["md5"], "train_mode": params.train.mode},
        run_id=ctx.run_id, started=started, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return sign_attestation(statement)


def run(ctx: RunContext, params: Params, *, triggered_by: str | None = None, timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Log the run to MLflow; register + sign + attest when the verdict blesses the model."""
    import mlflow

    from stages.gate import load_verdict, verify_all_recorded
    from stages.modelcard import write_model_card
    from stages.registry import CHALLENGER, client, ensure_experiment, move_alias

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    verify_all_recorded(ctx)
    records = ctx.recorded()
    manifest = ctx.manifest()
    inputs = ctx.inputs("verdict", "evaluation", "validation", "screen_report", "quarantine", "train_report", where=STAGE)
    verdict_doc = read_json(inputs["verdict"])
    verdict = load_verdict(verdict_doc, weights_sha256=records["weights"]["sha256"])
    evaluation = read_json(inputs["evaluation"])
    screen = read_json(inputs["screen_report"])
    name = params.project.name
    c = client(ctx.ws)
    experiment_id = ensure_experiment(ctx.ws, name)
    who = triggered_by or actor()
    result: dict[str, Any] = {"model": None, "mlflow_run_id": None}
    with mlflow.start_run(experiment_id=experiment_id, run_name=ctx.run_id) as mlrun:
        result["mlflow_run_id"] = mlrun.info.run_id
        flat = {k: ("null" if v is None else str(v))[:500] for k, v in params.flat().items()}
        mlflow.log_params(flat)
        mlflow.log_metrics({k: float(v) for k, v in evaluation["metrics"].items()})
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
        if verdict["passed"]:
            attestation = _attest(ctx, params, manifest, records, started)
            pkg = _package(ctx, verdict_doc, attestation)
            card_md, card_html = write_model_card(ctx, params, manifest=manifest, verdict=verdict, evaluation=evaluation,
                                                  screen=screen, out_dir=ctx.run_dir / "card")
            mlflow.log_artifact(str(card_md), artifact_path="model_card")
            mlflow.log_artifact(str(card_html), artifact_path="model_card")
            mlflow.log_artifact(str(pkg / "attestation.json"), artifact_path="reports")
            result["model"] = _log_and_register(ctx, params, pkg, records, manifest, evaluation, verdict, who, mlrun.info.run_id)
    if result["model"]:
        version = result["model"]["version"]
        move_alias(ctx.ws, name, CHALLENGER, version, reason=f"gated candidate from run {ctx.run_id}", run_id=ctx.run_id)
        ctx.log("register.version", {**result["model"], "mlflow_run_id": result["mlflow_run_id"]})
        # The ledger head after registration is anchored in MLflow too.
        c.set_tag(result["mlflow_run_id"], "mlsec.ledger_head", json.dumps(ctx.ledger.head()))
    else:
        ctx.log("register.skipped", {"reason": "verdict NOT_BLESSED", "mlflow_run_id": result["mlflow_run_id"]})
    return result


def _log_and_register(ctx, params, pkg: Path, records, manifest, evaluation, verdict, who: str, mlflow_run_id: str) -> dict[str, Any]:
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    from stages.registry import client

    name = params.project.name
    config = read_json(pkg / "weights" / "model.json")
    example = np.zeros((1, *config["input_shape"]), dtype=np.float32)
    signature = infer_signature(example, np.zeros((1, config["num_classes"]), dtype=np.float32))
    code = Path(__file__).with_name("pyfunc_model.py")
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(code),
        artifacts={"weights": str(pkg / "weights"), "signature": str(pkg / "model.sig"), "verdict": str(pkg / "verdict.json"),
                   "attestation": str(pkg / "attestation.json")},
        code_paths=None, signature=signature, input_example=example,
        pip_requirements=["torch==2.13.0", "safetensors", "numpy", "mlflow"])
    mv = mlflow.register_model(info.model_uri, name)
    c = client(ctx.ws)
    metrics = evaluation["metrics"]
    tags = {
        "mlsec.run_id": ctx.run_id, "mlsec.mlflow_run_id": mlflow_run_id, "mlsec.weights_sha256": records["weights"]["sha256"],
        "mlsec.data_sha256": manifest["merkle_root"], "mlsec.data_source": manifest["source"], "mlsec.dvc_md5": manifest["dvc"]["md5"],
        "mlsec.git_commit": str(manifest["git"]["commit"]), "mlsec.verdict": verdict["verdict"],
        "mlsec.verdict_sha256": records["verdict"]["sha256"], "mlsec.robust_accuracy": f"{metrics.get('robust_accuracy', float('nan')):.4f}",
        "mlsec.clean_accuracy": f"{metrics.get('clean_accuracy', float('nan')):.4f}",
        "mlsec.dp_epsilon": f"{metrics['dp_epsilon']:.4f}" if "dp_epsilon" in metrics else "none",
        "mlsec.triggered_by": who, "mlsec.four_eyes": str(params.promotion.four_eyes).lower(), "mlsec.train_mode": params.train.mode,
    }
    for key, value in tags.items():
        c.set_model_version_tag(name, mv.version, key, value)
    for key, value in {"mlsec.owner": params.project.owner, "mlsec.purpose": params.project.purpose,
                       "mlsec.risk_class": params.project.risk_class}.items():
        c.set_registered_model_tag(name, key, value)
    c.update_model_version(name, mv.version, description=f"Gated by run {ctx.run_id}: {verdict['verdict']}")
    return {"name": name, "version": str(mv.version), "uri": f"models:/{name}/{mv.version}"}


def main(argv: list[str] | None = None) -> int:
    from stages.runner import stage_main

    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
