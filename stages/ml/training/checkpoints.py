"""Checkpoints: everything needed to resume ``fit`` after an interruption, sealed and written atomically.

A checkpoint decides what gets trained (a file at the last epoch skips training altogether,
and a DP run restores its privacy accountant from it), so it is a record like any other:
:class:`CheckpointStore` seals each one with an HMAC-SHA256 under a key the run holds (the
train stage derives it from the pipeline's signing key; this layer never sees the key
folder), bound to the run id, the digest of the training data, the digest of the training
settings and the epoch. On resume:

* no file: train from scratch;
* a file whose seal does not verify, that is not a sealed checkpoint at all, or that was
  sealed for another run: :class:`CheckpointRefused` (an ``IntegrityError``, exit 4; the
  train stage records an ``integrity.violation``), and the file is left where it is;
* a sealed checkpoint of this run for other data or settings (``dvc repro`` after an edit
  of ``params.yaml`` reuses the run id ``dvc``): not resumed; training starts over and
  :attr:`CheckpointStore.discarded` says why.

File layout: ``MAGIC``, a 4-byte big-endian header length, the header (canonical JSON:
format, run_id, data_sha256, params_sha256, epoch, payload_sha256, mac), then the payload
as ``torch.save`` bytes, loaded with ``weights_only=True`` only after the seal verified.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core.canonical import canonical_json
from stages.core.errors import IntegrityError, InvalidInput
from stages.core.params import TrainParams

CHECKPOINT_FORMAT = 2
MAGIC = b"MLSEC-CHECKPOINT\n"
CHECKPOINT_NAME = "last.pt"
_MAX_HEADER = 64 * 1024  # bytes


class CheckpointRefused(IntegrityError):
    """A checkpoint that may not be resumed from: unsealed, forged, changed or of another run."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"refusing checkpoint {path}: {reason}")
        self.path, self.reason = Path(path), reason


def checkpoint_binding(X: np.ndarray, y: np.ndarray, params: TrainParams, num_classes: int) -> dict[str, str]:
    """What a checkpoint must match to be resumed: the training data and the training settings.

    ``data_sha256``: SHA-256 over the shapes and bytes of ``X`` and ``y``; ``params_sha256``:
    SHA-256 of the canonical JSON of ``params`` (loader workers left out: they do not change
    the result), ``num_classes`` and the checkpoint format.
    """
    data = hashlib.sha256(canonical_json({"X": list(X.shape), "y": list(y.shape), "X_dtype": str(X.dtype),
                                          "y_dtype": str(y.dtype)}))
    data.update(np.ascontiguousarray(X).tobytes())
    data.update(np.ascontiguousarray(y).tobytes())
    settings = params.model_dump(mode="json")
    settings.pop("num_workers", None)
    digest = hashlib.sha256(canonical_json({"format": CHECKPOINT_FORMAT, "params": settings, "num_classes": num_classes}))
    return {"data_sha256": data.hexdigest(), "params_sha256": digest.hexdigest()}


