"""Benchmark the screening detectors against label flips, bad annotators and backdoors.

Prints Markdown tables. For each backdoor (trigger, poisoning rate, target class): the
detection precision/recall/F1 of the flags against the poisoned rows, then attack success
rate (ASR: non-target test images with the trigger classified as the target) and clean
accuracy of the final model trained on the accepted rows versus one trained on everything.
On digits the final model is the train stage's own ``fit`` with ``params.yaml`` (what the
pipeline promotes: adversarial FGSM-RS by default); on MNIST a plain small CNN, as the
pipeline's MNIST training takes hours per model on a CPU (``--final`` picks either).

    python -m bench.poisoning --dataset digits [--quick]
    python -m bench.poisoning --dataset mnist --quick      # needs ../shared/data/mnist
    python -m bench.poisoning --dataset mnist --mnist-rows 10000 --sections flips
"""

from __future__ import annotations

import argparse
import gzip
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from stages.screening import screen_dataset
from stages.core.params import ScreenParams, load_params

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
Trigger = Callable[[np.ndarray], np.ndarray]
SECTIONS = ("flips", "annotators", "backdoors")


# ---------------------------------------------------------------- data


def load_digits_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


def _idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=header)


def load_mnist_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    X = _idx(MNIST_DIR / "train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    y = _idx(MNIST_DIR / "train-labels-idx1-ubyte.gz", 8).astype(np.int64)
    pick = np.random.default_rng(seed).permutation(len(X))[:n]
    return (X[pick] / 255.0).astype(np.float32), y[pick]


def split(X: np.ndarray, y: np.ndarray, *, seed: int, test: float = 0.2):
    perm = np.random.default_rng(seed).permutation(len(X))
    n = int(len(X) * test)
    return X[perm[n:]], y[perm[n:]], X[perm[:n]], y[perm[:n]]


# ---------------------------------------------------------------- triggers


def patch_trigger(corner: str, size: int = 3) -> Trigger:
    def apply(X: np.ndarray) -> np.ndarray:
        X = X.copy()
        H, W = X.shape[-2:]
        r = {"t": 0, "b": H - size, "m": (H - size) // 2}[corner[0]]
        c = {"l": 0, "r": W - size, "m": (W - size) // 2}[corner[1]]
        X[..., r : r + size, c : c + size] = 1.0
        return X

    return apply


def blend_trigger(alpha: float = 0.2, seed: int = 123) -> Trigger:
    def apply(X: np.ndarray) -> np.ndarray:
        pattern = np.random.default_rng(seed).random(X.shape[1:]).astype(np.float32)
        return ((1 - alpha) * X + alpha * pattern).astype(np.float32)

    return apply


def checker_trigger(size: int = 3) -> Trigger:
    """A black-and-white checkerboard in the top-right corner."""

    def apply(X: np.ndarray) -> np.ndarray:
        X = X.copy()
        W = X.shape[-1]
        board = (np.indices((size, size)).sum(0) % 2).astype(np.float32)
        X[..., :size, W - size :] = board
        return X

    return apply


def sparse_trigger() -> Trigger:
    def apply(X: np.ndarray) -> np.ndarray:
        X = X.copy()
        H, W = X.shape[-2:]
        X[..., 0, 0] = 1.0
        X[..., 1, W - 1] = 1.0
        X[..., H - 1, 1] = 1.0
        return X

    return apply


def poison(X, y, *, rate: float, trigger: Trigger, target: int, seed: int):
    rng = np.random.default_rng(seed)
    cand = np.where(y != target)[0]
    idx = rng.choice(cand, int(round(rate * len(X))), replace=False)
    X, y = X.copy(), y.copy()
    X[idx] = trigger(X[idx])
    y[idx] = target
    mask = np.zeros(len(X), dtype=bool)
    mask[idx] = True
    return X, y, mask


# ---------------------------------------------------------------- final model


def train_cnn(X, y, *, num_classes: int, epochs: int, seed: int = 0, lr: float = 3e-3, batch_size: int = 64) -> torch.nn.Module:
    """A quick final model: the same plain Adam loop the screening nets use."""
    from stages.screening.evidence import _train_net

    return _train_net(X, y, num_classes, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size)[0]


def final_trainer(mode: str, train_params, *, epochs: int, seed: int) -> Callable[..., torch.nn.Module]:
    """``pipeline``: the train stage's own ``fit`` with ``params.yaml``'s train section (what
    users promote); ``plain``: the quick Adam loop, for large benches on a CPU."""
    if mode == "plain":
        return lambda X, y, num_classes: train_cnn(X, y, num_classes=num_classes, epochs=epochs, seed=seed)
    from stages.ml.training import fit

    return lambda X, y, num_classes: fit(X, y, params=train_params, num_classes=num_classes, progress=False).model


def predict(model, X):
    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(X[s : s + 1024])).argmax(1) for s in range(0, len(X), 1024)]).numpy()


