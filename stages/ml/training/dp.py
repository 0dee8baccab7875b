"""DP-SGD with Opacus: validate and wrap model, optimizer and loader; split large logical batches
into physical ones; report the epsilon spent with everything needed to recompute it.

``dp.grad_sample_mode`` picks how per-sample gradients are computed: ``hooks`` (Opacus' module
hooks), ``functorch`` (``torch.func.vmap`` of per-sample ``grad``) or ``ew`` (torch's expanded
weights). All three give the same clipped gradients on the project's nets (tested);
``bench/dp_grad_sample.py`` measures their speed, and the default (``ew``) is the fastest there.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from stages.core.errors import InvalidInput, PipelineError
from stages.core.params import TrainParams


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, params: TrainParams):
    """Validate the model for DP-SGD and wrap model, optimizer and loader with Opacus."""
    from opacus import (
        PrivacyEngine,  # Opacus: about 3.5 s to import, only for train.mode dp
    )
    from opacus.validators import (
        ModuleValidator,  # Opacus: about 3.5 s to import, only for train.mode dp
    )

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        reasons = "; ".join(str(e) for e in errors)
        raise InvalidInput(f"model {type(model).__name__} cannot be trained with DP-SGD: {reasons}")
    dp = params.dp
    with warnings.catch_warnings():
        # secure_mode=False warns on every run; the setting is explicit in params.yaml
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        engine = PrivacyEngine(accountant=dp.accountant, secure_mode=dp.secure_rng)
    common = dict(module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=dp.max_grad_norm,
                  poisson_sampling=dp.poisson_sampling, grad_sample_mode=dp.grad_sample_mode)
    if dp.target_epsilon is not None:
        model, dp_optimizer, loader = engine.make_private_with_epsilon(
            **common, target_epsilon=dp.target_epsilon, target_delta=dp.delta, epochs=params.epochs)
    else:
        model, dp_optimizer, loader = engine.make_private(**common, noise_multiplier=dp.noise_multiplier)
    return engine, model, dp_optimizer, loader


def physical_batches(loader: DataLoader, dp_optimizer, params: TrainParams):
    """A context giving the loader to iterate: logical batches split into physical ones of at most
    ``dp.max_physical_batch_size`` rows (Opacus' ``BatchMemoryManager``: the optimizer steps, and
    the accountant counts, once per logical batch), or the loader itself when that is unset."""
    limit = params.dp.max_physical_batch_size
    if limit is None:
        return nullcontext(loader)
    from opacus.utils.batch_memory_manager import (
        BatchMemoryManager,  # Opacus: about 3.5 s to import, only for train.mode dp
    )

    return BatchMemoryManager(data_loader=loader, max_physical_batch_size=limit, optimizer=dp_optimizer)


def stepped(optimizer) -> bool:
    """False when the last ``optimizer.step()`` only accumulated a physical batch of a larger
    logical one (the learning-rate schedule then waits for the logical step)."""
    return not getattr(optimizer, "_is_last_step_skipped", False)


def privacy_report(engine, dp_optimizer, params: TrainParams, *, sample_rate: float) -> dict[str, Any]:
    dp = params.dp
    history = engine.accountant.history
    steps = int(sum(entry[2] for entry in history))
    if history:
        sample_rate = float(history[-1][1])
    spent = float(engine.get_epsilon(dp.delta)) if steps else 0.0
    report = {"epsilon_spent": spent, "delta": dp.delta, "noise_multiplier": float(dp_optimizer.noise_multiplier),
              "sample_rate": sample_rate, "steps": steps, "accountant": dp.accountant,
              "max_grad_norm": dp.max_grad_norm, "poisson_sampling": dp.poisson_sampling,
              "target_epsilon": dp.target_epsilon, "secure_rng": dp.secure_rng,
              "grad_sample_mode": dp.grad_sample_mode, "max_physical_batch_size": dp.max_physical_batch_size,
              "expected_batch_size": params.batch_size}
    if dp.target_epsilon is not None and spent > dp.target_epsilon * (1 + 1e-9):
        raise PipelineError(f"DP-SGD spent epsilon {spent:.4f} > target {dp.target_epsilon}; refusing the model")
    return report

