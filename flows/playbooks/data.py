"""The data the incident playbooks work on: every dataset version in the workspace and the
champion's, each read through its signed manifest; suspect rows by digest or trigger."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.errors import IntegrityError, InvalidInput
from stages.core.workspace import Workspace
from stages.data.labels import encode_labels
from stages.data.prepared import parse_prepared
from stages.data.preprocessing import column_values, table_columns
from stages.models.store import resolve
from stages.data.prepared import row_digest as sample_digest  # a quarantine entry's sha256
from stages.trust.context import RunContext

TRIGGER_TOLERANCE = 1e-3   # on the [0, 1] scale: a stamped pixel matches its pattern value within this


@dataclass
class DatasetVersion:
    run_id: str
    data_sha256: str
    source: str
    X: np.ndarray
    y: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)   # the prepared meta.json: kind, classes, input shape

    @property
    def classes(self) -> list[Any]:
        return list(self.meta.get("classes") or range(int(self.meta.get("num_classes") or int(self.y.max()) + 1)))

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "image"))


def _read(ws: Workspace, run_id: str) -> DatasetVersion:
    files, manifest = RunContext(ws, run_id).dataset_bytes(where="playbook")   # parsed from the checked bytes
    X, y, _, meta = parse_prepared(files)
    return DatasetVersion(run_id, manifest["merkle_root"], str(manifest.get("source")), X, y, meta)


def dataset_versions(ws: Workspace) -> list[DatasetVersion]:
    """Every distinct dataset version a run of this workspace ingested (verified bytes)."""
    seen: dict[str, DatasetVersion] = {}
    for manifest in sorted(ws.runs_dir.glob("*/manifest.json")):
        version = _read(ws, manifest.parent.name)
        seen.setdefault(version.data_sha256, version)
    return list(seen.values())


def champion_data(ws: Workspace, model: str) -> DatasetVersion:
    """The dataset version the current champion was trained on."""
    mv = resolve(ws, f"{model}@champion")
    run_id = (mv.tags or {}).get("mlsec.run_id")
    if not run_id:
        raise IntegrityError(f"{model}@champion names no run: its training data cannot be found")
    version = _read(ws, run_id)
    if version.data_sha256 != (mv.tags or {}).get("mlsec.data_sha256"):
        raise IntegrityError(f"{model}@champion: run {run_id}'s data is not the data the version was registered with")
    return version


def read_digests(path: str) -> set[str]:
    """SHA-256 digests, one per line, or a quarantine list (``samples[].sha256``)."""
    import json

    text = Path(path).read_text() if Path(path).is_file() else None
    if text is None:
        raise InvalidInput(f"digest file not found: {path}")
    try:
        doc = json.loads(text)
        items = [s["sha256"] for s in doc.get("payload", doc)["samples"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        items = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    bad = [d for d in items if len(d) != 64 or any(c not in "0123456789abcdef" for c in d)]
    if bad or not items:
        raise InvalidInput(f"{path}: expected SHA-256 hex digests, got {bad[:1] or 'none'}")
    return set(items)


def load_trigger(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A trigger ``.npz`` with ``mask`` (bool) and ``pattern`` (floats on [0, 1]) of one input's shape."""
    try:
        with np.load(path, allow_pickle=False) as f:
            mask, pattern = np.asarray(f["mask"], dtype=bool), np.asarray(f["pattern"], dtype=np.float32)
    except (OSError, KeyError, ValueError) as err:
        raise InvalidInput(f"trigger file {path}: {err} (expected an .npz with 'mask' and 'pattern')") from None
    if mask.shape != pattern.shape or not mask.any():
        raise InvalidInput(f"trigger file {path}: mask {mask.shape} and pattern {pattern.shape} must match and mask something")
    return mask, pattern


def find_suspects(X: np.ndarray, y: np.ndarray, *, digests: set[str],
                  trigger: tuple[np.ndarray, np.ndarray] | None) -> list[tuple[int, str]]:
    """(row, reason) of rows whose digest is listed or that carry the trigger."""
    hits: dict[int, str] = {}
    if digests:
        for i in range(len(y)):
            if sample_digest(X, int(y[i]), i) in digests:
                hits[i] = "listed digest"
    if trigger is not None:
        mask, pattern = trigger
        if mask.size != X[0].size:
            raise InvalidInput(f"trigger has {mask.size} values, the data's rows {X[0].size}")
        flat = X.reshape(len(X), -1)
        m = mask.reshape(-1)
        stamped = np.abs(flat[:, m] - pattern.reshape(-1)[m]).max(axis=1) <= TRIGGER_TOLERANCE
        for i in np.flatnonzero(stamped):
            hits.setdefault(int(i), "carries the trigger")
    return sorted(hits.items())


def write_source(ws: Workspace, name: str, data: DatasetVersion, X: np.ndarray, positions: np.ndarray, *,
                 label_column: str, declared: list[Any] | None) -> tuple[str, list[str]]:
    """Write rows in ``data``'s prepared form (``X``, class positions ``positions`` into
    ``data.classes``) as a new source under ``data/purged/`` that ingest versions like any
    other, and reads back as the same data: labels as the class names (never positions, so
    the run's class list is ``data``'s), a table as a CSV with its named columns (categories
    as text, missing cells empty, the labels in ``label_column``), images as an ``.npz``.

    Returns ``(source, overrides)``: ``overrides`` holds ``data.classes`` when ingest would
    otherwise find or order the classes differently (``declared``: the run's
    ``data.classes`` setting), e.g. when every row of a class was removed.
    """
    classes = data.classes
    names = np.asarray([classes[int(p)] for p in positions])
    overrides: list[str] = []
    try:
        _, ordered = encode_labels(names, declared=declared, where="playbook source")
    except InvalidInput:
        ordered = None
    if ordered is None or [str(c) for c in ordered] != [str(c) for c in classes]:
        overrides.append(f"data.classes={json.dumps(list(classes))}")
    folder = ws.root / "data" / "purged"
    folder.mkdir(parents=True, exist_ok=True)
    if data.kind == "table":
        import pandas as pd  # slow to import; only a table's playbook pays

        columns = table_columns(data.meta, X.shape[1])
        frame = pd.DataFrame({c["name"]: v for c, v in zip(columns, column_values(X, columns))})
        frame[label_column] = names
        out = folder / f"{name}.csv"
        frame.to_csv(out, index=False)
    else:
        out = folder / f"{name}.npz"
        np.savez(out, X=X, y=names)
    return str(out), overrides
