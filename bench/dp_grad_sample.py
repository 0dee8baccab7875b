"""Opacus grad-sample modes on the project's nets: time of one DP-SGD step and agreement of the
per-sample gradients with ``hooks``, printed as a Markdown table.

A step is forward, backward (per-sample gradients), clipping, noise and the optimizer update,
on random inputs of the net's shape. Modes are timed in interleaved rounds so that a busy
machine slows them alike; the plain (non-private) step of the same net is the baseline.

    python bench/dp_grad_sample.py            # batch 256, 5 rounds
    python bench/dp_grad_sample.py --quick    # batch 64, 2 rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NETS = [("cnn_small", (1, 8, 8)), ("cnn_dp", (1, 28, 28)), ("cnn_mnist", (1, 28, 28))]
MODES = ["hooks", "functorch", "ew"]


def _step_fn(name: str, shape: tuple[int, ...], mode: str | None, batch: int):
    """A closure running one training step; ``mode=None`` is plain SGD without DP."""
    import torch
    import torch.nn.functional as F
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from stages.ml.nets import build_model

    torch.manual_seed(0)
    model = build_model(name, input_shape=shape, num_classes=10)
    X, y = torch.rand(batch, *shape), torch.randint(0, 10, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    if mode is not None:
        loader = DataLoader(TensorDataset(X, y), batch_size=batch)
        model, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, grad_sample_mode=mode)

    def step() -> list:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(X), y).backward()
        grads = [p.grad_sample.detach().clone() for p in model.parameters()
                 if getattr(p, "grad_sample", None) is not None] if mode is not None else []
        optimizer.step()
        return grads

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 64, 2 rounds")
    args = parser.parse_args(argv)
    import torch

    warnings.filterwarnings("ignore")
    batch, rounds = (64, 2) if args.quick else (256, 5)
    print(f"| net | mode | ms per step (median of {rounds}) | vs plain step | max abs diff of per-sample grads vs hooks |")
    print("|---|---|---|---|---|")
    for name, shape in NETS:
        steps = {mode: _step_fn(name, shape, mode, batch) for mode in [None, *MODES]}
        grads = {mode: steps[mode]() for mode in MODES}  # first call: warm-up and the gradients compared
        steps[None]()
        times: dict[str | None, list[float]] = {m: [] for m in steps}
        for _ in range(rounds):
            for mode, step in steps.items():
                start = time.perf_counter()
                step()
                times[mode].append(time.perf_counter() - start)
        plain = statistics.median(times[None])
        print(f"| {name} | plain (no DP) | {1000 * plain:.1f} | 1.00x | - |")
        for mode in MODES:
            t = statistics.median(times[mode])
            diff = max(float((a - b).abs().max()) for a, b in zip(grads[mode], grads["hooks"]))
            print(f"| {name} | {mode} | {1000 * t:.1f} | {t / plain:.2f}x | {diff:.1e} |", flush=True)
    print(f"\nbatch {batch}, {torch.get_num_threads()} threads, device cpu; first-step gradients compared "
          f"(same weights, same inputs).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
