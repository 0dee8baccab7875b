"""Where and how tensors run: the device, thread policy for tiny models, seeding, eval mode,
batched inference and the checks on inputs to an evaluation.

The device is resolved at call time from settings (``auto``: CUDA when present), never at import.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stages.core.errors import InvalidInput

SMALL_INPUT = 256  # per-sample input size up to which CPU work runs on one intra-op thread


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; ``"cuda"`` without a GPU raises ``InvalidInput``
    naming ``setting``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInput(f"{setting} is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        return torch.device("cuda")
    if name == "cpu":
        return torch.device("cpu")
    raise InvalidInput(f"unknown device {name!r}; expected 'auto', 'cpu' or 'cuda'")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore each submodule's mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """torch on one intra-op thread for the block; the setting is restored after.

    For small networks, and for work that runs beside other work on the same cores (a
    fan-out worker process starts with one intra-op thread per core, and two such workers on
    two cores spin-wait on each other)."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def small_model_threads(device: torch.device, input_shape: tuple[int, ...]) -> Iterator[None]:
    """Run tiny CPU workloads (inputs of at most ``SMALL_INPUT`` values) on one intra-op thread.

    Batches of 8x8 digits gain little from intra-op threads, and on a busy machine the
    threads' spin-waits make each step up to 100 times slower; the setting is restored after.
    """
    if device.type != "cpu" or math.prod(input_shape) > SMALL_INPUT:
        yield
        return
    with one_intra_op_thread():
        yield


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def predict_logits(model: nn.Module, X: np.ndarray | Tensor, *, batch_size: int = 512) -> np.ndarray:
    """Logits (N x classes, float32) for inputs on the [0, 1] scale, in eval mode, batch by batch."""
    if batch_size < 1:
        raise InvalidInput(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    X = torch.as_tensor(X, dtype=torch.float32)
    out = []
    with eval_mode(model), torch.no_grad(), small_model_threads(device, tuple(X.shape[1:])):
        for start in range(0, len(X), batch_size):
            out.append(model(X[start:start + batch_size].to(device)).float().cpu())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy()


def check_eval_inputs(model: nn.Module, X: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise InvalidInput(f"model must be a torch.nn.Module, got {type(model).__name__}")
    X = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X, dtype=torch.float32).cpu()
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).cpu()
    if X.ndim < 2 or y.ndim != 1 or len(X) != len(y) or len(X) == 0:
        raise InvalidInput(f"X must be N x ... and y of length N > 0, got X {tuple(X.shape)} and y {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise InvalidInput(f"y must hold integer labels, got dtype {y.dtype}")
    if not torch.isfinite(X).all() or X.min() < 0 or X.max() > 1:
        raise InvalidInput(f"X must be finite and lie in [0, 1], got values in [{X.min().item():g}, {X.max().item():g}]")
    return X, y.long()