def prf(flagged: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    tp = int((flagged & truth).sum())
    p = tp / max(1, int(flagged.sum()))
    r = tp / max(1, int(truth.sum()))
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def flag_mask(findings, n: int) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[findings.flagged_indices] = True
    return m


# ---------------------------------------------------------------- experiments


@dataclass
class Bench:
    """One dataset split, the screening settings and the final-model trainer; one method per table."""

    Xtr: np.ndarray
    ytr: np.ndarray
    Xte: np.ndarray
    yte: np.ndarray
    screen: ScreenParams
    train_final: Callable[..., torch.nn.Module]
    quick: bool
    seed: int
    clean_model: torch.nn.Module | None = None
    clean_acc: float = float("nan")

    @property
    def K(self) -> int:
        return int(max(self.ytr.max(), self.yte.max())) + 1

    def accuracy(self, model: torch.nn.Module) -> float:
        return float((predict(model, self.Xte) == self.yte).mean())

    def clean(self) -> None:
        t0 = time.perf_counter()
        self.clean_model = self.train_final(self.Xtr, self.ytr, num_classes=self.K)
        train_s = time.perf_counter() - t0
        self.clean_acc = self.accuracy(self.clean_model)
        f = screen_dataset(self.Xtr, self.ytr, params=self.screen)
        print("## Clean data\n")
        print("| rows | flagged | flagged % | per detector | screening s | final-model training s | clean acc |")
        print("|---|---|---|---|---|---|---|")
        per = ", ".join(f"{k}={v['flagged']}" for k, v in f.per_detector.items())
        print(f"| {len(self.Xtr)} | {len(f.flags)} | {100 * f.flagged_fraction:.1f} | {per} | {f.seconds:.1f} | {train_s:.1f} | {self.clean_acc:.3f} |\n", flush=True)

    def _flip_row(self, label: str, yn: np.ndarray) -> str:
        """Screen flipped labels; final models on all rows (undefended) and accepted rows."""
        truth = yn != self.ytr
        f = screen_dataset(self.Xtr, yn, params=self.screen)
        flagged = flag_mask(f, len(yn))
        p, r, f1 = prf(flagged, truth)
        li = np.zeros(len(yn), bool)
        li[[g["index"] for g in f.flags if "label_issues" in g["detectors"]]] = True
        acc_u = self.accuracy(self.train_final(self.Xtr, yn, num_classes=self.K))
        acc_d = self.accuracy(self.train_final(self.Xtr[~flagged], f.labels[~flagged], num_classes=self.K))
        return (f"| {label} | {int(truth.sum())} | {len(f.flags)} | {p:.3f} | {r:.3f} | {f1:.3f} | {prf(li, truth)[2]:.3f} "
                f"| {acc_u:.3f} | {acc_d:.3f} | {f.seconds:.1f} |")

    def flips(self) -> None:
        ytr, K, seed = self.ytr, self.K, self.seed
        print(f"## Label flips (clean-data model: acc {self.clean_acc:.3f})\n")
        print("Random: rows of any class relabelled to another class at random. Targeted: rows of")
        print("classes 1 and 4 relabelled 7 (rate of all rows, at most half of each class), and rows")
        print("of class 1 relabelled 7 (share of class 1).\n")
        print("| flips | flipped | flagged | precision | recall | F1 | F1 label_issues only | acc undefended | acc defended | screening s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for rate in ([0.1] if self.quick else [0.05, 0.1, 0.2]):
            rng = np.random.default_rng(seed + 1)
            idx = rng.choice(len(ytr), int(rate * len(ytr)), replace=False)
            yn = ytr.copy()
            yn[idx] = (yn[idx] + rng.integers(1, K, len(idx))) % K
            print(self._flip_row(f"random {rate:.0%}", yn), flush=True)
        for rate in ([0.05] if self.quick else [0.01, 0.05, 0.1]):
            rng = np.random.default_rng(seed + 4)
            src = np.where(np.isin(ytr, [1, 4]))[0]
            idx = rng.choice(src, min(len(src) // 2, int(rate * len(ytr))), replace=False)
            yn = ytr.copy()
            yn[idx] = 7
            print(self._flip_row(f"1, 4 → 7, {rate:.0%} of rows", yn), flush=True)
        for share in ([0.5] if self.quick else [0.1, 0.5, 0.7]):
            rng = np.random.default_rng(seed + 5)
            src = np.where(ytr == 1)[0]
            yn = ytr.copy()
            yn[rng.choice(src, int(share * len(src)), replace=False)] = 7
            print(self._flip_row(f"1 → 7, {share:.0%} of class 1", yn), flush=True)
        print()

    def annotators(self) -> None:
        ytr, K = self.ytr, self.K
        print("## Annotators (5 annotators, each labels every row; #0 flips 30%, the rest 5%)\n")
        rng = np.random.default_rng(self.seed + 2)
        A = np.repeat(ytr[:, None], 5, axis=1)
        for a, noise in enumerate([0.3, 0.05, 0.05, 0.05, 0.05]):
            m = rng.random(len(ytr)) < noise
            A[m, a] = (A[m, a] + rng.integers(1, K, m.sum())) % K
        f = screen_dataset(self.Xtr, A[:, 1], params=self.screen, annotator_labels=A)
        print("| annotator | quality | flagged | labels |")
        print("|---|---|---|---|")
        for a in f.annotators:
            print(f"| {a['annotator']} | {a['quality']:.3f} | {a['flagged']} | {a['n_labels']} |")
        print(f"\nconsensus accuracy vs true labels: {(f.labels == ytr).mean():.4f}; given-label (annotator 1) accuracy: {(A[:, 1] == ytr).mean():.4f}\n", flush=True)

    def backdoors(self) -> None:
        attacks: dict[str, tuple[Trigger, int]] = {  # name: (trigger, target class)
            "patch 3x3 bottom-right": (patch_trigger("br"), 0),
            "patch 3x3 top-left": (patch_trigger("tl"), 7),
            "patch 3x3 bottom-left": (patch_trigger("bl"), 2),
            "patch 3x3 centre": (patch_trigger("mm"), 3),
            "blend 20% noise": (blend_trigger(), 5),
            "sparse 3 pixels": (sparse_trigger(), 9),
            "checkerboard 3x3 top-right": (checker_trigger(), 4),
            "patch 2x2 centre": (patch_trigger("mm", size=2), 8),
        }
        if self.quick:
            attacks = {k: attacks[k] for k in ("patch 3x3 bottom-right", "patch 3x3 centre", "blend 20% noise", "sparse 3 pixels", "checkerboard 3x3 top-right")}
        print(f"## Backdoors (clean-data model: acc {self.clean_acc:.3f})\n")
        print("ASR clean: the same triggered test images on the model trained on clean data (what the")
        print("trigger does without any poisoning, e.g. filling a 0's centre makes an 8).\n")
        print("| trigger | target | rate | poisoned | flagged | precision | recall | F1 | ASR clean | ASR undefended | ASR defended | acc undefended | acc defended | screening s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, (trig, t) in attacks.items():
            Xtrig = trig(self.Xte[self.yte != t])
            asr_c = float((predict(self.clean_model, Xtrig) == t).mean())
            for rate in [0.01, 0.05, 0.1]:
                Xp, yp, truth = poison(self.Xtr, self.ytr, rate=rate, trigger=trig, target=t, seed=self.seed + 3)
                f = screen_dataset(Xp, yp, params=self.screen)
                flagged = flag_mask(f, len(yp))
                p, r, f1 = prf(flagged, truth)
                und = self.train_final(Xp, yp, num_classes=self.K)
                dfd = self.train_final(Xp[~flagged], f.labels[~flagged], num_classes=self.K)
                asr_u = float((predict(und, Xtrig) == t).mean())
                asr_d = float((predict(dfd, Xtrig) == t).mean())
                print(f"| {name} | {t} | {rate:.0%} | {int(truth.sum())} | {len(f.flags)} | {p:.3f} | {r:.3f} | {f1:.3f} | {asr_c:.3f} | {asr_u:.3f} | {asr_d:.3f} "
                      f"| {self.accuracy(und):.3f} | {self.accuracy(dfd):.3f} | {f.seconds:.1f} |", flush=True)
        print()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="tables after the clean-data one (default: all)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--mnist-rows", type=int, default=None, help="MNIST subset size (default 3000 quick, 10000 full)")
    ap.add_argument("--final", choices=["pipeline", "plain"], default=None,
                    help="final model: the train stage's fit (default on digits) or a plain quick CNN (default on MNIST)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # small nets: one thread beats several on a small shared CPU
    params = load_params(args.params)
    screen = params.screen
    seed = screen.seed
    if args.dataset == "digits":
        X, y = load_digits_data()
        epochs = 20
    else:
        X, y = load_mnist_data(args.mnist_rows or (3000 if args.quick else 10000), seed)
        epochs = 8
    Xtr, ytr, Xte, yte = split(X, y, seed=seed)
    final = args.final or ("pipeline" if args.dataset == "digits" else "plain")
    bench = Bench(Xtr, ytr, Xte, yte, screen=screen, train_final=final_trainer(final, params.train, epochs=epochs, seed=seed),
                  quick=args.quick, seed=seed)
    what = f"train stage fit ({params.train.mode}, {params.train.epochs} epochs)" if final == "pipeline" else f"plain CNN, {epochs} epochs"
    print(f"# Screening benchmark: {args.dataset}, {len(Xtr)} train / {len(Xte)} test rows, detectors {screen.detectors}; final model: {what}\n")
    bench.clean()
    for section in SECTIONS:
        if section in args.sections:
            getattr(bench, section)()


if __name__ == "__main__":
    main()
