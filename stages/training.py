"""Training core: ``fit`` trains a registered architecture in the mode ``params.train`` names.

Modes (``TrainParams.mode``):

``standard``     cross-entropy with dropout and weight decay from params.
``adversarial``  ``fgsm_rs``: FGSM from a uniform random start, step ``1.25 * epsilon``
                 (Wong et al., "Fast is better than free"); ``pgd``: Madry et al. with
                 ``pgd_steps`` steps of ``2.5 * epsilon / pgd_steps``; ``trades``: Zhang et
                 al., clean cross-entropy plus ``trades_beta`` times the KL divergence to the
                 worst case found by PGD on that KL. Epsilon (on the [0, 1] input scale)
                 ramps linearly from 0 over ``warmup_epochs``.
``dp``           DP-SGD with Opacus (per-sample clipping to ``max_grad_norm`` + Gaussian
                 noise); the epsilon spent is read from the accountant after training.

All modes use Adam with a one-cycle (triangular) learning rate that peaks at ``lr`` after
40% of the steps, as in fast_adversarial's MNIST recipe. Runs are seeded from
``params.seed`` and deterministic on CPU. The device is resolved at call time, never at import.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from stages.attacks import eval_mode, pgd_delta
from stages.errors import InvalidInput, PipelineError
from stages.nets import build_model, default_model_name
from stages.params import TrainParams

CHECKPOINT_FORMAT = 1
SMALL_INPUT = 256  # per-sample input size up to which CPU work runs on one intra-op thread
PEAK_FRACTION = 0.4  # one-cycle learning rate peaks after this fraction of all steps


@dataclass(frozen=True)
class FitResult:
    """A trained model (plain ``nn.Module``, eval mode, on CPU) and what it took to train it."""

    model: nn.Module
    model_name: str
    history: list[dict[str, float]]
    privacy: dict[str, Any] | None
    device: str


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


@contextmanager
def small_model_threads(device: torch.device, input_shape: tuple[int, ...]) -> Iterator[None]:
    """Run tiny CPU workloads (inputs of at most ``SMALL_INPUT`` values) on one intra-op thread.

    Batches of 8x8 digits gain little from intra-op threads, and on a busy machine the
    threads' spin-waits make each step up to 100 times slower; the setting is restored after.
    """
    if device.type != "cpu" or math.prod(input_shape) > SMALL_INPUT or torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def _one_cycle(total_steps: int) -> Callable[[int], float]:
    peak = max(1.0, PEAK_FRACTION * total_steps)
    return lambda step: float(np.interp(step + 0.5, [0.0, peak, float(total_steps)], [0.0, 1.0, 0.0]))


def _fingerprint(X: np.ndarray, y: np.ndarray, params: TrainParams, num_classes: int) -> str:
    """SHA-256 of everything that must match for a checkpoint to be resumed."""
    h = hashlib.sha256()
    settings = params.model_dump(mode="json")
    settings.pop("num_workers", None)  # loader workers do not change the result
    h.update(json.dumps({"format": CHECKPOINT_FORMAT, "params": settings, "num_classes": num_classes,
                         "shape": list(X.shape)}, sort_keys=True).encode())
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


def _autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when supported, else fp16; a no-op on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype


def _trades_adversary(model: nn.Module, X: Tensor, *, epsilon: float, alpha: float, steps: int,
                      generator: torch.Generator) -> Tensor:
    """TRADES inner maximisation: PGD on KL(model(X') || model(X)) from a small Gaussian start."""
    with eval_mode(model):
        with torch.no_grad():
            target = F.softmax(model(X), dim=1)
        noise = torch.randn(X.shape, generator=generator, device=generator.device, dtype=X.dtype).to(X.device)
        X_adv = torch.clamp(X + 0.001 * noise, 0, 1)
        for _ in range(steps):
            X_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(X_adv), dim=1), target, reduction="sum")
            (grad,) = torch.autograd.grad(kl, X_adv)
            X_adv = torch.min(torch.max(X_adv.detach() + alpha * grad.sign(), X - epsilon), X + epsilon).clamp(0, 1)
    return X_adv.detach()


