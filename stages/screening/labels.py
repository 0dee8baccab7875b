"""Detector ``label_issues``: rows whose given label the K-fold out-of-sample models all but rule
out (mean probability of the label below ``LABEL_MAX_PROB`` of the data's kind; the models are those of
``evidence``: the screening network and nearest neighbours for images; logistic
regression, an RBF SVC and nearest neighbours on standardised columns for tables). The
models are fitted twice: the second time without the rows the first fit flagged, whose
wrong labels otherwise pull the models towards them (on wine, 10% random flips: F1 0.90
after one fit, 0.94 after two). cleanlab ranks the flagged rows (label quality scores).
``LABEL_MAX_PROB`` was calibrated on seeds and splits other than those the benchmark
reports (``bench/poisoning.py --sections calibrate``).

A targeted flip relabels many images of one class as another (rows of 1 marked 7). Once
a sizeable share of a class is flipped, the out-of-sample models learn the flipped
mapping: every image of that class gets p(1) and p(7) near the flip ratio, whichever
label it carries, so row-level rules cannot tell the flipped rows from the rest and
cleanlab even flags the unflipped 1s as 7s. The class-level evidence is unambiguous:
class 1 has almost no confident rows and gives its probability to 7, while 7 keeps a
confident core of its own. Such a *lost class* owns its mode (rows whose probability
lies on the pair, with more of it on 1 than confident 7s show): rows in it labelled
otherwise are flagged and its own rows are kept (``_lost_classes``).

Classes that merely overlap look the same at the class level: on a clean table with a
large class beside a small one, the small class has few confident rows and gives its
probability to the large one. What tells the two apart is that relabelled rows are a draw
of the lost class's own content: within the mode, the models cannot rank the rows
labelled j above those relabelled d (AUC near 0.5), while across a natural boundary the
rows labelled j lean towards j (``LOST_MAX_AUC``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cleanlab.rank import get_label_quality_scores
from sklearn.metrics import roc_auc_score

from stages.screening.context import ScreenContext
from stages.screening.evidence import ensemble
from stages.screening.registry import register_detector
from stages.screening.results import DetectorResult

# out-of-sample probability of the given label below which it is flagged, per kind of data
# (calibrated on seeds 100-104: images 0.1 (digits F1 mean 0.974, worst 0.961; 0.2: 0.966,
# 0.956), tables 0.2 (wine 0.964 / 0.929, breast cancer 0.902 / 0.884; 0.1: 0.946 / 0.880
# and 0.872 / 0.861))
LABEL_MAX_PROB = {"image": 0.1, "table": 0.2}


def label_threshold(ctx: ScreenContext) -> float:
    return LABEL_MAX_PROB["table" if ctx.is_table else "image"]
LOST_CORE = 0.8  # out-of-sample p(label) of a confident member of its class
LOST_MAX_CORE = 0.5  # a class that lost its images to another: under half its rows confident
LOST_MIN_MASS = 0.25  # ... its rows give this mean probability to one other class
LOST_CORE_GAP = 0.2  # ... whose own rows are confident this much more often
LOST_PAIR_MASS = 0.5  # a row of the lost class's mode puts most of its probability on the pair
LOST_ABSORBER_CONFIDENT = 0.9
# ... and, within the mode, the share on j ranks the rows labelled j above those labelled d no
# better than this AUC. Relabelled rows are a draw of j's own content: 0.44 to 0.56 on digits
# with 30%, 50% and 70% of the 1s relabelled 7; 0.40 to 0.74 on wine and breast cancer with
# 30% or 50% of a class relabelled (16 cases); 0.42 to 0.89 on generated tables (29 cases,
# 5 above 0.75, all where the two classes overlap heavily: the overlap adds rows of d to
# the mode). On 36 clean generated tables (2 to 5 classes, imbalanced, 59% to 96% accurate)
# 18 pairs of overlapping classes met the other conditions, with AUCs of 0.82 to 0.95:
# without this bound the rule flagged up to a quarter of a clean table's rows.
LOST_MAX_AUC = 0.75
LOST_MIN_GROUP = 5  # rows of each label in the mode for the AUC to be measured


def refit_mask(ctx: ScreenContext) -> np.ndarray | None:
    """The rows the first fit flags, which the second is fitted without (None: no refit)."""
    first = ctx.pred_probs()
    flagged = first[np.arange(len(first)), ctx.labels] < label_threshold(ctx)
    return flagged if flagged.any() else None


def label_probs(ctx: ScreenContext) -> np.ndarray:
    """Out-of-sample probabilities of the second fit (without the rows the first one flags)."""

    def make() -> np.ndarray:
        flagged = refit_mask(ctx)
        return ensemble(ctx.model_probs(exclude=flagged)) if flagged is not None else ctx.pred_probs()

    return ctx.cached("label_probs", make)


@register_detector("label_issues")
def detect_label_issues(ctx: ScreenContext) -> DetectorResult:

    probs = label_probs(ctx)
    given = probs[np.arange(len(probs)), ctx.labels]
    quality = get_label_quality_scores(ctx.labels, probs)
    flagged = given < label_threshold(ctx)
    owner = np.full(len(probs), -1)
    lost = _lost_classes(ctx.labels, ctx.pred_probs())
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
    return DetectorResult(idx, 1.0 - quality[idx], f"p(label) < {label_threshold(ctx)}, or a lost class's mode", reasons, extra)


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

    Only a mode whose rows labelled j the share ranks above those labelled d with an AUC of
    at most ``LOST_MAX_AUC`` counts (when each label has ``LOST_MIN_GROUP`` rows there):
    relabelled rows are indistinguishable from the class's own, overlapping classes are not.
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
        auc = _rank_auc(share[mode & mine], share[mode & (labels == d)])
        if auc is not None and auc > LOST_MAX_AUC:
            continue   # the labels follow the content across the pair: overlapping classes, not a relabelling
        found.append({"class": int(j), "absorbed_by": d, "confident_share": round(float(core[j]), 3),
                      "absorber_confident_share": round(float(core[d]), 3), "share_threshold": round(threshold, 4),
                      "mode_rows": int(mode.sum()), "mode_auc": None if auc is None else round(auc, 3), "mode": mode})
    return found


def _rank_auc(high: np.ndarray, low: np.ndarray) -> float | None:
    """P(a value of ``high`` exceeds one of ``low``), ties counted half (the ROC AUC); None
    when either side has fewer than ``LOST_MIN_GROUP`` values."""
    if len(high) < LOST_MIN_GROUP or len(low) < LOST_MIN_GROUP:
        return None
    return float(roc_auc_score(np.r_[np.ones(len(high)), np.zeros(len(low))], np.concatenate([high, low])))