class CheckpointStore:
    """The sealed checkpoint of one run: ``<folder>/last.pt``.

    Parameters
    ----------
    folder : where the checkpoint lives (``runs/<run>/checkpoints``).
    run_id : the run the checkpoints belong to; a checkpoint sealed for another run is refused.
    key : the sealing secret, at least 32 bytes; whoever lacks it cannot make a checkpoint
        this store accepts.
    """

    def __init__(self, folder: Path, *, run_id: str, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) < 32:
            raise InvalidInput("a checkpoint store needs a key of at least 32 bytes")
        if not run_id:
            raise InvalidInput("a checkpoint store needs the run id its checkpoints belong to")
        self.folder, self.run_id, self._key = Path(folder), run_id, key
        self.discarded: str | None = None  # why a sealed checkpoint of this run was not resumed

    def __repr__(self) -> str:
        return f"CheckpointStore(folder={str(self.folder)!r}, run_id={self.run_id!r})"

    @property
    def path(self) -> Path:
        return self.folder / CHECKPOINT_NAME

    def _mac(self, header: dict[str, Any]) -> str:
        body = {k: v for k, v in header.items() if k != "mac"}
        return hmac.new(self._key, canonical_json(body), hashlib.sha256).hexdigest()

    def save(self, payload: dict[str, Any], *, binding: dict[str, str], epoch: int) -> None:
        """Seal ``payload`` (the state after ``epoch`` epochs) and replace the checkpoint atomically."""
        buf = io.BytesIO()
        torch.save(payload, buf)
        body = buf.getvalue()
        header = {"format": CHECKPOINT_FORMAT, "run_id": self.run_id, "data_sha256": binding["data_sha256"],
                  "params_sha256": binding["params_sha256"], "epoch": int(epoch),
                  "payload_sha256": hashlib.sha256(body).hexdigest()}
        header["mac"] = self._mac(header)
        head = canonical_json(header)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(MAGIC + struct.pack(">I", len(head)) + head + body)
        os.replace(tmp, self.path)

    def _read(self) -> bytes | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        except OSError as err:
            raise CheckpointRefused(self.path, f"it cannot be opened safely ({err.strerror})") from None
        with os.fdopen(fd, "rb") as fh:
            return fh.read()

    def load(self, binding: dict[str, str]) -> dict[str, Any] | None:
        """The verified payload to resume from, or None (no checkpoint, or a stale one of this run).

        Raises :class:`CheckpointRefused` for anything not sealed with this store's key for
        this run. The bytes are read once: the seal is checked on the bytes that are loaded.
        """
        self.discarded = None
        raw = self._read()
        if raw is None:
            return None
        header = self._header(raw)
        if not hmac.compare_digest(str(header.get("mac", "")), self._mac(header)):
            raise CheckpointRefused(self.path, "its seal does not verify: it was not written by this pipeline's key "
                                               "(planted or edited)")
        if header.get("run_id") != self.run_id:
            raise CheckpointRefused(self.path, f"it was sealed for run {header.get('run_id')!r}, not for run {self.run_id!r}")
        body = raw[len(MAGIC) + 4 + struct.unpack(">I", raw[len(MAGIC):len(MAGIC) + 4])[0]:]
        if hashlib.sha256(body).hexdigest() != header.get("payload_sha256"):
            raise CheckpointRefused(self.path, "its payload does not match the sealed digest")
        stale = [k.removesuffix("_sha256") for k in ("data_sha256", "params_sha256") if header.get(k) != binding[k]]
        if stale:
            self.discarded = f"sealed for other {' and '.join(stale)} than this training (epoch {header.get('epoch')})"
            return None
        try:
            payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - sealed but unloadable: a torch version change
            raise CheckpointRefused(self.path, f"its payload cannot be loaded ({type(err).__name__})") from None
        if not isinstance(payload, dict) or payload.get("epoch") != header.get("epoch"):
            raise CheckpointRefused(self.path, "its payload's epoch differs from the sealed epoch")
        return payload

    def _header(self, raw: bytes) -> dict[str, Any]:
        if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 4:
            raise CheckpointRefused(self.path, "it is not a sealed checkpoint (no seal header)")
        (n,) = struct.unpack(">I", raw[len(MAGIC):len(MAGIC) + 4])
        if n > _MAX_HEADER or len(MAGIC) + 4 + n > len(raw):
            raise CheckpointRefused(self.path, f"its seal header length {n} does not fit the file")
        try:
            header = json.loads(raw[len(MAGIC) + 4:len(MAGIC) + 4 + n])
        except ValueError:
            raise CheckpointRefused(self.path, "its seal header is not JSON") from None
        if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointRefused(self.path, "its seal header has an unknown format")
        return header


def _rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(), "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    for k, g in generators.items():
        g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
