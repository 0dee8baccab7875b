"""Benchmark the training modes on MNIST and print a Markdown table.

Modes: standard, adversarial FGSM-RS and PGD at epsilon 0.3, and DP-SGD at epsilon 3 and
1.2 (delta 1e-5). For each: clean accuracy on the test set, accuracy under PGD-50 with 10
restarts at epsilon 0.3 (L-inf, [0, 1] input scale), epsilon spent, seconds per epoch,
training images per second, and epoch time relative to standard training.

    python bench/train_mnist.py --quick      # CPU: 1 epoch on 10k images, PGD on 100 test images
    python bench/train_mnist.py              # GPU: full training set, full test set

Reads the four IDX files (``*-ubyte.gz``) from ``--data``; the format is parsed here with
gzip and NumPy (big-endian header: magic, then one uint32 per dimension).
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stages.core.errors import InvalidInput  # noqa: E402

EPSILON = 0.3
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """Read one (gzipped) IDX file: 2 zero bytes, a dtype code, the number of dims, then uint32 sizes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise InvalidInput(f"{path} is not an IDX file (header {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise InvalidInput(f"{path}: header says {dims} ({expected} bytes) but {len(raw) - offset} bytes follow")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def load_mnist(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, y_train, X_test, y_test) with images as float32 N x 1 x 28 x 28 on [0, 1]."""
    def part(stem: str) -> np.ndarray:
        matches = sorted(folder.glob(f"{stem}*"))
        if not matches:
            raise InvalidInput(f"no {stem}* file in {folder}")
        return read_idx(matches[0])

    images = {s: (part(f"{s}-images-idx3-ubyte").astype(np.float32) / 255.0)[:, None] for s in ("train", "t10k")}
    labels = {s: part(f"{s}-labels-idx1-ubyte").astype(np.int64) for s in ("train", "t10k")}
    for s in ("train", "t10k"):
        if len(images[s]) != len(labels[s]):
            raise InvalidInput(f"{s}: {len(images[s])} images but {len(labels[s])} labels")
    return images["train"], labels["train"], images["t10k"], labels["t10k"]


def bench_modes(*, quick: bool, epochs: int) -> list[tuple[str, dict[str, Any]]]:
    """(row name, TrainParams fields) for each mode, in the fast_adversarial MNIST recipe."""
    base = {"model": "cnn_mnist", "epochs": epochs, "batch_size": 100, "lr": 0.005, "weight_decay": 0.0,
            "dropout": 0.0, "seed": 0, "device": "auto", "amp": True, "num_workers": 0,
            # epsilon 0.3 from the first step stalls PGD training at chance: ramp it over one epoch
            "adversarial": {"method": "fgsm_rs", "epsilon": EPSILON, "warmup_epochs": 1,
                            "pgd_steps": 5 if quick else 40, "alpha": None if quick else 0.01},
            "dp": {"target_epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0, "accountant": "prv"}}
    dp = {**base, "mode": "dp", "batch_size": 256}
    pgd_steps = base["adversarial"]["pgd_steps"]
    return [
        ("standard", {**base, "mode": "standard"}),
        (f"adversarial fgsm_rs (eps {EPSILON})", {**base, "mode": "adversarial"}),
        (f"adversarial pgd-{pgd_steps} (eps {EPSILON})",
         {**base, "mode": "adversarial", "adversarial": {**base["adversarial"], "method": "pgd"}}),
        ("dp (eps 3, delta 1e-5)", dp),
        ("dp (eps 1.2, delta 1e-5)", {**dp, "dp": {**dp["dp"], "target_epsilon": 1.2}}),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mnist",
                        help="folder with the MNIST IDX .gz files")
    parser.add_argument("--quick", action="store_true",
                        help="CPU-sized run: 1 epoch on a 10k training subset, PGD on 100 test images")
    parser.add_argument("--epochs", type=int, help="override the number of epochs")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per training run")
    args = parser.parse_args(argv)

    import torch

    from stages.core.params import TrainParams
    from stages.ml.robustness import evaluate_robustness
    from stages.ml.runtime import predict_logits, resolve_device
    from stages.ml.training import fit

    Xtr, ytr, Xte, yte = load_mnist(args.data)
    epochs = args.epochs or (1 if args.quick else 10)
    n_train = 10_000 if args.quick else len(Xtr)
    n_attack = 100 if args.quick else len(Xte)
    rng = np.random.default_rng(0)
    train_idx = np.sort(rng.choice(len(Xtr), size=n_train, replace=False))
    attack_idx = np.sort(rng.choice(len(Xte), size=n_attack, replace=False))
    device = resolve_device("auto")
    print(f"MNIST: {n_train} training images, {epochs} epoch(s), device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; "
          f"clean accuracy on all {len(Xte)} test images, PGD-50x10 at eps {EPSILON} on {n_attack}.",
          file=sys.stderr)

    rows = []
    for name, raw in bench_modes(quick=args.quick, epochs=epochs):
        params = TrainParams.model_validate(raw)
        start = time.perf_counter()
        result = fit(Xtr[train_idx], ytr[train_idx], params=params, num_classes=10, progress=args.progress)
        total = time.perf_counter() - start
        model = result.model.to(device)
        clean = float((predict_logits(model, Xte, batch_size=1000).argmax(1) == yte).mean())
        report = evaluate_robustness(model, Xte[attack_idx], yte[attack_idx], epsilons=[EPSILON], pgd_steps=50,
                                     restarts=10, batch_size=1000 if device.type == "cuda" else 100, seed=0)
        epoch_s = float(np.mean([h["seconds"] for h in result.history]))
        img_s = float(np.mean([h["images_per_s"] for h in result.history]))
        spent = result.privacy["epsilon_spent"] if result.privacy else None
        rows.append((name, clean, report.pgd_accuracy[EPSILON], spent, epoch_s, img_s))
        print(f"  {name}: clean {clean:.4f}, pgd {report.pgd_accuracy[EPSILON]:.4f}, fit {total:.1f} s",
              file=sys.stderr)

    pgd_head = f"PGD-50x10 acc @ eps {EPSILON}" + (f" (n={n_attack} of {len(Xte)}, --quick)" if args.quick else "")
    print(f"| mode | clean acc | {pgd_head} | epsilon spent | epoch s | images/s | epoch time vs standard |")
    print("|---|---|---|---|---|---|---|")
    base_s = rows[0][4]
    for name, clean, pgd, spent, epoch_s, img_s in rows:
        eps = f"{spent:.2f}" if spent is not None else "-"
        print(f"| {name} | {clean:.4f} | {pgd:.3f} | {eps} | {epoch_s:.1f} | {img_s:,.0f} | {epoch_s / base_s:.2f}x |")
    print(f"\n{n_train} training images, {epochs} epoch(s), device {device}; epsilons on the [0, 1] input scale.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