class _Trainer:
    """One mode's per-batch loss; holds the attack generator and the epsilon warm-up."""

    def __init__(self, params: TrainParams, *, steps_per_epoch: int, device: torch.device):
        self.params, self.adv = params, params.adversarial
        self.warmup_steps = self.adv.warmup_epochs * steps_per_epoch
        self.generator = torch.Generator(device=device).manual_seed(params.seed + 1)
        method = self.adv.method
        if self.adv.alpha is not None:
            self.alpha = self.adv.alpha
        elif method == "fgsm_rs":
            self.alpha = 1.25 * self.adv.epsilon
        else:
            self.alpha = 2.5 * self.adv.epsilon / self.adv.pgd_steps

    def epsilon_at(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return self.adv.epsilon
        return self.adv.epsilon * min(1.0, (step + 1) / self.warmup_steps)

    def loss(self, model: nn.Module, xb: Tensor, yb: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(mean loss, logits the accuracy is measured on) for one batch."""
        p = self.params
        if p.mode != "adversarial":
            logits = model(xb)
            return F.cross_entropy(logits, yb), logits
        eps = self.epsilon_at(step)
        alpha = self.alpha * eps / self.adv.epsilon
        if self.adv.method == "trades":
            X_adv = _trades_adversary(model, xb, epsilon=eps, alpha=alpha, steps=self.adv.pgd_steps,
                                      generator=self.generator)
            logits = model(xb)
            robust = F.kl_div(F.log_softmax(model(X_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
            return F.cross_entropy(logits, yb) + self.adv.trades_beta * robust, logits
        steps = 1 if self.adv.method == "fgsm_rs" else self.adv.pgd_steps
        with eval_mode(model):
            delta = pgd_delta(model, xb, yb, epsilon=eps, alpha=alpha, steps=steps, random_start=True,
                              generator=self.generator)
        logits = model(xb + delta)
        return F.cross_entropy(logits, yb), logits


def _make_private(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, params: TrainParams):
    """Validate the model for DP-SGD and wrap model, optimizer and loader with Opacus."""
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

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
                  poisson_sampling=dp.poisson_sampling)
    if dp.target_epsilon is not None:
        model, dp_optimizer, loader = engine.make_private_with_epsilon(
            **common, target_epsilon=dp.target_epsilon, target_delta=dp.delta, epochs=params.epochs)
    else:
        model, dp_optimizer, loader = engine.make_private(**common, noise_multiplier=dp.noise_multiplier)
    return engine, model, dp_optimizer, loader


def _privacy_report(engine, dp_optimizer, params: TrainParams, *, sample_rate: float) -> dict[str, Any]:
    dp = params.dp
    history = engine.accountant.history
    steps = int(sum(entry[2] for entry in history))
    if history:
        sample_rate = float(history[-1][1])
    spent = float(engine.get_epsilon(dp.delta)) if steps else 0.0
    report = {"epsilon_spent": spent, "delta": dp.delta, "noise_multiplier": float(dp_optimizer.noise_multiplier),
              "sample_rate": sample_rate, "steps": steps, "accountant": dp.accountant,
              "max_grad_norm": dp.max_grad_norm, "poisson_sampling": dp.poisson_sampling,
              "target_epsilon": dp.target_epsilon, "secure_rng": dp.secure_rng}
    if dp.target_epsilon is not None and spent > dp.target_epsilon * (1 + 1e-9):
        raise PipelineError(f"DP-SGD spent epsilon {spent:.4f} > target {dp.target_epsilon}; refusing the model")
    return report


def fit(X: np.ndarray, y: np.ndarray, *, params: TrainParams, num_classes: int, checkpoint_dir: Path | None = None,
        progress: bool = True) -> FitResult:
    """Train a model on ``X`` (N x C x H x W or N x F, float32 on [0, 1]) and int labels ``y``.

    With ``checkpoint_dir``, ``last.pt`` there is written after every epoch and resumed from
    when it matches these data and settings (otherwise it is ignored and overwritten).
    Returns the model as a plain ``nn.Module`` in eval mode on CPU.
    """
    X, y = check_training_data(X, y, num_classes=num_classes)
    device = resolve_device(params.device)
    seed_everything(params.seed)
    input_shape = tuple(int(d) for d in X.shape[1:])
    model_name = default_model_name(input_shape) if params.model == "auto" else params.model
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
        engine, model, train_optimizer, loader = _make_private(model, optimizer, loader, params)
    steps_per_epoch = max(1, len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _one_cycle(params.epochs * steps_per_epoch))
    trainer = _Trainer(params, steps_per_epoch=steps_per_epoch, device=device)
    autocast, amp_dtype = _autocast(device, params.amp and params.mode != "dp")
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    generators = {"loader": loader_generator, "attack": trainer.generator}

    fingerprint = _fingerprint(X, y, params, num_classes)
    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    history: list[dict[str, float]] = []
    start_epoch = 0
    ckpt = _load_checkpoint(ckpt_path, fingerprint) if ckpt_path is not None else None
    if ckpt is not None:
        _inner(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if engine is not None:
            engine.accountant.load_state_dict(ckpt["accountant"])
        _set_rng_state(ckpt["rng"], generators)
        history, start_epoch = list(ckpt["history"]), int(ckpt["epoch"])

    with small_model_threads(device, input_shape):
        history = _train_epochs(model, loader, train_optimizer, optimizer, scheduler, scaler, trainer, autocast,
                                engine=engine, device=device, params=params, history=history, start_epoch=start_epoch,
                                steps_per_epoch=steps_per_epoch, ckpt_path=ckpt_path, fingerprint=fingerprint,
                                generators=generators, progress=progress)

    privacy = _privacy_report(engine, train_optimizer, params, sample_rate=1 / steps_per_epoch) if engine is not None else None
    trained = _inner(model)
    if engine is not None:
        model._close()  # drop Opacus hooks and per-sample gradients
    final = build_model(model_name, input_shape=input_shape, num_classes=num_classes, dropout=params.dropout)
    final.load_state_dict({k: v.detach().cpu() for k, v in trained.state_dict().items()})
    return FitResult(model=final.eval(), model_name=model_name, history=history, privacy=privacy, device=str(device))


def _train_epochs(model, loader, train_optimizer, optimizer, scheduler, scaler, trainer, autocast, *, engine, device,
                  params: TrainParams, history: list[dict[str, float]], start_epoch: int, steps_per_epoch: int,
                  ckpt_path: Path | None, fingerprint: str, generators: dict[str, torch.Generator],
                  progress: bool) -> list[dict[str, float]]:
    """Epochs ``start_epoch + 1 .. params.epochs`` with a checkpoint after each; returns the history."""
    from tqdm import tqdm

    bar = tqdm(total=params.epochs, initial=start_epoch, desc=f"train {params.mode}", unit="epoch",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for epoch in range(start_epoch, params.epochs):
        with warnings.catch_warnings():
            # Opacus' per-sample hooks fire on module outputs because inputs need no grad: expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            stats = _run_epoch(model, loader, train_optimizer, scheduler, scaler, trainer, autocast,
                               device=device, first_step=epoch * steps_per_epoch)
        history.append({"epoch": epoch + 1, **stats})
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.3f}",
                        img_s=f"{stats['images_per_s']:.0f}")
        if ckpt_path is not None:
            payload = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": epoch + 1,
                       "model": _inner(model).state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                       "rng": _rng_state(generators), "history": history}
            if engine is not None:
                payload["accountant"] = engine.accountant.state_dict()
            _save_checkpoint(ckpt_path, payload)
    bar.close()
    return history


def _run_epoch(model: nn.Module, loader: DataLoader, optimizer: Any, scheduler: Any, scaler: Any, trainer: _Trainer,
               autocast: Any, *, device: torch.device, first_step: int) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, accuracy, seconds, images/s and the last lr/epsilon."""
    model.train()
    start = time.perf_counter()
    loss_sum, correct, seen, step = 0.0, 0, 0, first_step
    for xb, yb in loader:
        if len(xb) == 0:  # an empty Poisson batch: nothing to learn from
            continue
        xb = xb.to(device, non_blocking=True)
        yb = yb.to(device, non_blocking=True)
        with autocast:
            loss, logits = trainer.loss(model, xb, yb, step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += float(loss.detach()) * len(yb)
        correct += int((logits.detach().argmax(1) == yb).sum())
        seen += len(yb)
        step += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    stats = {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1), "seconds": seconds,
             "images_per_s": seen / seconds if seconds > 0 else math.inf, "lr": float(scheduler.get_last_lr()[0])}
    if trainer.params.mode == "adversarial":
        stats["epsilon"] = trainer.epsilon_at(step - 1)
    return stats
