"""Weights on disk: safetensors only, never pickle.

``save_model`` writes ``model.safetensors`` + ``model.json`` (architecture and shapes);
``load_model_folder`` rebuilds the network from them (callers verify the bytes first), and
``load_model_bytes`` from their bytes as checked (no second read).
``load_safetensors`` bounds the header before the ``safetensors`` parser sees it: a length
cap (``MAX_SAFETENSORS_HEADER``, far below the parser's own 100 MB), no duplicate keys (the
parser keeps the last one silently: two readers could see two different tensors) and a
rank cap. Offsets, coverage, dtypes and sizes are the parser's own checks.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from safetensors import safe_open

from stages.core.errors import SecurityError
from stages.core.workspace import write_json

MAX_SAFETENSORS_HEADER = 16 * 1024 * 1024  # bytes of JSON header; real headers are < 1 MiB
MAX_TENSOR_RANK = 16


def save_model(model, folder: Path, config: dict[str, Any]) -> dict[str, Path]:
    """Write the weights as ``model.safetensors`` and ``config`` as ``model.json``."""
    from safetensors.torch import (
        save_file,  # torch: slow to import, kept off the command line's start
    )

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = folder / "model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt", "architecture": config["architecture"]})
    cfg = folder / "model.json"
    write_json(cfg, config)
    return {"weights": weights, "model_config": cfg}


def _build(config: dict[str, Any], state: dict):
    from stages.ml.nets import (
        build_model,  # torch: slow to import, kept off the command line's start
    )

    model = build_model(config["architecture"], input_shape=tuple(config["input_shape"]), num_classes=config["num_classes"],
                        dropout=float(config.get("dropout", 0.0)))
    model.load_state_dict(state, strict=True)
    model.mlsec_config = dict(config)  # input shape and classes, for callers such as the prediction service
    return model.eval()


def load_model_folder(folder: Path):
    """Rebuild a model from ``model.json`` + ``model.safetensors`` (callers verify the bytes first)."""
    config = json.loads((folder / "model.json").read_text())
    return _build(config, load_safetensors(folder / "model.safetensors"))


def load_model_bytes(weights: bytes, config: bytes):
    """Rebuild a model from the bytes of ``model.safetensors`` and ``model.json`` that were
    checked as they were read (nothing here opens a file)."""
    from safetensors.torch import (
        load,  # torch: slow to import, kept off the command line's start
    )

    _check_header(memoryview(weights), "model.safetensors")
    try:
        state = load(bytes(weights))
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends
        raise SecurityError(f"model.safetensors: safetensors refused the bytes: {' '.join(str(exc).split())[:200]}") from None
    return _build(json.loads(config), state)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _check_header(data: memoryview | bytes, name: str) -> dict[str, Any]:
    """Our header checks on a whole safetensors file held in memory (see
    :func:`validate_safetensors_header`); the parser's checks run when it loads the bytes."""

    def bad(msg: str) -> SecurityError:
        return SecurityError(f"{name}: unsafe safetensors header: {msg}")

    size = len(data)
    if size < 8:
        raise bad(f"file is {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > MAX_SAFETENSORS_HEADER:
        raise bad(f"header length {n} exceeds the {MAX_SAFETENSORS_HEADER}-byte limit")
    if n < 2 or 8 + n > size:
        raise bad(f"header length {n} does not fit a {size}-byte file")
    return _parse_header(bytes(data[8:8 + n]), bad)


def _parse_header(raw: bytes, bad) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"header is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    for name, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if name != "__metadata__" and isinstance(shape, list) and len(shape) > MAX_TENSOR_RANK:
            raise bad(f"tensor {name!r} has rank {len(shape)} > {MAX_TENSOR_RANK}")
    return header


def validate_safetensors_header(path: Path) -> dict[str, Any]:
    """Bound and parse a safetensors header, then let ``safetensors`` check the rest.

    Ours: the 8-byte length within ``MAX_SAFETENSORS_HEADER`` and the file, a JSON object
    without duplicate keys, tensor ranks within ``MAX_TENSOR_RANK``. The parser's: dtypes,
    shapes, offsets inside the data, no overlap, no gap, no trailing bytes. Returns the
    header; raises ``SecurityError`` naming the file and the problem.
    """

    path = Path(path)

    def bad(msg: str) -> SecurityError:
        return SecurityError(f"{path.name}: unsafe safetensors header: {msg}")

    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise bad(f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_SAFETENSORS_HEADER:
                raise bad(f"header length {n} exceeds the {MAX_SAFETENSORS_HEADER}-byte limit")
            if n < 2 or 8 + n > size:
                raise bad(f"header length {n} does not fit a {size}-byte file")
            raw = fh.read(n)
    except OSError as exc:
        raise SecurityError(f"{path.name}: cannot read: {exc.strerror}") from None
    header = _parse_header(raw, bad)
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends
        reason = " ".join(str(exc).split()).removeprefix("Error while deserializing header: ")
        raise bad(reason[:200]) from None
    return header


def load_safetensors(path: Path, *, device: str = "cpu") -> dict:
    """Validate the header, then load the tensors with ``safetensors.torch.load_file``."""
    validate_safetensors_header(Path(path))
    from safetensors.torch import (
        load_file,  # torch: slow to import, kept off the command line's start
    )

    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # noqa: BLE001
        raise SecurityError(f"{Path(path).name}: safetensors refused the file: {' '.join(str(exc).split())[:200]}") from None
