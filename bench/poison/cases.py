"""One benchmark case per call: screen a (possibly poisoned) split, train final models, and
return one JSON-ready record. The sections of ``bench.poisoning`` are loops over these.

Final models: ``pipeline`` is the train stage's own ``fit`` with ``params.yaml``'s train
section (what users promote; for tables in ``standard`` mode with the MLP); ``plain`` a
quick Adam loop (the screening network's), for large benches on a CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench.poison.data import Split
from bench.poison.triggers import Attack, poison
from stages.core.params import Params, ScreenParams
from stages.screening import screen_dataset

Trainer = Callable[[np.ndarray, np.ndarray, int], torch.nn.Module]


def make_trainer(mode: str, params: Params, *, split: Split, seed: int) -> Trainer:
    """A final-model trainer for ``split`` (``pipeline`` or ``plain``; see the module docstring)."""
    if mode == "plain":
        from stages.screening.evidence import _train_net

        epochs = 30 if split.is_table else (20 if split.Xtr.shape[-1] <= 16 else 8)
        return lambda X, y, K: _train_net(X, y, K, epochs=epochs, seed=seed)[0]
    from stages.ml.training import fit

    train = params.train
    if split.is_table:
        train = train.model_copy(update={"mode": "standard", "model": "mlp"})
    return lambda X, y, K: fit(X, y, params=train, num_classes=K, progress=False).model


def predict(model: torch.nn.Module, X: np.ndarray) -> np.ndarray:
    from stages.ml.runtime import predict_logits

    return predict_logits(model, X).argmax(1)


def prf(flagged: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    tp = int((flagged & truth).sum())
    p = tp / max(1, int(flagged.sum()))
    r = tp / max(1, int(truth.sum()))
    return {"precision": p, "recall": r, "f1": (2 * p * r / (p + r) if p + r else 0.0)}


def _mask(findings: Any, n: int, detector: str | None = None) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    idx = [f["index"] for f in findings.flags if detector is None or detector in f["detectors"]]
    m[idx] = True
    return m


def _per_detector(findings: Any, truth: np.ndarray | None = None) -> dict[str, Any]:
    """Per detector: rows flagged, seconds; with ``truth``: true flags, and true flags no
    other detector made (``only``)."""
    n = len(findings.labels)
    masks = {name: _mask(findings, n, name) for name in findings.per_detector}
    out = {}
    for name, d in findings.per_detector.items():
        hits = masks[name]
        out[name] = {"flagged": int(hits.sum()), "seconds": d["seconds"]}
        if truth is not None:
            others = np.zeros(n, dtype=bool)
            for other, m in masks.items():
                if other != name:
                    others |= m
            out[name]["true"] = int((hits & truth).sum())
            out[name]["only"] = int((hits & truth & ~others).sum())
    return out


def clean_case(split: Split, screen: ScreenParams, train: Trainer) -> tuple[dict[str, Any], torch.nn.Module]:
    """Flags on clean training rows; clean accuracy of the final model (and of logistic
    regression on tables)."""
    f = screen_dataset(split.Xtr, split.ytr, params=screen)
    t0 = time.perf_counter()
    model = train(split.Xtr, split.ytr, split.K)
    rec = {"rows": len(split.ytr), "flagged": len(f.flags), "flagged_fraction": f.flagged_fraction,
           "per_detector": _per_detector(f), "screen_s": f.seconds, "train_s": round(time.perf_counter() - t0, 1),
           "clean_acc": float((predict(model, split.Xte) == split.yte).mean())}
    if split.is_table:
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(max_iter=5000).fit(split.Xtr, split.ytr)
        rec["logreg_acc"] = float((lr.predict(split.Xte) == split.yte).mean())
    return rec, model


def flip_labels(y: np.ndarray, K: int, *, rate: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    idx = rng.choice(len(y), int(rate * len(y)), replace=False)
    yn = y.copy()
    yn[idx] = (yn[idx] + rng.integers(1, K, len(idx))) % K
    return yn


def flips_case(split: Split, screen: ScreenParams, yn: np.ndarray) -> dict[str, Any]:
    truth = yn != split.ytr
    f = screen_dataset(split.Xtr, yn, params=screen)
    flagged = _mask(f, len(yn))
    return {"flipped": int(truth.sum()), "flagged": len(f.flags), **prf(flagged, truth),
            "f1_label_issues": prf(_mask(f, len(yn), "label_issues"), truth)["f1"] if "label_issues" in f.per_detector else None,
            "per_detector": _per_detector(f, truth), "screen_s": f.seconds}


def attack_success(model: torch.nn.Module, split: Split, attack: Attack) -> float:
    """Worst over the attack's triggers: share of test rows not of the target that the
    stamped row sends to the target."""
    worst = 0.0
    for i, (trigger, target) in enumerate(attack.parts):
        rows = split.yte != target
        Xt = trigger(split.Xte[rows], np.random.default_rng(10_000 + i))
        worst = max(worst, float((predict(model, Xt) == target).mean()))
    return worst


def backdoor_case(split: Split, screen: ScreenParams, train: Trainer, attack: Attack, *, rate: float, clean_model: torch.nn.Module,
                  scan: Callable[[torch.nn.Module], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Poison ``rate`` of the training rows per trigger, screen, train on all rows
    (undefended) and on the accepted rows (defended). When screening accepted no poisoned
    row, the defended model holds no poison and the clean model's figures stand for it
    (``defended_model: clean``)."""
    Xp, yp, truth = poison(split.Xtr, split.ytr, attack, rate=rate, seed=split.seed + 3)
    f = screen_dataset(Xp, yp, params=screen)
    flagged = _mask(f, len(yp))
    und = train(Xp, yp, split.K)
    left = int((truth & ~flagged).sum())
    rec = {"attack": attack.name, "family": attack.family, "new": attack.new, "targets": [t for _, t in attack.parts],
           "rate": rate, "poisoned": int(truth.sum()), "flagged": len(f.flags), "poisoned_left": left,
           **prf(flagged, truth), "per_detector": _per_detector(f, truth), "screen_s": f.seconds,
           "asr_clean": attack_success(clean_model, split, attack), "asr_undefended": attack_success(und, split, attack),
           "acc_undefended": float((predict(und, split.Xte) == split.yte).mean())}
    if left == 0:
        dfd, rec["defended_model"] = clean_model, "clean"
    else:
        dfd, rec["defended_model"] = train(Xp[~flagged], f.labels[~flagged], split.K), "trained"
    rec["asr_defended"] = attack_success(dfd, split, attack)
    rec["acc_defended"] = float((predict(dfd, split.Xte) == split.yte).mean())
    if scan is not None:
        rec["scan_undefended"] = scan(und)
        if rec["defended_model"] == "trained":
            rec["scan_defended"] = scan(dfd)
    return rec


def scan_summary(model: torch.nn.Module, split: Split, params: Params) -> dict[str, Any]:
    """The evaluate stage's backdoor scan on the clean test rows."""
    from stages.ml.backdoor_scan import scan_backdoor

    s = params.evaluate.backdoor_scan
    t0 = time.perf_counter()
    r = scan_backdoor(model, split.Xte, split.yte, steps=s.steps, samples=s.samples, success=s.success, seed=split.seed)
    return {"max_anomaly_index": r["max_anomaly_index"], "suspect_class": r["suspect_class"],
            "sizes": [c["trigger_size"] for c in r["classes"]], "seconds": round(time.perf_counter() - t0, 1)}
