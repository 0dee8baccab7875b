"""Detector ``label_issues``: cleanlab ``find_label_issues`` on K-fold out-of-sample probabilities
averaged over an RBF SVC and the screening network.
A targeted flip relabels many images of one class as another (rows of 1 marked 7). Once
a sizeable share of a class is flipped, the out-of-sample models learn the flipped
mapping: every image of that class gets p(1) and p(7) near the flip ratio, whichever
label it carries, so row-level rules cannot tell the flipped rows from the rest and
cleanlab even flags the unflipped 1s as 7s. The class-level evidence is unambiguous:
class 1 has almost no confident rows and gives its probability to 7, while 7 keeps a
confident core of its own. Such a *lost class* owns its mode (rows whose probability
lies on the pair, with more of it on 1 than confident 7s show): rows in it labelled
otherwise are flagged and its own rows are kept (``_lost_classes``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores

from stages.screening.context import ScreenContext
from stages.screening.registry import register_detector
from stages.screening.results import DetectorResult

LABEL_MAX_GIVEN_PROB = 0.1  # out-of-sample probability of the given label ...
LABEL_MIN_OTHER_PROB = 0.6  # ... while one other class is this likely: an obvious label error
LOST_CORE = 0.8  # out-of-sample p(label) of a confident member of its class
LOST_MAX_CORE = 0.5  # a class that lost its images to another: under half its rows confident
LOST_MIN_MASS = 0.25  # ... its rows give this mean probability to one other class
LOST_CORE_GAP = 0.2  # ... whose own rows are confident this much more often
LOST_PAIR_MASS = 0.5  # a row of the lost class's mode puts most of its probability on the pair
LOST_ABSORBER_CONFIDENT = 0.9


@register_detector("label_issues")
def detect_label_issues(ctx: ScreenContext) -> DetectorResult:

    probs = ctx.pred_probs()
    issues = find_label_issues(ctx.labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)  # no fork: the flow process has threads
    # prune_by_noise_rate removes as many rows per class pair as it estimates are noisy, and
    # leaves some rows whose given label the out-of-sample model all but rules out (on
    # digits 13 of 71 flips at 5% had p(label) <= 0.13); those are flagged too
    given = probs[np.arange(len(probs)), ctx.labels]
    obvious = (given <= LABEL_MAX_GIVEN_PROB) & (probs.max(1) >= LABEL_MIN_OTHER_PROB)
    quality = get_label_quality_scores(ctx.labels, probs)
    flagged = issues | obvious
    owner = np.full(len(probs), -1)
    lost = _lost_classes(ctx.labels, probs)
    for c in lost:
        owner[c["mode"]] = c["class"]
    in_mode = owner >= 0
    flagged[in_mode] = ctx.labels[in_mode] != owner[in_mode]
    idx = np.where(flagged)[0]
    reasons = [
        f"label {ctx.labels[i]} but it shows class {owner[i]}, whose images were relabelled (p({owner[i]})={probs[i, owner[i]]:.2f})" if owner[i] >= 0
        else f"label {ctx.labels[i]} but out-of-sample model says {int(probs[i].argmax())} (p={probs[i].max():.2f}, p(label)={given[i]:.2f})"
        for i in idx
    ]
    extra = {"lost_classes": [{k: v for k, v in c.items() if k != "mode"} for c in lost]}
    return DetectorResult(idx, 1.0 - quality[idx], f"cleanlab prune_by_noise_rate, or p(label) <= {LABEL_MAX_GIVEN_PROB} with another class >= {LABEL_MIN_OTHER_PROB}, or a lost class's mode", reasons, extra)


def _lost_classes(labels: np.ndarray, probs: np.ndarray) -> list[dict[str, Any]]:
    """Classes whose images were largely relabelled as one other class (targeted flips).

    Class j is lost to d when under ``LOST_MAX_CORE`` of the rows labelled j are confident
    (p(j) >= ``LOST_CORE``), those rows give d a mean probability of at least
    ``LOST_MIN_MASS``, and d keeps a confident core (``LOST_CORE_GAP`` more often
    confident than j). Clean and randomly flipped data have no such pair: random flips
    lower every class's confidence but spread the lost mass over all classes.

    j's mode: rows with p(j) + p(d) >= ``LOST_PAIR_MASS`` whose share of that pair mass on j
    exceeds both half the 5th percentile of the share on j's own rows and the 90th
    percentile of the share on d's confident rows (p(d) >= ``LOST_ABSORBER_CONFIDENT``).
    """
    K = probs.shape[1]
    counts = np.bincount(labels, minlength=K)
    core = np.array([(probs[labels == j, j] >= LOST_CORE).mean() if counts[j] else 1.0 for j in range(K)])
    found = []
    for j in np.where((core < LOST_MAX_CORE) & (counts >= 5))[0]:
        mine = labels == j
        mass = probs[mine].mean(0)
        mass[j] = -1.0
        d = int(mass.argmax())
        if mass[d] < LOST_MIN_MASS or core[d] < core[j] + LOST_CORE_GAP:
            continue
        pair = probs[:, j] + probs[:, d]
        share = probs[:, j] / np.maximum(pair, 1e-12)
        confident_d = (labels == d) & (probs[:, d] >= LOST_ABSORBER_CONFIDENT)
        floor = float(np.quantile(share[confident_d], 0.9)) if confident_d.sum() >= 5 else 0.0
        threshold = max(0.5 * float(np.quantile(share[mine], 0.05)), floor, 0.01)
        mode = (pair >= LOST_PAIR_MASS) & (share >= threshold)
        found.append({"class": int(j), "absorbed_by": d, "confident_share": round(float(core[j]), 3),
                      "absorber_confident_share": round(float(core[d]), 3), "share_threshold": round(threshold, 4),
                      "mode_rows": int(mode.sum()), "mode": mode})
    return found
