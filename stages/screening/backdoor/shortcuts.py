"""Detector ``shortcuts``: labels that hold only while suspicious rows are in the training data.

A dirty-label backdoor teaches the models a shortcut (the trigger) from the poisoned rows
themselves: out-of-sample models trained on folds that hold the other poisoned rows learn
it and call a poisoned row's label plausible, although its content is another class's.
Take the shortcut's teachers away and the label falls. So the screening models are refitted
(K-fold, as for label issues) without every row that any of them, or the trimmed nearest
neighbours, doubt (p(label) < ``SHORTCUT_DOUBT``, or under half the trimmed neighbours share
the label): a generous set that holds most poisoned rows whatever the trigger looks like
(fixed or moving patches, values that vary per row, several triggers, a rare combination
of table columns). Rows whose label the models then doubt join the set, and the refit is
repeated until the set stops growing (at most ``SHORTCUT_ROUNDS`` times).

A doubted row is flagged when its label's out-of-sample probability falls below
``SHORTCUT_MAX_PROB`` without the doubted rows, having been at least ``SHORTCUT_MIN_DROP``
higher with them. Ambiguous clean rows are doubted too, but their label does not depend on
other doubted rows: it was never plausible enough to fall that far.

A doubted row is also flagged when the models fitted without the doubted rows leave its
label no chance (below ``SHORTCUT_NO_CHANCE``), however low it was with them. A trigger the
models only half learn (a patch at a new position in every row) gives a poisoned row a
label probability that moves from fit to fit: 0.02 in the first fit and 0.31 in
``label_issues``' second (which keeps the poisoned rows the first did not flag), or 0.29
falling to 0.00 here, a drop just short of ``SHORTCUT_MIN_DROP``. Most ambiguous clean rows
keep some probability for their label once the doubted rows are gone, their content being
shared by rows that are not doubted; the few that do not are the rule's cost (see the
constant).

The teachers are a small group within their class: a class most of whose rows end up doubted
(more than ``SHORTCUT_MAX_CLASS_DOUBT``) is contested as a whole, as when half of the 1s are
relabelled 7 and every 1 becomes a coin toss between the two labels. Refitting without most
of it says nothing about a shortcut (its few remaining rows decide), so rows of a contested
class are not judged here; a class lost to another one is ``label_issues``'s.

A trigger that every model learns from a few rows and that puts its rows next to each
other (a fixed patch at 5% or more) keeps them out of the doubted set; ``spectral`` and
``stamps`` find those.
"""

from __future__ import annotations

import numpy as np

from stages.screening.context import ScreenContext
from stages.screening.evidence import ensemble
from stages.screening.registry import register_detector
from stages.screening.results import DetectorResult

SHORTCUT_DOUBT = 0.5  # a model doubts a label below this probability; trimmed neighbours below this share
SHORTCUT_ROUNDS = 3
SHORTCUT_MAX_PROB = 0.1  # without the doubted rows the label is implausible ...
SHORTCUT_MIN_DROP = 0.3  # ... and it was at least this much more probable with them
# ... or, whatever it was with them, below this without them. Calibrated on seeds 100-104
# (the whole screen's flags; ``bench/poisoning.py --sections calibrate-shortcuts`` gives the
# detector's own), every trigger family at 1%, 5% and 10%: on digits, moving-patch rows left
# 144 -> 49 of 1,150 and varied-values rows at 1% 11 -> 6 of 70, for one more clean row
# flagged per poisoned split of 1,437; tables unchanged; a clean 8,000-row MNIST split
# 1.47% -> 1.69% flagged. 0.005 left 51 moving-patch rows; 0.02 caught 1 more and flagged 36
# more clean rows.
SHORTCUT_NO_CHANCE = 0.01
SHORTCUT_MAX_CLASS_DOUBT = 0.75  # a class with more of its rows doubted is contested as a whole: not judged


def _refit_leaves_every_class(ctx: ScreenContext, doubted: np.ndarray) -> bool:
    """Whether every class keeps enough undoubted rows for the K-fold refit (two per fold)."""
    present = np.bincount(ctx.labels, minlength=ctx.num_classes) > 0
    kept = np.bincount(ctx.labels[~doubted], minlength=ctx.num_classes)
    return bool((kept[present] >= 2 * ctx.params.folds).all())


def refit_mask(ctx: ScreenContext) -> np.ndarray | None:
    """The rows doubted by any screening model or by the trimmed neighbours, which the first
    refit leaves out; None when leaving them out would leave a class too few rows to refit."""
    rows = np.arange(len(ctx.labels))
    doubted = ctx.trimmed()[0] < SHORTCUT_DOUBT
    for probs in ctx.model_probs().values():
        doubted |= probs[rows, ctx.labels] < SHORTCUT_DOUBT
    return doubted if _refit_leaves_every_class(ctx, doubted) else None


def shortcut_probs(ctx: ScreenContext) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-sample probabilities without the doubted rows (N x K), and the doubted-row mask.

    The doubted set grows only while every class keeps enough rows to refit on; when the
    screening models doubt so much of a class that nothing would be left (a tiny or very
    noisy dataset), the refit is not made and no row is doubted: there is no small group of
    rows to tell apart, and the other detectors still judge every row."""

    def make() -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(len(ctx.labels))
        doubted = refit_mask(ctx)
        if doubted is None:
            return ctx.pred_probs(), np.zeros(len(rows), dtype=bool)
        for _ in range(SHORTCUT_ROUNDS):
            probs = ensemble(ctx.model_probs(exclude=doubted))
            grown = doubted | (probs[rows, ctx.labels] < SHORTCUT_DOUBT)
            if (grown == doubted).all() or not _refit_leaves_every_class(ctx, grown):
                break
            doubted = grown
        return probs, doubted

    return ctx.cached("shortcut_probs", make)


@register_detector("shortcuts")
def detect_shortcuts(ctx: ScreenContext) -> DetectorResult:
    rows = np.arange(len(ctx.labels))
    without, doubted = shortcut_probs(ctx)
    before = ctx.pred_probs()[rows, ctx.labels]
    after = without[rows, ctx.labels]
    present = np.bincount(ctx.labels, minlength=ctx.num_classes)
    share = np.bincount(ctx.labels[doubted], minlength=ctx.num_classes) / np.maximum(present, 1)
    contested = share > SHORTCUT_MAX_CLASS_DOUBT
    fell = (after < SHORTCUT_MAX_PROB) & (before - after >= SHORTCUT_MIN_DROP)
    hit = doubted & ~contested[ctx.labels] & (fell | (after < SHORTCUT_NO_CHANCE))
    idx = np.where(hit)[0]
    reasons = [(f"label {ctx.labels[i]} holds only with doubted rows in training: p(label) {before[i]:.2f} with them, "
                if fell[i] else
                f"label {ctx.labels[i]} has no chance without the doubted rows in training: p(label) {before[i]:.2f} with them, ")
               + f"{after[i]:.3f} without (then {int(without[i].argmax())}, p={without[i].max():.2f})" for i in idx]
    counts = np.bincount(ctx.labels[idx], minlength=ctx.num_classes)
    return DetectorResult(idx, before[idx] - after[idx], (f"p(label) < {SHORTCUT_MAX_PROB} without doubted rows, {SHORTCUT_MIN_DROP}+ lower than with them; "
                           f"or < {SHORTCUT_NO_CHANCE} without them"),
                          reasons, {"doubted": int(doubted.sum()), "per_class": {str(c): int(n) for c, n in enumerate(counts) if n},
                                    "contested_classes": {str(c): round(float(share[c]), 3) for c in np.flatnonzero(contested)}})
