"""Trigger groups: small sets of rows of one class that share one trigger (used by ``spectral``).

Trimmed nearest neighbours show which rows' content belongs to another class (majority of
their trimmed neighbours carry another label). Among those rows of one class, a trigger group
is a set of at least ``GROUP_MIN_SIZE`` rows each of whose residuals points the same way as
those of at least ``GROUP_MIN_PARTNERS`` others (cosine >= ``GROUP_MIN_COS``); ambiguous clean
rows have residuals that point in unrelated directions. The group's mean residual gives the
trigger's pixels (mask) and values (pattern); see ``stages.screening.backdoor.spectral``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stages.screening.neighbours import _trimmed_neighbours

GROUP_MIN_COS = 0.6  # residuals of one trigger group point the same way (0.5 linked clean rows on digits)
GROUP_MIN_PARTNERS = 2
GROUP_MIN_SIZE = 4
TRIGGER_MASK_ENERGY = 0.25  # mask = pixels holding >= 25% of the peak squared signature weight
TRIGGER_CONSTANT_SPREAD = 0.02  # median |x - median| across trigger holders on a stamped pixel
TRIGGER_CONSTANT_UNUSUAL = 0.25  # ... at a value this far from the median row there
TRIGGER_MAX_DEVIATION = 0.1  # mean |x - pattern| on the mask for a row to carry the trigger
# median |x - pattern| of a group's members on its mask: a trigger is stamped alike; table
# columns are measurements, and a clean breast-cancer split held a group of 8 alike within 0.045
# (a stamped pair: 0; one varied by +-0.03: 0.015)
TRIGGER_MAX_SPREAD = {"image": 0.05, "table": 0.025}
TRIGGER_MAX_OTHER_CLASS = 0.01  # share of other-class rows carrying a foreign trigger
TRIGGER_PASSES = 3


def _trigger_groups(flat: np.ndarray, labels: np.ndarray, typical: np.ndarray, first: tuple[np.ndarray, np.ndarray] | None = None,
                    kind: str = "image") -> list[dict[str, Any]]:
    """Small groups of rows per class that share a trigger; see the module docstring.
    ``kind`` (``image`` or ``table``) picks ``TRIGGER_MAX_SPREAD``.

    At higher rates poisoned rows outvote the clean rows among each other's neighbours; so
    the search is repeated with the rows found so far left out of the neighbours, until a
    pass adds nothing (at most ``TRIGGER_PASSES``)."""
    flagged = np.zeros(len(labels), dtype=bool)
    groups: list[dict[str, Any]] = []
    for _ in range(TRIGGER_PASSES):
        found = _trigger_groups_once(flat, labels, typical, np.where(flagged)[0] if flagged.any() else None, first,
                                     max_spread=TRIGGER_MAX_SPREAD[kind])
        first = None
        if not found:
            break
        groups = found
        new = np.zeros(len(labels), dtype=bool)
        for g in found:
            new[g["carriers"]] = True
        if not (new & ~flagged).any():
            break
        flagged |= new
    for g in groups:
        g["carriers"] = np.where(flagged & (labels == g["class"]))[0]
    return groups


def _trigger_groups_once(flat: np.ndarray, labels: np.ndarray, typical: np.ndarray, excluded: np.ndarray | None,
                         neighbours: tuple[np.ndarray, np.ndarray] | None = None, *, max_spread: float) -> list[dict[str, Any]]:
    """One search pass; ``typical`` is the median row; ``neighbours``: this pass's
    ``_trimmed_neighbours`` when already computed."""
    agree, residual = neighbours if neighbours is not None else _trimmed_neighbours(flat, labels, excluded)
    norm = np.linalg.norm(residual, axis=1) + 1e-12
    groups = []
    for c in np.unique(labels):
        in_class = labels == c
        suspects = np.where(in_class & (agree < 0.5))[0]
        if len(suspects) < GROUP_MIN_SIZE:
            continue
        U = residual[suspects] / norm[suspects, None]
        link = (U @ U.T) >= GROUP_MIN_COS
        np.fill_diagonal(link, False)
        core = link.sum(1) >= GROUP_MIN_PARTNERS
        # connected components of the core rows: one per trigger
        left = set(np.where(core)[0].tolist())
        while left:
            todo, comp = [left.pop()], []
            while todo:
                a = todo.pop()
                comp.append(a)
                nxt = [b for b in np.where(link[a] & core)[0].tolist() if b in left]
                left.difference_update(nxt)
                todo.extend(nxt)
            if len(comp) < GROUP_MIN_SIZE:
                continue
            members = suspects[np.array(sorted(comp))]
            signature = residual[members].mean(0)
            weight = signature**2
            mask = weight >= TRIGGER_MASK_ENERGY * weight.max()
            # a stamped trigger gives every poisoned row the same values on its pixels while
            # handwriting varies: the rows of this class that carry the group's core pattern
            # come from many source classes, and the pixels they all hold at one unusual
            # value complete the trigger's mask (the core alone can be a part of it)
            stamped = False
            core_pattern = np.median(flat[members][:, mask], axis=0)
            holders = in_class & (np.abs(flat[:, mask] - core_pattern).max(1) <= TRIGGER_MAX_DEVIATION)
            if holders.sum() >= GROUP_MIN_SIZE:
                centre = np.median(flat[holders], axis=0)
                spread = np.median(np.abs(flat[holders] - centre), axis=0)
                full = (spread <= TRIGGER_CONSTANT_SPREAD) & (mask | (np.abs(centre - typical) >= TRIGGER_CONSTANT_UNUSUAL))
                if full.sum() >= mask.sum() and (full & mask).sum() == mask.sum():
                    mask, stamped = full, True
            pattern = np.median(flat[members][:, mask], axis=0)
            if np.median(np.abs(flat[members][:, mask] - pattern)) > max_spread:
                continue  # the members vary on the mask: a handwriting sub-style, not a stamp
            deviation = np.abs(flat[:, mask] - pattern)
            # a stamped pattern is carried exactly on every pixel; otherwise on average
            carries = (deviation.max(1) if stamped else deviation.mean(1)) <= TRIGGER_MAX_DEVIATION
            # a pattern that other classes also show (ink where digits have ink) is content,
            # not a foreign trigger: then only rows that also show other-class content count
            common = carries[~in_class].mean() > TRIGGER_MAX_OTHER_CLASS
            carriers = np.union1d(members, np.where(in_class & carries & ((agree < 0.5) | (not common)))[0])
            cos = (residual[members] @ signature) / (norm[members] * np.linalg.norm(signature) + 1e-12)
            groups.append({
                "class": int(c),
                "members": members,
                "carriers": carriers,
                "mask_pixels": int(mask.sum()),
                "common_pattern": bool(common),
                "stat": f"{len(members)} of {len(suspects)} rows with other-class content share one residual (mean cosine {cos.mean():.2f}); trigger on {int(mask.sum())} pixels carried by {len(carriers)} rows",
            })
    return groups
