"""A picture of what screening flagged: the most suspicious rows per detector, as a PNG."""

from __future__ import annotations

import math

import numpy as np

from stages.screening.results import ScreenFindings


def plot_suspects(X: np.ndarray, findings: ScreenFindings, path: str, *, per_detector: int = 8) -> None:
    """Write a PNG grid: one row per detector, its ``per_detector`` highest-scored rows."""
    import matplotlib  # matplotlib: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: only when a plot is drawn

    X = np.asarray(X)
    names = list(findings.per_detector) or ["(none)"]
    cols = max(1, per_detector)
    fig, axes = plt.subplots(len(names), cols, figsize=(1.4 * cols, 1.6 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        rows = sorted((f for f in findings.flags if name in f["detectors"]), key=lambda f: -f["scores"][name])[:cols]
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
            if c >= len(rows):
                ax.axis("off") if c else None
                continue
            i = rows[c]["index"]
            img = X[i]
            if img.ndim == 3:
                img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
            elif img.ndim == 1:
                side = int(math.isqrt(img.size))
                img = img[: side * side].reshape(side, side)
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"#{i} y={findings.labels[i]}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
