"""Detector ``activation_clustering``: Chen et al. 2018: per class 2-means on PCA-reduced
penultimate features; the smaller cluster is confirmed by exclusionary reclassification
(a model trained without it assigns most of it to other classes).
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score
from sklearn.svm import SVC

from stages.screening.backdoor.spectral import SPLIT_MIN_SIDE
from stages.screening.context import ScreenContext
from stages.screening.evidence import _svc_rows
from stages.screening.registry import register_detector
from stages.screening.results import DetectorResult

AC_MAX_RELATIVE_SIZE = 0.35
AC_MIN_SILHOUETTE = 0.25
AC_MAX_SAME_CLASS = 0.2  # exclusionary reclassification: poison when < 20% keeps its label
AC_MAX_ONE_CLASS = 0.6  # ... and no single other class takes over 60% of it


@register_detector("activation_clustering")
def detect_activation_clustering(ctx: ScreenContext) -> DetectorResult:

    feats = ctx.screening_net()["features"]
    idx, scores, reasons = [], [], []
    for c in np.unique(ctx.labels):
        ic = np.where(ctx.labels == c)[0]
        if len(ic) < 20:
            continue
        f = feats[ic] - feats[ic].mean(0)
        dims = int(min(10, f.shape[1], len(ic) - 1))
        Z = PCA(dims, random_state=ctx.params.seed).fit_transform(f)
        lab = KMeans(2, n_init=5, random_state=ctx.params.seed).fit_predict(Z)
        small = int(np.argmin(np.bincount(lab, minlength=2)))
        members = ic[lab == small]
        rel = len(members) / len(ic)
        if len(members) < SPLIT_MIN_SIDE or rel > AC_MAX_RELATIVE_SIZE:
            continue
        sil = float(silhouette_score(Z, lab))
        if sil < AC_MIN_SILHOUETTE:
            continue
        # exclusionary reclassification: train without the cluster, classify the cluster
        keep = np.ones(len(ctx.X), dtype=bool)
        keep[members] = False
        rows = _svc_rows(np.where(keep)[0], ctx.params.seed)
        clf = SVC(C=10.0, gamma="scale", random_state=ctx.params.seed).fit(ctx.flat[rows], ctx.labels[rows])
        pred = clf.predict(ctx.flat[members])
        same = float((pred == c).mean())
        # a legitimate sub-style of class c, once removed, is read as one look-alike class;
        # a dirty-label cluster is read as the several classes its content came from
        top_other = float(np.bincount(pred[pred != c]).max() / len(pred)) if (pred != c).any() else 0.0
        if same < AC_MAX_SAME_CLASS and top_other < AC_MAX_ONE_CLASS:
            for r in members:
                idx.append(int(r))
                scores.append(1.0 - same)
                reasons.append(f"class {c}: small activation cluster ({rel:.0%}, silhouette {sil:.2f}); without it only {same:.0%} of it is classed {c}")
    return DetectorResult(np.array(idx, dtype=np.int64), np.array(scores), f"size <= {AC_MAX_RELATIVE_SIZE}, silhouette >= {AC_MIN_SILHOUETTE}, reclassified < {AC_MAX_SAME_CLASS}", reasons)
