"""``fit``: train a registered architecture in the mode ``params.train`` names."""

from __future__ import annotations

import math
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from stages.core.errors import InvalidInput
from stages.core.fanout import Progress
from stages.core.params import TrainParams
from stages.ml.nets import build_model, default_model_name
from stages.ml.runtime import resolve_device, seed_everything, small_model_threads
from stages.ml.training.adversarial import BatchLoss
from stages.ml.training.checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointStore,
    _rng_state,
    _set_rng_state,
    checkpoint_binding,
)
from stages.ml.training.guard import CollapseGuard
from stages.ml.training.dp import make_private, physical_batches, privacy_report, stepped

PEAK_FRACTION = 0.4  # one-cycle learning rate peaks after this fraction of all steps


@dataclass(frozen=True)
class FitResult:
    """A trained model (plain ``nn.Module``, eval mode, on CPU) and what it took to train it."""
    model: nn.Module
    model_name: str
    history: list[dict[str, float]]
    privacy: dict[str, Any] | None
    device: str
    guard: dict[str, Any] | None = None


def check_training_data(X: np.ndarray, y: np.ndarray, *, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (float32 X, int64 y) or raise ``InvalidInput`` naming what is wrong."""
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim < 2 or y.ndim != 1 or len(X) != len(y):
        raise InvalidInput(f"X must be N x ... and y of length N, got X {X.shape} and y {y.shape}")
    if len(X) == 0:
        raise InvalidInput("no training rows (X is empty)")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise InvalidInput(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not np.issubdtype(X.dtype, np.floating):
        raise InvalidInput(f"X must be floating point on the [0, 1] scale, got dtype {X.dtype}")
    X = X.astype(np.float32, copy=False)
    if not np.isfinite(X).all() or X.min() < 0 or X.max() > 1:
        raise InvalidInput(f"X must be finite and lie in [0, 1], got values in [{np.nanmin(X):g}, {np.nanmax(X):g}]")
    if not np.issubdtype(y.dtype, np.integer):
        raise InvalidInput(f"y must hold integer labels, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= num_classes:
        raise InvalidInput(f"labels must lie in [0, {num_classes - 1}], got [{y.min()}, {y.max()}]")
    return np.ascontiguousarray(X), y.astype(np.int64)


def _inner(model: nn.Module) -> nn.Module:
    """The plain module under an Opacus ``GradSampleModule`` wrapper (or the model itself)."""
    return getattr(model, "_module", model)


def _autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when supported, else fp16; a no-op on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype


def fit(X: np.ndarray, y: np.ndarray, *, params: TrainParams, num_classes: int, checkpoints: CheckpointStore | None = None,
        progress: bool = True, on_epoch: Progress | None = None) -> FitResult:
    """Train a model on ``X`` (N x C x H x W or N x F, float32 on [0, 1]) and int labels ``y``.

    With ``checkpoints``, a sealed checkpoint is written after every epoch and resumed from
    when its seal verifies for these data and settings (a stale one of the same run is
    overwritten; anything else raises ``CheckpointRefused``, exit 4). Everything restored,
    the DP accountant included, comes from a verified checkpoint. Returns the model as a
    plain ``nn.Module`` in eval mode on CPU.

    ``progress`` shows a tqdm bar on stderr; ``on_epoch`` (a :class:`stages.core.fanout.Progress`,
    e.g. the flow's log and UI reporter) is told ``("epochs", k, epochs, note)`` when training
    starts (k = the epochs a checkpoint already had), after each epoch (the note: the mode,
    loss, accuracy, images/s) and when the collapse guard goes back to an earlier epoch.
    """
    X, y = check_training_data(X, y, num_classes=num_classes)
    device = resolve_device(params.device)
    seed_everything(params.seed)
    input_shape = tuple(int(d) for d in X.shape[1:])
    model_name = default_model_name(input_shape, params.mode) if params.model == "auto" else params.model
    model = build_model(model_name, input_shape=input_shape, num_classes=num_classes, dropout=params.dropout)
    model.to(device)

    loader_generator = torch.Generator().manual_seed(params.seed)
    loader = DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(y)),
                        batch_size=min(params.batch_size, len(X)), shuffle=True, generator=loader_generator,
                        num_workers=params.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=params.num_workers > 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    engine = None
    train_optimizer: Any = optimizer
    if params.mode == "dp":
        engine, model, train_optimizer, loader = make_private(model, optimizer, loader, params)
    steps_per_epoch = max(1, len(loader))
    # linear one cycle from ~0 to lr (at PEAK_FRACTION of the steps) and back to ~0
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=params.lr, total_steps=params.epochs * steps_per_epoch, pct_start=PEAK_FRACTION,
        anneal_strategy="linear", cycle_momentum=False, div_factor=1e4, final_div_factor=1e4)
    trainer = BatchLoss(params, steps_per_epoch=steps_per_epoch, device=device)
    autocast, amp_dtype = _autocast(device, params.amp and params.mode != "dp")
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    generators = {"loader": loader_generator, "attack": trainer.generator}

    binding = checkpoint_binding(X, y, params, num_classes)
    history: list[dict[str, float]] = []
    start_epoch = 0
    ckpt = checkpoints.load(binding) if checkpoints is not None else None
    if ckpt is not None:
        _inner(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if engine is not None:
            engine.accountant.load_state_dict(ckpt["accountant"])
        _set_rng_state(ckpt["rng"], generators)
        history, start_epoch = list(ckpt["history"]), int(ckpt["epoch"])
    guard = CollapseGuard(X, y, params, num_classes=num_classes, device=device)
    if ckpt is not None and "guard" in ckpt:
        for key, value in guard.load_checkpoint_state(ckpt["guard"]).items():
            setattr(trainer, key, value)

    with small_model_threads(device, input_shape):
        history = _train_epochs(model, loader, train_optimizer, optimizer, scheduler, scaler, trainer, autocast,
                                engine=engine, device=device, params=params, history=history, start_epoch=start_epoch,
                                steps_per_epoch=steps_per_epoch, checkpoints=checkpoints, binding=binding,
                                generators=generators, progress=progress, guard=guard, on_epoch=on_epoch)

    privacy = privacy_report(engine, train_optimizer, params, sample_rate=1 / steps_per_epoch) if engine is not None else None
    trained = _inner(model)
    if engine is not None:
        model._close()  # drop Opacus hooks and per-sample gradients
    final = build_model(model_name, input_shape=input_shape, num_classes=num_classes, dropout=params.dropout)
    final.load_state_dict({k: v.detach().cpu() for k, v in trained.state_dict().items()})
    return FitResult(model=final.eval(), model_name=model_name, history=history, privacy=privacy, device=str(device),
                     guard=guard.report(method=trainer.method, alpha=trainer.alpha, steps=trainer.steps,
                                        last_epoch=len(history))
                     if guard.enabled else None)


def _train_epochs(model, loader, train_optimizer, optimizer, scheduler, scaler, trainer, autocast, *, engine, device,
                  params: TrainParams, history: list[dict[str, float]], start_epoch: int, steps_per_epoch: int,
                  checkpoints: CheckpointStore | None, binding: dict[str, str], generators: dict[str, torch.Generator],
                  progress: bool, guard: CollapseGuard, on_epoch: Progress | None = None) -> list[dict[str, float]]:
    """Epochs ``start_epoch + 1 .. params.epochs`` with a checkpoint after each; returns the history.

    With the collapse guard on, a collapsed epoch is not kept: the best good epoch's state comes
    back from memory and training goes on from there with a smaller step, then with the
    fallback method (``guard.py``); at the end the model holds the best good epoch's weights.
    """
    bar = tqdm(total=params.epochs, initial=start_epoch, desc=f"train {params.mode}", unit="epoch",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    what = mode_text(params)
    if on_epoch:
        on_epoch("epochs", start_epoch, params.epochs, f"{what}, {len(loader.dataset)} rows"
                 + (f", resumed after epoch {start_epoch}" if start_epoch else ""))

    def state() -> dict[str, Any]:
        return {"model": _inner(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(generators)}

    def save(epoch: int) -> None:
        if checkpoints is None:
            return
        payload = {"format": CHECKPOINT_FORMAT, "epoch": epoch, **state(), "history": history}
        if engine is not None:
            payload["accountant"] = engine.accountant.state_dict()
        if guard.enabled:
            payload["guard"] = guard.checkpoint_state(method=trainer.method, alpha=trainer.alpha, steps=trainer.steps)
        checkpoints.save(payload, binding=binding, epoch=epoch)

    epoch = start_epoch
    if guard.enabled and guard.best is None:
        # the untrained model is epoch 0: the state to go back to if the first epochs collapse
        guard.remember(epoch, guard.measure(_inner(model)), state())
    while epoch < params.epochs:
        with warnings.catch_warnings():
            # Opacus' per-sample hooks fire on module outputs because inputs need no grad: expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            stats = _run_epoch(model, loader, train_optimizer, scheduler, scaler, trainer, autocast,
                               device=device, first_step=epoch * steps_per_epoch)
        if guard.enabled:
            started = time.perf_counter()
            stats.update(guard.measure(_inner(model)))
            stats["guard_seconds"] = time.perf_counter() - started
            if guard.collapsed(stats):
                action, method, alpha, steps = guard.answer(method=trainer.method, alpha=trainer.alpha,
                                                            steps=trainer.steps)
                event = guard.record_collapse(epoch + 1, stats, method=trainer.method, alpha=trainer.alpha,
                                              action=action, new_method=method, new_alpha=alpha, new_steps=steps)
                epoch = guard.best["epoch"]
                _restore(model, optimizer, scheduler, scaler, generators, guard.best["state"])
                history = history[:epoch]
                bar.reset(total=params.epochs)
                bar.update(epoch)
                good = event["last_good"]
                print(f"train: catastrophic overfitting in epoch {event['epoch']} (FGSM / PGD accuracy "
                      f"{event['guard_fgsm_accuracy']:.3f} / {event['guard_pgd_accuracy']:.3f}, best epoch {epoch}: "
                      f"{good['guard_fgsm_accuracy']:.3f} / {good['guard_pgd_accuracy']:.3f}); {event['action']}"
                      + ("" if action == "stop" else f", {trainer.method} alpha {trainer.alpha:g} -> {method} alpha {alpha:g}"),
                      file=sys.stderr)
                if on_epoch:
                    on_epoch("epochs", epoch, params.epochs, f"{what}: epoch {event['epoch']} collapsed, back to epoch "
                             f"{epoch}" + (", stopped" if action == "stop" else f", {method} alpha {alpha:g}"))
                if action == "stop":
                    break
                trainer.method, trainer.alpha, trainer.steps = method, alpha, steps
                save(epoch)
                continue
            guard.remember(epoch + 1, stats, state())
        history.append({"epoch": epoch + 1, **stats})
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.3f}",
                        img_s=f"{stats['images_per_s']:.0f}")
        save(epoch + 1)
        epoch += 1
        if on_epoch:
            on_epoch("epochs", epoch, params.epochs, f"{what}: loss {stats['loss']:.3f}, accuracy {stats['accuracy']:.3f}, "
                     f"{stats['images_per_s']:.0f} images/s")
    bar.close()
    if guard.enabled and guard.best is not None and guard.best["epoch"] != len(history):
        # a later epoch did worse on the fixed batch than the best good one: hand back the best
        _inner(model).load_state_dict(guard.best["state"]["model"])
        print(f"train: ending with epoch {guard.best['epoch']} (PGD accuracy on the fixed batch "
              f"{guard.best['stats']['guard_pgd_accuracy']:.3f}, the best), not epoch {len(history)}", file=sys.stderr)
    return history


def _restore(model, optimizer, scheduler, scaler, generators: dict[str, torch.Generator], state: dict[str, Any]) -> None:
    """Put back a remembered epoch's model, optimizer, schedule, scaler and random generators."""
    _inner(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"], generators)


def mode_text(params: TrainParams) -> str:
    """What trains, in words: ``"adversarial fgsm_rs, epsilon 0.1"``, ``"dp, target epsilon 3"``."""
    if params.mode == "adversarial":
        return f"adversarial {params.adversarial.method}, epsilon {params.adversarial.epsilon:g}"
    if params.mode == "dp":
        target = params.dp.target_epsilon
        return "dp, " + (f"target epsilon {target:g}" if target is not None else f"noise {params.dp.noise_multiplier:g}")
    return params.mode


def _run_epoch(model: nn.Module, loader: DataLoader, optimizer: Any, scheduler: Any, scaler: Any, trainer: BatchLoss,
               autocast: Any, *, device: torch.device, first_step: int) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, accuracy, seconds, images/s and the last lr/epsilon."""
    model.train()
    start = time.perf_counter()
    loss_sum, correct, seen, step = 0.0, 0, 0, first_step
    batches = physical_batches(loader, optimizer, trainer.params) if trainer.params.mode == "dp" else nullcontext(loader)
    with batches as physical:
        for xb, yb in physical:
            if len(xb) == 0:  # an empty Poisson batch: nothing to learn from
                continue
            xb = xb.to(device, non_blocking=True)
            yb = yb.to(device, non_blocking=True)
            # cleared before the forward pass: expanded weights refuse to run over last step's grad_sample
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss, logits = trainer.loss(model, xb, yb, step)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((logits.detach().argmax(1) == yb).sum())
            seen += len(yb)
            if stepped(optimizer):
                scheduler.step()
                step += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    stats = {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1), "seconds": seconds,
             "images_per_s": seen / seconds if seconds > 0 else math.inf, "lr": float(scheduler.get_last_lr()[0])}
    if trainer.params.mode == "adversarial":
        stats["epsilon"] = trainer.epsilon_at(step - 1)
    return stats
