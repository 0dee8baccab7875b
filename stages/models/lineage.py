"""Lineage and audit: follow a model version back to the bytes it was trained on.

``lineage`` builds the chain from what MLflow and the ledger hold::

    data (manifest Merkle root, DVC hash) -> validation report -> quarantine list ->
    training (params digest, git commit, environment lock) -> evaluation report ->
    gate verdict -> weights digest and signature -> alias history

``verify=True`` re-checks every digest and signature in it: the signed manifest and
artifact index, each report against the index, the data bytes (re-hashed, restored
through DVC when not present locally), the model files against their signature, the
verdict and the attestation, the registry tags, the ledger chain and the alias history.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from stages.core.errors import IntegrityError, PipelineError
from stages.core.workspace import Workspace, read_json
from stages.models.aliases import ANCHOR_TAG, alias_drift, ledger_aliases
from stages.models.attestation import PROMOTION_FOLDER, verify_attestation
from stages.models.records import revocation
from stages.trust.approvals import approval_digest
from stages.models.store import client, resolve
from stages.models.verify import verify_registered_version
from stages.trust.hashing import check_relative_path, merkle_root, sha256_file
from stages.trust.ledger import Ledger, verify_chain
from stages.trust.provenance import dvc_restore
from stages.trust.signing import verify_document

REPORTS = ("manifest.json", "artifacts.json", "validation.json", "quarantine.json", "train.json", "evaluation.json",
           "verdict.json", "environment.lock", "attestation.json")


def _anchors(ws: Workspace) -> list[dict[str, Any]]:
    """Ledger heads recorded in MLflow runs at registration and at each alias move (so a
    rewritten ledger is caught against MLflow)."""
    c = client(ws)
    anchors = []
    try:
        experiments = c.search_experiments()
    except Exception:  # noqa: BLE001 - no store yet
        return anchors
    for exp in experiments:
        for run in c.search_runs([exp.experiment_id], max_results=5000):
            raw = run.data.tags.get("mlsec.ledger_head")
            if raw and raw != "null":
                head = json.loads(raw)
                anchors.append({"seq": head["seq"], "hash": head["hash"], "source": f"MLflow run {run.info.run_id}"})
            for key, value in run.data.tags.items():
                seq = key.removeprefix(ANCHOR_TAG + ".")
                if key.startswith(ANCHOR_TAG + ".") and seq.isdigit():
                    anchors.append({"seq": int(seq), "hash": value,
                                    "source": f"alias move anchor {key} on MLflow run {run.info.run_id}"})
    return anchors


def audit_verify(ws: Workspace) -> dict[str, Any]:
    report = verify_chain(ws.ledger_path, anchors=_anchors(ws))
    return report.to_dict()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lineage(ws: Workspace, ref: str, *, verify: bool = False, restore: str | None = None) -> dict[str, Any]:
    import mlflow  # MLflow: slow to import, kept off the command line's start

    mv = resolve(ws, ref)
    c = client(ws)
    tags = dict(mv.tags or {})
    run = c.get_run(mv.run_id)
    checks: list[dict[str, Any]] = []

    def check(name: str, fn) -> Any:
        try:
            detail = fn()
            checks.append({"check": name, "ok": True, "detail": detail})
            return detail
        except PipelineError as err:
            checks.append({"check": name, "ok": False, "detail": str(err)})
        except Exception as err:  # noqa: BLE001 - a check that cannot run counts as failed
            checks.append({"check": name, "ok": False, "detail": f"could not run: {type(err).__name__}: {err}"})
        return None

    with tempfile.TemporaryDirectory(prefix="mlsec-lineage-") as tmp:
        tmpdir = Path(tmp)
        reports = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="reports", dst_path=str(tmpdir / "r")))
        docs = {name: reports / name for name in REPORTS if (reports / name).exists()}

        raw_manifest = read_json(docs["manifest.json"])
        manifest = raw_manifest["payload"]
        verdict = read_json(docs["verdict.json"])["payload"]
        evaluation = read_json(docs["evaluation.json"])
        quarantine = read_json(docs["quarantine.json"])
        state, history = ledger_aliases(ws, mv.name)
        chain = {
            "model": {"name": mv.name, "version": str(mv.version), "uri": f"models:/{mv.name}/{mv.version}",
                      "aliases": [a for a, v in state.items() if v == str(mv.version)]},
            "data": {"source": manifest["source"], "merkle_root": manifest["merkle_root"], "dvc_md5": manifest["dvc"]["md5"],
                     "dvc_remote": manifest["dvc"].get("remote"), "prepared_dir": manifest["prepared_dir"],
                     "files": manifest["files"], "manifest_sha256": _sha(docs["manifest.json"]),
                     "signed_by": raw_manifest["signature"]["key_id"]},
            "validation": {"report_sha256": _sha(docs["validation.json"]), "success": read_json(docs["validation.json"]).get("success")},
            "quarantine": {"list_sha256": _sha(docs["quarantine.json"]), "count": quarantine.get("count")},
            "training": {"run_id": tags.get("mlsec.run_id"), "mlflow_run_id": mv.run_id, "params_sha256": manifest["params_sha256"],
                         "git_commit": manifest["git"]["commit"], "git_dirty": manifest["git"]["dirty"],
                         "environment_lock_sha256": manifest["environment_lock_sha256"], "mode": run.data.params.get("train.mode")},
            "evaluation": {"report_sha256": _sha(docs["evaluation.json"]), "metrics": evaluation.get("metrics")},
            "gate": {"verdict": verdict["verdict"], "verdict_sha256": _sha(docs["verdict.json"]), "failed": verdict.get("failed"),
                     "decided_at": verdict.get("decided_at"), "triggered_by": verdict.get("triggered_by")},
            "policy": _policy_summary(verdict),
            "revoked": revocation(ws, name=mv.name, version=str(mv.version)),
            "weights": {"sha256": verdict["weights_sha256"], "registered_sha256": tags.get("mlsec.weights_sha256"),
                        "signature": "model.sig (OpenSSF model-signing, ECDSA P-256)"},
            "alias_history": history,
            "review": _review_items(ws, tags.get("mlsec.run_id")),
        }
        if verify:
            check("manifest signature", lambda: (verify_document(raw_manifest), "valid")[1])
            index = check("artifact index signature", lambda: verify_document(read_json(docs["artifacts.json"])))

            def reports_match() -> str:
                if index is None:
                    raise IntegrityError("artifact index not verified")
                names = {"manifest": "manifest.json", "validation": "validation.json", "quarantine": "quarantine.json",
                         "train_report": "train.json", "evaluation": "evaluation.json", "verdict": "verdict.json",
                         "environment_lock": "environment.lock"}
                for key, fname in names.items():
                    want = index["artifacts"][key]["sha256"]
                    if _sha(docs[fname]) != want:
                        raise IntegrityError(f"{fname} in MLflow has SHA-256 {_sha(docs[fname])[:16]}..., the signed index says {want[:16]}...")
                return f"{len(names)} reports match the signed index"

            check("reports", reports_match)
            check("environment lock", lambda: _match(_sha(docs["environment.lock"]), manifest["environment_lock_sha256"], "environment.lock"))
            check("data bytes", lambda: _verify_data(ws, manifest, tmpdir))
            check("verdict signature", lambda: (verify_document(read_json(docs["verdict.json"])), "valid")[1])
            check("model files, signature and attestation", lambda: _verify_model(ws, mv))
            check("registry tags", lambda: _tags_match(tags, manifest, verdict))
            check("ledger chain", lambda: _ledger_ok(ws, tags.get("mlsec.run_id"), verdict))
            check("aliases", lambda: _no_drift(alias_drift(ws, mv.name)))
            check("not revoked", lambda: _not_revoked(chain["revoked"]))
            check("promotion attestations", lambda: _promotions(ws, mv, history, tmpdir))
        if restore:
            check("restore", lambda: _restore(ws, manifest, Path(restore)))
    result = {"chain": chain, "checks": checks}
    if verify:
        result["verified"] = all(c["ok"] for c in checks)
    if restore:
        result["restored_to"] = str(Path(restore).resolve())
    return result


def _review_items(ws: Workspace, run_id: str | None) -> dict[str, Any] | None:
    """The reviewed inputs the run was given (the ``review.train`` ledger entry under its run
    id, written by ``evasion-response`` before the run started), or None."""
    hits = [e for e in Ledger(ws.ledger_path).entries() if e.get("event") == "review.train" and e.get("run_id") == run_id]
    if not run_id or not hits:
        return None
    p = hits[-1]["payload"]
    return {"queue": p["queue"], "queue_sha256": p["queue_sha256"], "source": p["source"], "ledger_seq": hits[-1]["seq"],
            "reviewers_policy_sha256": p.get("reviewers_policy_sha256"),
            "items": [{k: it.get(k) for k in ("input_sha256", "label", "labelled_by", "labelled_key_id", "sample_sha256")}
                      for it in p["items"]]}


def _policy_summary(verdict: dict[str, Any]) -> dict[str, Any]:
    p = verdict.get("policy") or {}
    status = "unknown (no signed policy recorded)" if not p.get("signed_sha256") else (
        f"policy overridden: {p.get('summary')}" if p.get("overridden") else "as signed")
    return {"status": status, "signed_sha256": p.get("signed_sha256"), "signed_by": p.get("signed_by"), "trust": p.get("trust"),
            "overridden": p.get("overridden"), "weakened": p.get("weakened"), "differences": p.get("differences", []),
            "signed_policy_passed": p.get("signed_policy_passed")}


def _match(actual: str, expected: str, what: str) -> str:
    if actual != expected:
        raise IntegrityError(f"{what}: SHA-256 {actual[:16]}... differs from the recorded {expected[:16]}...")
    return "matches"


def _verify_files(folder: Path, manifest: dict[str, Any]) -> str:
    for entry in manifest["files"]:
        check_relative_path(entry["path"])
        path = folder / entry["path"]
        actual = sha256_file(path) if path.is_file() else "missing"
        _match(actual, entry["sha256"], f"{manifest['prepared_dir']}/{entry['path']}")
    root = merkle_root(manifest["files"])
    _match(root, manifest["merkle_root"], "Merkle root")
    return f"{len(manifest['files'])} files re-hashed; Merkle root {root[:16]}... matches"


def _verify_data(ws: Workspace, manifest: dict[str, Any], tmp: Path) -> str:
    check_relative_path(manifest["prepared_dir"])
    folder = ws.root / manifest["prepared_dir"]
    if folder.is_dir():
        return _verify_files(folder, manifest) + " (local copy)"

    dvc_restore(ws.root, md5=manifest["dvc"]["md5"], dest=tmp / "restored")
    return _verify_files(tmp / "restored", manifest) + " (restored through DVC)"


def _restore(ws: Workspace, manifest: dict[str, Any], dest: Path) -> str:
    dvc_restore(ws.root, md5=manifest["dvc"]["md5"], dest=dest)
    return _verify_files(dest, manifest) + f"; restored to {dest}"


def _verify_model(ws: Workspace, mv) -> str:
    ev = verify_registered_version(ws, mv)
    return f"weights {ev['weights_sha256'][:16]}... signed, blessed by a signed verdict, attested"


def _tags_match(tags: dict[str, str], manifest: dict[str, Any], verdict: dict[str, Any]) -> str:
    _match(tags.get("mlsec.data_sha256", "absent"), manifest["merkle_root"], "registry tag mlsec.data_sha256")
    _match(tags.get("mlsec.weights_sha256", "absent"), verdict["weights_sha256"], "registry tag mlsec.weights_sha256")
    return "data and weights tags match the signed records"


def _ledger_ok(ws: Workspace, run_id: str | None, verdict: dict[str, Any]) -> str:
    report = verify_chain(ws.ledger_path, anchors=_anchors(ws))
    if not report.ok:
        raise IntegrityError(f"ledger broken at line {report.first_bad_line}: {report.reason}")
    entries = [e for e in Ledger(ws.ledger_path).entries() if e.get("run_id") == run_id]
    gate = [e for e in entries if e["event"] == "gate.verdict"]
    if not gate or gate[-1]["payload"].get("weights_sha256") != verdict["weights_sha256"]:
        raise IntegrityError(f"the ledger holds no gate verdict of run {run_id} for these weights")
    return f"chain intact ({report.entries} entries); run {run_id} has {len(entries)} entries incl. its verdict"


def _not_revoked(hit: dict[str, Any] | None) -> str:
    if hit:
        raise IntegrityError(f"revoked at ledger seq {hit['seq']} by {hit['actor']}: {hit['reason']}")
    return "no revocation in the ledger"


def _promotions(ws: Workspace, mv, history: list[dict[str, Any]], tmp: Path) -> str:
    """Each champion move to this version has a signed promotion attestation in MLflow that
    names these approvals (by digest) as the ledger does."""
    import mlflow  # MLflow: slow to import, kept off the command line's start

    moves = [h for h in history if h["alias"] == "champion" and h["version"] == str(mv.version)]
    for move in moves:
        local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, dst_path=str(tmp / f"p{move['seq']}"),
                                                    artifact_path=f"{PROMOTION_FOLDER}/champion-seq{move['seq']}.json")
        stmt = verify_attestation(read_json(Path(local)))
        got = sorted(approval_digest(a) for a in stmt["predicate"].get("approvals", []))
        want = sorted(a["approval_sha256"] for a in move.get("approvals") or [])
        if got != want or stmt["predicate"].get("ledger_seq") != move["seq"]:
            raise IntegrityError(f"the promotion attestation of ledger seq {move['seq']} names other approvals than the ledger")
    return f"{len(moves)} champion promotion(s) attested with their signed approvals"


def _no_drift(drift: list[dict[str, Any]]) -> str:
    if drift:
        d = drift[0]
        raise IntegrityError(f"alias {d['alias']} is version {d['mlflow']} in MLflow but the ledger records {d['ledger']}: "
                             "moved outside the pipeline")
    return "aliases match the ledger"


def render_lineage(result: dict[str, Any]) -> str:
    ch = result["chain"]
    lines = [
        f"model      {ch['model']['uri']}  aliases {ch['model']['aliases'] or '-'}",
        f"data       {ch['data']['source']}",
        f"           merkle {ch['data']['merkle_root']}  dvc {ch['data']['dvc_md5']}  ({len(ch['data']['files'])} files in {ch['data']['prepared_dir']})",
        f"validation report {ch['validation']['report_sha256'][:16]}  success={ch['validation']['success']}",
        f"quarantine list {ch['quarantine']['list_sha256'][:16]}  {ch['quarantine']['count']} rows",
        f"training   run {ch['training']['run_id']}  mode {ch['training']['mode']}  params {ch['training']['params_sha256'][:16]}  "
        f"git {str(ch['training']['git_commit'])[:12]}{' (dirty)' if ch['training']['git_dirty'] else ''}  env {ch['training']['environment_lock_sha256'][:16]}",
        f"evaluation report {ch['evaluation']['report_sha256'][:16]}  "
        + "  ".join(f"{k}={v:.4f}" for k, v in (ch["evaluation"]["metrics"] or {}).items() if k in ("clean_accuracy", "robust_accuracy", "mia_auc", "dp_epsilon")),
        f"gate       {ch['gate']['verdict']}  verdict {ch['gate']['verdict_sha256'][:16]}  at {ch['gate']['decided_at']}",
        f"policy     {ch['policy']['status']}  (signed {str(ch['policy']['signed_sha256'])[:16]})",
        f"weights    {ch['weights']['sha256']}  {ch['weights']['signature']}",
        "aliases:",
    ]
    for h in ch["alias_history"]:
        signed = ", ".join(f"{a['identity']} (key {a['key_id'][:16]})" for a in h.get("approvals") or [])
        lines.append(f"  {h['time']}  {h['alias']} -> v{h['version']} (was {h['previous']})  by {h['actor']}"
                     f"{'  approved by ' + (signed or h['approver']) if h.get('approver') else ''}  reason: {h['reason']}")
    if ch.get("review"):
        rv = ch["review"]
        who = sorted({it["labelled_by"] for it in rv["items"]})
        under = f" under signed policy {rv['reviewers_policy_sha256'][:16]}" if rv.get("reviewers_policy_sha256") else ""
        lines.append(f"review     queue {rv['queue']}: {len(rv['items'])} labelled inputs added (labelled by "
                     f"{', '.join(who) or '-'}{under}; ledger seq {rv['ledger_seq']})")
    if ch.get("revoked"):
        lines.append(f"REVOKED at {ch['revoked']['time']} by {ch['revoked']['actor']}: {ch['revoked']['reason']}")
    for c in result.get("checks", []):
        lines.append(f"{'ok  ' if c['ok'] else 'FAIL'} {c['check']}: {c['detail'] if isinstance(c['detail'], str) else 'valid'}")
    if "verified" in result:
        lines.append("VERIFIED" if result["verified"] else "VERIFICATION FAILED")
    return "\n".join(lines)
