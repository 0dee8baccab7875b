"""Verify-on-load: a model folder (an MLflow download or a run's package) is checked, whole,
against its signature, its signed verdict and its attestation before any weight is read.
``load_verified_model`` is the one way the project loads a registered model.

The signature (``model.sig``, OpenSSF model-signing) covers every file MLflow serves:
``MLmodel``, the pyfunc code, the environment files, the input example and ``artifacts/``
(weights, verdict, attestation). The one file it cannot cover is ``registered_model_meta``,
which MLflow writes on download; it is scanned like the rest. A version loaded by
reference must also be one the ledger says the pipeline registered (same weights), not
revoked, and when named by alias, the alias must point where the ledger says it was moved.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from stages.core.errors import IntegrityError, InvalidInput
from stages.core.workspace import Workspace, read_json
from stages.models.aliases import assert_alias_recorded
from stages.models.attestation import verify_attestation
from stages.models.records import assert_not_revoked, registration
from stages.models.safety import SIGNATURE_NAME
from stages.models.signing import verify_model_dir
from stages.models.store import client, parse_ref, resolve
from stages.models.weights import load_model_folder
from stages.trust.hashing import sha256_file
from stages.trust.verdict import load_verdict, verdict_digest

DOWNLOAD_ADDED = ("registered_model_meta",)  # written by MLflow when it downloads a registered version


def verify_model_tree(root: Path) -> dict[str, Any]:
    """Verify a model folder (MLflow download or a run's package); return its evidence."""
    root = Path(root)
    sig = root / SIGNATURE_NAME
    if not sig.is_file():
        if (root / "artifacts" / SIGNATURE_NAME).is_file():
            raise IntegrityError("model was signed over its weights only, not as the whole folder MLflow serves: "
                                 "refusing it; register it again")
        raise IntegrityError("model has no signature (model.sig): refusing to load an unsigned model")
    verify_model_dir(root, sig, ignore=DOWNLOAD_ADDED)  # then scans every file: no pickle anywhere
    artifacts = root / "artifacts"
    weights_dir = artifacts / "weights"
    weights_sha = sha256_file(weights_dir / "model.safetensors")
    verdict_path = artifacts / "verdict.json"
    if not verdict_path.is_file():
        raise IntegrityError("model has no gate verdict: refusing to load it")
    verdict_doc = read_json(verdict_path)
    verdict = load_verdict(verdict_doc, weights_sha256=weights_sha)
    config_sha = sha256_file(weights_dir / "model.json")
    if verdict.get("model_config_sha256") != config_sha:
        raise IntegrityError("model.json does not match the configuration the gate saw")
    if not (artifacts / "attestation.json").is_file():
        raise IntegrityError("model has no attestation: refusing to load it")
    subjects = {"model.safetensors": weights_sha, "model.json": config_sha}
    spec = _verified_preprocessing(weights_dir)
    if spec is not None:
        subjects["preprocessing.json"] = sha256_file(weights_dir / "preprocessing.json")
    attestation = verify_attestation(read_json(artifacts / "attestation.json"), expected_subjects=subjects)
    return {"weights_dir": weights_dir, "weights_sha256": weights_sha, "verdict": verdict,
            "verdict_sha256": verdict_digest(verdict_doc), "attestation": attestation, "preprocessing": spec}


def _verified_preprocessing(weights_dir: Path) -> dict[str, Any] | None:
    """The preprocessing spec ``model.json`` names, checked against the SHA-256 recorded there
    (model.json is bound to the gate's verdict). None for a model trained before specs existed."""
    config = read_json(weights_dir / "model.json")
    want = config.get("preprocessing_sha256")
    path = weights_dir / "preprocessing.json"
    if want is None:
        if path.exists():
            raise IntegrityError("preprocessing.json is not recorded in model.json: refusing to load it")
        return None
    if not path.is_file() or sha256_file(path) != want:
        raise IntegrityError("preprocessing.json does not match the SHA-256 recorded in model.json")
    return read_json(path)


def _with_preprocessing(evidence: dict[str, Any]):
    """The verified network, behind its verified preprocessing when the model has one."""
    net = load_model_folder(evidence["weights_dir"])
    if evidence.get("preprocessing") is None:
        return net
    from stages.ml.raw_inputs import (
        RawInputModel,  # torch: slow to import, kept off the command line's start
    )

    return RawInputModel(net, evidence["preprocessing"]).eval()


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
    or a local model folder. Refuses (``IntegrityError``, exit 4) on a missing or bad
    signature, a changed or added file anywhere in the folder, a verdict that does not bless
    these weights, a preprocessing spec other than the one ``model.json`` records, any
    pickle-bearing file, a version the ledger did not register, an alias the ledger did not
    move there, and a revoked version (``ModelRevoked``). The model applies its signed
    preprocessing (``stages.ml.raw_inputs.RawInputModel``), so it takes rows as the user has
    them: images as float32 on [0, 1] or uint8 pixels (N x C x H x W or channels-last), tables
    as raw rows in the user's units (a float tensor, a pandas DataFrame or a list of dicts); it
    returns logits over ``model.json``'s class list. ``.net`` is the network on the scaled
    [0, 1] features.
    """
    ws = Workspace.from_env()
    local = Path(uri)
    if local.exists():
        evidence = verify_model_tree(local)
        if ws.ledger_path.exists():  # a folder outside the registry: revoked weights are still refused
            assert_not_revoked(ws, name="", weights_sha256=evidence["weights_sha256"])
        return _with_preprocessing(evidence)
    if uri.startswith(("runs:/", "file:", "mlflow-artifacts:")):
        raise InvalidInput(f"load a registered model by reference (models:/NAME/VERSION or NAME@ALIAS), not {uri}")
    name, alias, _ = parse_ref(uri)
    if alias:
        assert_alias_recorded(ws, name, alias)
    mv = resolve(ws, uri)
    with tempfile.TemporaryDirectory(prefix="mlsec-model-") as tmp:
        evidence = _blessed(verify_version(ws, mv, Path(tmp)))
        return _with_preprocessing(evidence)


def verified_preprocessing(uri: str) -> dict[str, Any] | None:
    """The signed preprocessing spec of a registered version (``models:/NAME/VERSION``), after
    the same verification as :func:`load_verified_model`, without building the network; None
    for a version trained before specs existed. Refuses as ``load_verified_model`` does."""
    ws = Workspace.from_env()
    with tempfile.TemporaryDirectory(prefix="mlsec-spec-") as tmp:
        evidence = _blessed(verify_version(ws, resolve(ws, uri), Path(tmp)))
    return evidence["preprocessing"]


def _blessed(evidence: dict[str, Any]) -> dict[str, Any]:
    """``evidence`` of a verified version whose signed verdict passed the gate; else IntegrityError."""
    if not evidence["verdict"].get("passed"):
        raise IntegrityError("the model's verdict is NOT_BLESSED: refusing to load it")
    return evidence


def verify_version(ws: Workspace, mv, dest: Path) -> dict[str, Any]:
    """Download ``mv`` into ``dest`` and verify it against its signature and the ledger."""
    evidence = verify_model_tree(_download(f"models:/{mv.name}/{mv.version}", dest))
    record = registration(ws, mv.name, str(mv.version))
    if record["weights_sha256"] != evidence["weights_sha256"]:
        raise IntegrityError(f"{mv.name}/{mv.version}: the artifact store serves weights {evidence['weights_sha256'][:16]}..., "
                             f"the ledger registered {record['weights_sha256'][:16]}...")
    if record.get("verdict_sha256") != evidence["verdict_sha256"]:
        raise IntegrityError(f"{mv.name}/{mv.version}: the artifact store serves another verdict than the one registered")
    assert_not_revoked(ws, name=mv.name, version=str(mv.version), weights_sha256=evidence["weights_sha256"])
    return evidence


def verify_registered_version(ws: Workspace, mv) -> dict[str, Any]:
    """Download a version and verify it fully (signature, verdict, attestation, ledger record)."""
    with tempfile.TemporaryDirectory(prefix="mlsec-verify-") as tmp:
        evidence = verify_version(ws, mv, Path(tmp))
        evidence.pop("weights_dir")
    return evidence
