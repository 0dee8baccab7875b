"""The verified data a served version is calibrated on: its run's accepted training rows,
held-out rows and the statistics of its training data.

A registered version names the run that produced it (tag ``mlsec.run_id``). Tags are
mutable, so the run is accepted only when its signed artifact index records exactly the
weights the version was verified with; the rows are then read through the run context,
which checks every byte against the signed manifest and the signed index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.core.errors import IntegrityError
from stages.core.workspace import Workspace
from stages.data.expectations.statistics import dataset_statistics
from stages.data.prepared import load_npz_bytes, parse_prepared
from stages.data.preprocessing import model_inputs
from stages.data.reference import reference_path
from stages.trust.context import RunContext
from stages.trust.signing import verify_document

WHERE = "serve"
SIGNED_FEATURES = "signed training statistics (scaled features)"
LEGACY_FEATURES = ("verified training rows (scaled features; the version's run recorded no signed feature "
                   "statistics: written before train recorded them)")


@dataclass
class ServedReference:
    run_id: str
    data_sha256: str
    X_train: np.ndarray          # accepted training rows as the network sees them: float32 on [0, 1], its input shape
    y_train: np.ndarray
    X_held: np.ndarray           # held-out rows that screening accepted
    y_held: np.ndarray
    statistics: dict[str, Any]   # dataset statistics of the training data (``feature_mean``, ``feature_std``, ...)
    statistics_source: str       # where ``statistics`` came from (``SIGNED_FEATURES``, ``LEGACY_FEATURES``, ...)


def _subsample(idx: np.ndarray, labels: np.ndarray, most: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if len(idx) <= most:
        return idx, labels
    pick = np.sort(np.random.default_rng(seed).choice(len(idx), size=most, replace=False))
    return idx[pick], labels[pick]


def served_reference(ws: Workspace, *, model: str, run_id: str, weights_sha256: str, input_shape: tuple[int, ...],
                     most_rows: int, preprocessing: dict[str, Any] | None = None, seed: int = 0) -> ServedReference:
    """Read and verify the reference data of the version whose weights are ``weights_sha256``.

    ``preprocessing`` is the version's signed spec: for a table (``kind: table``) the rows
    are returned as the scaled features the network sees, and the statistics are those the
    train stage recorded of the scaled training rows in the run's signed artifact index
    (``feature_statistics``; the project's drift reference describes the prepared rows in
    the user's units, another scale). A run trained before train recorded them falls back
    to computing them from the verified training rows, and ``statistics_source`` says so.

    Raises ``IntegrityError`` when the run did not produce these weights or any byte differs
    from its signed record.
    """
    ctx = RunContext(ws, run_id)
    recorded = ctx.recorded(where=WHERE)
    if recorded.get("weights", {}).get("sha256") != weights_sha256:
        raise IntegrityError(f"run {run_id} did not produce the served weights {weights_sha256[:16]}...: "
                             "its reference data cannot calibrate them")
    files, manifest = ctx.dataset_bytes(where=WHERE)          # parsed from the bytes that were checked
    X, _, _, meta = parse_prepared(files)
    table = bool(preprocessing) and preprocessing.get("kind") == "table"
    if table:
        X = model_inputs(X, meta, preprocessing)
    split = load_npz_bytes(ctx.input_bytes("split", where=WHERE)["split"])
    train_idx, train_lab = split["accepted_idx"], split["accepted_labels"]
    held_idx, held_lab = split["eval_idx"], split["eval_labels"]
    shape = (-1, *input_shape)
    if table and "feature_statistics" in recorded:   # checked against the signed index as read
        statistics, source = _feature_statistics(ctx, manifest["merkle_root"]), SIGNED_FEATURES
    elif table:
        statistics, source = dataset_statistics(X[train_idx], train_lab), LEGACY_FEATURES
    else:
        statistics, source = _statistics(ws, model, manifest["merkle_root"], X[train_idx], train_lab)
    t_idx, t_lab = _subsample(train_idx, train_lab, most_rows, seed)
    h_idx, h_lab = _subsample(held_idx, held_lab, most_rows, seed + 1)
    return ServedReference(run_id=run_id, data_sha256=manifest["merkle_root"],
                           X_train=np.ascontiguousarray(X[t_idx], dtype=np.float32).reshape(shape),
                           y_train=t_lab.astype(np.int64),
                           X_held=np.ascontiguousarray(X[h_idx], dtype=np.float32).reshape(shape),
                           y_held=h_lab.astype(np.int64), statistics=statistics, statistics_source=source)


def _feature_statistics(ctx: RunContext, data_sha256: str) -> dict[str, Any]:
    """The run's signed statistics of its scaled training features (``IntegrityError`` when
    the file differs from the signed index or describes other data)."""
    doc = ctx.read_input_json("feature_statistics", where=WHERE)
    if doc.get("data_sha256") != data_sha256 or not isinstance(doc.get("statistics"), dict):
        raise IntegrityError(f"run {ctx.run_id}'s feature statistics describe data {str(doc.get('data_sha256'))[:16]}..., "
                             f"not its data {data_sha256[:16]}...")
    return doc["statistics"]


def _statistics(ws: Workspace, model: str, data_sha256: str, X_train: np.ndarray,
                y_train: np.ndarray) -> tuple[dict[str, Any], str]:
    """The signed drift reference when it describes this version's data; else the statistics
    of the verified training rows themselves (a rolled-back version's reference was replaced)."""
    path = reference_path(ws, model)
    if path.exists():
        try:
            doc = verify_document(json.loads(path.read_text()))
        except ValueError:
            raise IntegrityError(f"drift reference {path} is not valid JSON") from None
        if doc.get("data_sha256") == data_sha256 and doc.get("statistics"):
            return doc["statistics"], "signed reference"
    return dataset_statistics(X_train, y_train), "verified training rows"
