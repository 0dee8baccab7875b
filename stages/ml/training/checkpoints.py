"""Checkpoints: everything needed to resume ``fit`` after an interruption, written atomically."""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core.canonical import canonical_json
from stages.core.params import TrainParams

CHECKPOINT_FORMAT = 1


def _fingerprint(X: np.ndarray, y: np.ndarray, params: TrainParams, num_classes: int) -> str:
    """SHA-256 of everything that must match for a checkpoint to be resumed."""
    h = hashlib.sha256()
    settings = params.model_dump(mode="json")
    settings.pop("num_workers", None)  # loader workers do not change the result
    h.update(canonical_json({"format": CHECKPOINT_FORMAT, "params": settings, "num_classes": num_classes,
                             "shape": list(X.shape)}))
    h.update(X.tobytes())
    h.update(y.tobytes())
    return h.hexdigest()


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


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: start over rather than trust it
        warnings.warn(f"ignoring unreadable checkpoint {path}: {err}", stacklevel=3)
        return None
    if not isinstance(ckpt, dict) or ckpt.get("fingerprint") != fingerprint:
        warnings.warn(f"checkpoint {path} was written for other data or settings; starting from scratch", stacklevel=3)
        return None
    return ckpt
