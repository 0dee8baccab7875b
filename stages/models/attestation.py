"""Build attestations: an in-toto Statement v1 with a SLSA provenance v1 predicate, in a DSSE
envelope signed with the pipeline's Ed25519 key (``stages.trust.signing``)."""

from __future__ import annotations

import json
import re

from google.protobuf import json_format
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
from in_toto_attestation.v1.statement import Statement

from stages.core.canonical import canonical_json
from stages.core.errors import IntegrityError, InvalidInput
from stages.trust.signing import sign_envelope, verify_envelope

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
DSSE_PAYLOAD_TYPE = "application/vnd.in-toto+json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _check_digest(what: str, name: str, digest: str) -> None:
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise InvalidInput(f"{what} {name!r}: sha256 must be 64 lowercase hex chars, got {str(digest)[:70]!r}")


def build_attestation(
    *,
    subjects: dict[str, str],
    materials: dict[str, str],
    builder_id: str,
    build_type: str,
    parameters: dict,
    run_id: str,
    started: str,
    finished: str,
) -> dict:
    """An in-toto Statement v1 with a SLSA provenance v1 predicate, as a plain dict.

    ``subjects``: artifact name -> sha256 hex (the model files). ``materials``: name or
    URI (anything containing ``://``) -> sha256 hex (data, code). ``started``/``finished``
    are RFC 3339 timestamps (``2024-05-01T12:00:00Z``). The statement is checked with the
    ``in_toto_attestation`` classes and the SLSA provenance protobuf schema.
    """

    if not subjects:
        raise InvalidInput("an attestation needs at least one subject")
    for name, digest in subjects.items():
        _check_digest("subject", name, digest)
    for name, digest in materials.items():
        _check_digest("material", name, digest)
    deps = [
        {"uri": name, "digest": {"sha256": d}} if "://" in name else {"name": name, "digest": {"sha256": d}}
        for name, d in sorted(materials.items())
    ]
    predicate = {
        "buildDefinition": {
            "buildType": build_type,
            "externalParameters": parameters,
            "resolvedDependencies": deps,
        },
        "runDetails": {
            "builder": {"id": builder_id},
            "metadata": {"invocationId": run_id, "startedOn": started, "finishedOn": finished},
        },
    }
    try:
        canonical_json(predicate)  # JSON-representable, no NaN
        json_format.ParseDict(predicate, provenance_pb2.Provenance())
        stmt = Statement(
            [ResourceDescriptor(name=n, digest={"sha256": d}).pb for n, d in sorted(subjects.items())],
            SLSA_PROVENANCE_V1,
            predicate,
        )
        stmt.validate()
    except (json_format.ParseError, ValueError, TypeError) as exc:
        raise InvalidInput(f"invalid provenance: {' '.join(str(exc).split())[:200]}") from None
    out = json_format.MessageToDict(stmt.pb)
    out["predicate"] = predicate  # keep the caller's JSON types (protobuf Struct makes ints floats)
    return out


def sign_attestation(statement: dict) -> dict:
    """Wrap ``statement`` in a DSSE envelope signed with the pipeline's Ed25519 key."""
    return sign_envelope(canonical_json(statement), payload_type=DSSE_PAYLOAD_TYPE)


def verify_attestation(envelope: dict, *, expected_subjects: dict[str, str] | None = None) -> dict:
    """Check a DSSE envelope and return its statement, or raise ``IntegrityError``.

    At least one signature must be by a trusted key, and every signature by a trusted key
    must be valid. With ``expected_subjects`` (name -> sha256) the statement's subjects
    must be exactly those.
    """
    payload = verify_envelope(envelope, payload_type=DSSE_PAYLOAD_TYPE, what="attestation")
    try:
        stmt = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise IntegrityError("attestation payload is not JSON") from None
    if not isinstance(stmt, dict) or stmt.get("_type") != STATEMENT_TYPE:
        raise IntegrityError("attestation payload is not an in-toto Statement v1")
    subjects = stmt.get("subject")
    if not isinstance(subjects, list) or not subjects:
        raise IntegrityError("attestation has no subjects")
    if expected_subjects is not None:
        seen: dict[str, str] = {}
        for sub in subjects:
            if not isinstance(sub, dict) or not isinstance(sub.get("digest"), dict):
                raise IntegrityError("attestation has a malformed subject")
            seen[str(sub.get("name"))] = str(sub["digest"].get("sha256"))
        missing = sorted(set(expected_subjects) - set(seen))
        extra = sorted(set(seen) - set(expected_subjects))
        changed = sorted(n for n in set(seen) & set(expected_subjects) if seen[n] != expected_subjects[n])
        problems = []
        if changed:
            n = changed[0]
            problems.append(
                f"{n} sha256 {expected_subjects[n][:12]}... expected, attested {seen[n][:12]}..."
                + (f" (+{len(changed) - 1} more)" if len(changed) > 1 else "")
            )
        if missing:
            problems.append("not attested: " + ", ".join(missing[:5]))
        if extra:
            problems.append("unexpected: " + ", ".join(extra[:5]))
        if problems:
            raise IntegrityError("attestation subject mismatch: " + "; ".join(problems))
    return stmt


PROMOTION_PREDICATE = "https://mlsec.local/promotion/v1"
PROMOTION_FOLDER = "promotion"  # in the MLflow run of the promoted version


def build_promotion_statement(*, model: str, version: str, weights_sha256: str, verdict_sha256: str, policy_sha256: str,
                              approvals: list[dict], reason: str, previous: str | None, ledger_seq: int) -> dict:
    """An in-toto Statement v1 about one promotion: which weights became the champion, under
    which signed policy and verdict, with which signed approvals (whole, so they can be
    re-verified from the attestation alone)."""
    _check_digest("subject", "model.safetensors", weights_sha256)
    predicate = {"model": model, "version": str(version), "alias": "champion", "previous": previous,
                 "verdict_sha256": verdict_sha256, "policy_sha256": policy_sha256, "approvals": approvals,
                 "reason": reason, "ledger_seq": ledger_seq}
    try:
        canonical_json(predicate)
        stmt = Statement([ResourceDescriptor(name="model.safetensors", digest={"sha256": weights_sha256}).pb],
                         PROMOTION_PREDICATE, predicate)
        stmt.validate()
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"invalid promotion statement: {' '.join(str(exc).split())[:200]}") from None
    out = json_format.MessageToDict(stmt.pb)
    out["predicate"] = predicate
    return out


def log_promotion_attestation(ws, mv, evidence: dict, *, policy_sha256: str, approvals: list[dict], reason: str,
                              ledger_seq: int, previous: str | None) -> str:
    """Sign the promotion statement (DSSE) and store it with the version's MLflow run; return its path there."""
    from stages.models.store import client

    stmt = build_promotion_statement(model=mv.name, version=str(mv.version), weights_sha256=evidence["weights_sha256"],
                                     verdict_sha256=evidence["verdict_sha256"], policy_sha256=policy_sha256,
                                     approvals=approvals, reason=reason, previous=previous, ledger_seq=ledger_seq)
    path = f"{PROMOTION_FOLDER}/champion-seq{ledger_seq}.json"
    client(ws).log_dict(mv.run_id, sign_attestation(stmt), path)
    return path
