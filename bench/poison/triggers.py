"""Backdoor triggers the benchmark plays: one ``Attack`` per family, image or table.

A trigger is ``apply(X, rng) -> X'`` on rows of the split (the rng draws what varies per
row: a position, values); an attack is one or more (trigger, target class) pairs. Poisoned
training rows are drawn from the rows not already of the target class, stamped and
relabelled to the target (dirty-label poisoning); with two triggers each poisons ``rate``
of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

Trigger = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Attack:
    name: str
    family: str  # what kind of trigger: fixed patch, blend, random position, varied values, two at once, table pair
    parts: tuple[tuple[Trigger, int], ...]  # (trigger, target class)
    new: bool = False  # a family the bench did not cover before


def patch(corner: str, size: int = 3, value: float = 1.0) -> Trigger:
    def apply(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        X = X.copy()
        H, W = X.shape[-2:]
        r = {"t": 0, "b": H - size, "m": (H - size) // 2}[corner[0]]
        c = {"l": 0, "r": W - size, "m": (W - size) // 2}[corner[1]]
        X[..., r : r + size, c : c + size] = value
        return X

    return apply


def blend(alpha: float = 0.2, seed: int = 123) -> Trigger:
    def apply(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pattern = np.random.default_rng(seed).random(X.shape[1:]).astype(np.float32)
        return ((1 - alpha) * X + alpha * pattern).astype(np.float32)

    return apply


def checker(size: int = 3) -> Trigger:
    """A black-and-white checkerboard in the top-right corner."""

    def apply(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        X = X.copy()
        W = X.shape[-1]
        X[..., :size, W - size :] = (np.indices((size, size)).sum(0) % 2).astype(np.float32)
        return X

    return apply


def sparse() -> Trigger:
    def apply(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        X = X.copy()
        H, W = X.shape[-2:]
        X[..., 0, 0] = 1.0
        X[..., 1, W - 1] = 1.0
        X[..., H - 1, 1] = 1.0
        return X

    return apply


def random_position_patch(size: int = 3) -> Trigger:
    """A white square at a position drawn anew for every row."""

    def apply(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        X = X.copy()
        H, W = X.shape[-2:]
        rows = rng.integers(0, H - size + 1, len(X))
        cols = rng.integers(0, W - size + 1, len(X))
        for i, (r, c) in enumerate(zip(rows, cols)):
            X[i, ..., r : r + size, c : c + size] = 1.0
        return X

    return apply


def varied_patch(corner: str = "br", size: int = 3, low: float = 0.5) -> Trigger:
    """A square in a fixed corner whose pixels take values drawn anew per row and pixel
    (uniform on [low, 1]): no two poisoned rows share exact values."""

    def apply(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        X = X.copy()
        H, W = X.shape[-2:]
        r = 0 if corner[0] == "t" else H - size
        c = 0 if corner[1] == "l" else W - size
        shape = (len(X),) + X.shape[1:-2] + (size, size)
        X[..., r : r + size, c : c + size] = rng.uniform(low, 1.0, shape).astype(np.float32)
        return X

    return apply


def table_pair(a: int, b: int, va: float, vb: float, *, spread: float = 0.0) -> Trigger:
    """Columns ``a`` and ``b`` set to ``va`` and ``vb`` (each a common value, together rare);
    with ``spread`` > 0 the values vary per row, uniform within +-spread."""

    def apply(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        X = X.copy()
        if spread:
            X[:, a] = np.clip(va + rng.uniform(-spread, spread, len(X)), 0, 1)
            X[:, b] = np.clip(vb + rng.uniform(-spread, spread, len(X)), 0, 1)
        else:
            X[:, a], X[:, b] = va, vb
        return X

    return apply


def image_attacks(K: int) -> list[Attack]:
    t = lambda c: c % K  # noqa: E731 - targets as in the bench's tables, folded into K classes
    return [
        Attack("patch 3x3 bottom-right", "fixed patch", ((patch("br"), t(0)),)),
        Attack("patch 3x3 top-left", "fixed patch", ((patch("tl"), t(7)),)),
        Attack("patch 3x3 centre", "fixed patch on ink", ((patch("mm"), t(3)),)),
        Attack("patch 2x2 centre", "fixed patch on ink", ((patch("mm", size=2), t(8)),)),
        Attack("checkerboard 3x3 top-right", "fixed pattern", ((checker(), t(4)),)),
        Attack("sparse 3 pixels", "fixed pixels", ((sparse(), t(9)),)),
        Attack("blend 20% noise", "blend", ((blend(), t(5)),)),
        Attack("patch 3x3 random position", "random position", ((random_position_patch(), t(6)),), new=True),
        Attack("patch 3x3 bottom-right, varied values", "varied values", ((varied_patch("br"), t(1)),), new=True),
        Attack("two: patch bottom-left + sparse", "two at once", ((patch("bl"), t(2)), (sparse(), t(9))), new=True),
    ]


def _pairs(X: np.ndarray, n: int) -> list[tuple[int, int]]:
    """``n`` disjoint column pairs whose correlation is nearest 0.6: each column's value is
    common, but a high value in one with a low value in the other is rare."""
    C = np.corrcoef(X.T)
    F = X.shape[1]
    cand = sorted(((abs(C[i, j] - 0.6), i, j) for i in range(F) for j in range(i + 1, F) if np.isfinite(C[i, j])))
    used: set[int] = set()
    out = []
    for _, i, j in cand:
        if i in used or j in used:
            continue
        out.append((i, j))
        used |= {i, j}
        if len(out) == n:
            break
    return out


def table_attacks(Xtr: np.ndarray, K: int) -> list[Attack]:
    """Rare value combinations in two columns: column a at its 85th percentile, column b at
    its 15th, where a and b are positively correlated (exact values, or per-row values
    within +-0.03 on the scaled column)."""
    (a1, b1), (a2, b2) = _pairs(Xtr, 2)
    q = lambda j, p: float(np.quantile(Xtr[:, j], p))  # noqa: E731
    first = table_pair(a1, b1, q(a1, 0.85), q(b1, 0.15))
    second = table_pair(a2, b2, q(a2, 0.85), q(b2, 0.15))
    varied = table_pair(a1, b1, q(a1, 0.85), q(b1, 0.15), spread=0.03)
    last = K - 1
    return [
        Attack(f"columns {a1},{b1}: rare pair, exact", "table pair", ((first, 0),), new=True),
        Attack(f"columns {a1},{b1}: rare pair, varied values", "table pair, varied values", ((varied, 0),), new=True),
        Attack(f"two: columns {a1},{b1} and {a2},{b2}", "table pair, two at once", ((first, 0), (second, last)), new=True),
    ]


def poison(X: np.ndarray, y: np.ndarray, attack: Attack, *, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stamp ``rate`` of the rows per trigger (rows not of its target, not already poisoned)
    and relabel them; returns X, y and the mask of poisoned rows."""
    rng = np.random.default_rng(seed)
    X, y = X.copy(), y.copy()
    mask = np.zeros(len(X), dtype=bool)
    for trigger, target in attack.parts:
        cand = np.where((y != target) & ~mask)[0]
        idx = rng.choice(cand, max(1, int(round(rate * len(X)))), replace=False)
        X[idx] = trigger(X[idx], rng)
        y[idx] = target
        mask[idx] = True
    return X, y, mask
