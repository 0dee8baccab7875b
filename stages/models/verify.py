"""Verify-on-load: a model tree (MLflow download or a run's package) is scanned for unsafe files,
checked against its signature, its signed verdict and its attestation before any weight is
read. ``load_verified_model`` is the one way the project loads a registered model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from stages.core.errors import IntegrityError, InvalidInput, SecurityError
from stages.core.workspace import Workspace, read_json
from stages.models.attestation import verify_attestation
from stages.models.safety import assert_safe_model_dir, scan_model_file
from stages.models.signing import verify_model_dir
from stages.models.store import client, resolve
from stages.models.weights import load_model_folder
from stages.trust.hashing import sha256_file
from stages.trust.verdict import load_verdict

# Files MLflow itself writes next to the artifacts (text metadata and the pyfunc code file).
MLFLOW_METADATA = {"MLmodel", "registered_model_meta", "requirements.txt", "conda.yaml", "python_env.yaml",
                   "input_example.json", "serving_input_example.json"}


def _locate(root: Path) -> Path:
    """The folder that holds weights/, model.sig and verdict.json inside a model tree."""
    for candidate in (root / "artifacts", root):
        if (candidate / "weights").is_dir():
            return candidate
    raise IntegrityError(f"{root} holds no pipeline model (no weights/ folder): refusing to load it")


def _scan_tree(root: Path, artifacts: Path) -> None:
    """No pickle anywhere; only allow-listed formats where weights are read from."""
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
    import mlflow  # MLflow: slow to import, kept off the command line's start

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

    local = Path(uri)
    if local.exists():
        evidence = verify_model_tree(local)
        return load_model_folder(evidence["weights_dir"])
    mlflow_uri = uri
    tag_sha = None
    if not uri.startswith(("models:/", "runs:/", "file:", "mlflow-artifacts:")):
        mlflow_uri = f"models:/{uri}"
    if mlflow_uri.startswith("models:/"):

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

    run = client(ws).get_run(mv.run_id)
    try:
        import mlflow  # MLflow: slow to import, kept off the command line's start

        vpath = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="reports/validation.json")
        evidence["validation"] = read_json(Path(vpath))
    except Exception:  # noqa: BLE001 - older runs may lack it; promotion then keeps the old reference
        evidence["validation"] = {}
    evidence["run_metrics"] = dict(run.data.metrics)
    return evidence
