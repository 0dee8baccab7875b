"""Evaluate: clean accuracy, each attack of ``evaluate.attacks`` at each epsilon, and privacy.

All on the held-out test rows the screen accepted (never trained on; rows the screen
quarantined are left out, with the trusted annotators' consensus labels where given).
``clean_accuracy_all_test`` also reports clean accuracy on every held-out row with its
label as given, quarantined rows included, and ``test_flagged_fraction`` the share of
held-out rows screening left out (so a gate can tell when screening lifted the figure).
Epsilons are on the [0, 1] input scale: the pixels of images, and for tables the features
after the run's preprocessing (each numeric column's training range mapped onto [0, 1];
``stages.data.preprocessing``).
Attacks (FGSM, PGD with restarts, AutoAttack's APGD-CE, APGD-DLR and APGD-T) run on every evaluated
row, or on a seeded sample of ``evaluate.attack_rows`` rows whose size is reported; the robust
accuracy at an epsilon, which the gate reads, is the per-row worst case over clean input and
every attack at that epsilon. Every attack runs at the epsilons a decision rests on (the
headline ``evaluate.epsilon`` and each epsilon of the gate's ``min_robust_accuracy``); the
curve's other points run ``evaluate.curve_attacks`` (``full_strength_epsilons``). Per-sample
results (``per_sample.npz``: which attacks each evaluated row survives) are kept for
comparison with the champion. Backdoors: a model-level scan
(trigger inversion, ``stages.ml.backdoor_scan``) on the evaluated rows gives
``backdoor_anomaly_index``, the gate's ``max_backdoor_anomaly`` check; a scan that cannot run
records its error and no metric, so that check fails closed. Privacy: the epsilon DP-SGD spent (when
``train.mode`` is ``dp``) and an empirical membership-inference audit (AUC and TPR at 1%
FPR, members = accepted training rows, non-members = the evaluated test rows).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from stages.core.errors import ValidationFailed
from stages.core.fanout import Mapper
from stages.core.params import Params
from stages.core.workspace import write_json
from stages.data.prepared import load_npz_bytes, parse_prepared
from stages.data.preprocessing import model_inputs
from stages.models.weights import load_model_bytes
from stages.runner import stage_main
from stages.trust.context import RunContext

STAGE = "evaluate"


def run(ctx: RunContext, params: Params, *, mapper: Mapper | None = None) -> dict[str, Any]:
    # torch: slow to import, kept off the command line's start
    from stages.ml.privacy import membership_inference_audit
    from stages.ml.robustness import applicable_attacks, evaluate_robustness, plot_robustness_curve
    from stages.ml.runtime import predict_logits

    files, manifest = ctx.dataset_bytes(where=STAGE)
    inputs = ctx.input_bytes("split", "weights", "model_config", "train_report", "preprocessing", where=STAGE)
    X, y, _, meta = parse_prepared(files)
    X = model_inputs(X, meta, json.loads(inputs["preprocessing"]))  # the spec fitted on the accepted training rows
    split = load_npz_bytes(inputs["split"])
    test_idx, accepted_idx, accepted_labels = split["test_idx"], split["accepted_idx"], split["accepted_labels"]
    eval_idx, eval_labels = split["eval_idx"], split["eval_labels"]
    if len(eval_idx) == 0:
        raise ValidationFailed("no held-out test row is left after screening: nothing to evaluate the model on")
    model = load_model_bytes(inputs["weights"], inputs["model_config"])
    ev = params.evaluate.for_kind(manifest.get("kind"))  # the epsilons for this kind of data
    attacks = applicable_attacks(ev.attacks, int(meta["num_classes"]))
    report = evaluate_robustness(model, X[eval_idx], eval_labels, epsilons=list(ev.epsilons), pgd_steps=ev.pgd_steps,
                                 restarts=ev.restarts, attacks=attacks, apgd_steps=ev.apgd_steps,
                                 sample=ev.attack_rows, seed=ev.seed, early_exit=ev.early_exit,
                                 full_strength=full_strength_epsilons(params, manifest.get("kind")),
                                 curve_attacks=curve_attacks(ev.curve_attacks, attacks), mapper=mapper)
    all_test = float((predict_logits(model, X[test_idx]).argmax(1) == y[test_idx]).mean())
    body: dict[str, Any] = {"data_sha256": manifest["merkle_root"], "data_kind": manifest.get("kind"), "n_test": int(len(eval_idx)),
                            "n_test_held_out": int(len(test_idx)),
                            "epsilon_scale": ("[0, 1] pixel scale" if X.ndim > 2 else
                                              "scaled features: a fraction of each numeric column's training range"),
                            "pgd_steps": ev.pgd_steps, "restarts": ev.restarts,
                            "attacks": report.attacks, "attacks_not_applicable": sorted(set(ev.attacks) - set(attacks)),
                            "apgd_steps": ev.apgd_steps, "n_attacked": report.n_attacked,
                            "robustness": report.to_dict()}
    metrics: dict[str, float] = {"clean_accuracy": float(report.clean_accuracy), "clean_accuracy_all_test": all_test,
                                 "attacked_rows": float(report.n_attacked),
                                 "test_flagged_fraction": 1.0 - len(eval_idx) / max(1, len(test_idx))}
    for eps in ev.epsilons:
        for name in report.attacks_at[eps]:
            metrics[f"{name}_accuracy_eps_{eps:g}"] = float(report.attack_accuracy[name][eps])
        metrics[f"robust_accuracy_eps_{eps:g}"] = float(report.robust_accuracy[eps])
    # Headline: a test row counts only if it is right clean and under every attack at that epsilon.
    metrics["robust_accuracy"] = metrics[f"robust_accuracy_eps_{ev.epsilon:g}"]
    privacy = json.loads(inputs["train_report"]).get("privacy")
    if privacy:
        metrics["dp_epsilon"] = float(privacy["epsilon_spent"])
    if ev.membership_inference:
        rng = np.random.default_rng(ev.seed)
        n = min(len(accepted_idx), len(eval_idx))
        members = rng.choice(len(accepted_idx), size=n, replace=False)
        mia = membership_inference_audit(model, X[accepted_idx[members]], accepted_labels[members], X[eval_idx], eval_labels,
                                         seed=ev.seed)
        body["membership_inference"] = mia
        metrics["mia_auc"] = float(mia["auc"])
        metrics["mia_tpr_at_1pct_fpr"] = float(mia["tpr_at_1pct_fpr"])
    if ev.backdoor_scan.enabled:
        body["backdoor_scan"] = _backdoor_scan(model, X[eval_idx], eval_labels, params)
        if "max_anomaly_index" in body["backdoor_scan"]:
            metrics["backdoor_anomaly_index"] = float(body["backdoor_scan"]["max_anomaly_index"])
    body["privacy"] = privacy
    body["metrics"] = metrics
    per_sample = ctx.path("evaluation", "per_sample.npz")
    np.savez(per_sample, eval_idx=eval_idx, correct=np.asarray(report.correct), columns=np.asarray(report.columns),
             attacked=np.asarray(report.attacked))
    curve = ctx.path("evaluation", "robustness_curve.png")
    plot_robustness_curve(report, curve)
    path = ctx.path("evaluation", "evaluation.json")
    write_json(path, body)
    ctx.record_outputs(STAGE, {"evaluation": path, "per_sample": per_sample, "robustness_curve": curve})
    ctx.log("evaluate.metrics", metrics)
    return {"metrics": metrics}


def full_strength_epsilons(params: Params, kind: str | None) -> list[float]:
    """The epsilons at which every attack of ``evaluate.attacks`` runs: the headline and each
    one the gate judges (``gate.min_robust_accuracy`` for this kind of data), of those
    evaluated. The gate refuses a robust figure measured anywhere else."""
    ev = params.evaluate.for_kind(kind)
    decided = {float(ev.epsilon), *(float(e) for e in params.gate.for_kind(kind).min_robust_accuracy)}
    return [float(e) for e in ev.epsilons if float(e) in decided]


def curve_attacks(chosen: list[str] | None, attacks: list[str]) -> list[str] | None:
    """The attacks run at the curve's other epsilons: those of ``evaluate.curve_attacks`` among
    the attacks run at all (``--set evaluate.attacks=[fgsm]`` leaves FGSM alone there too), all
    of them when none is, and ``None`` (every attack everywhere) when ``curve_attacks`` is null."""
    if not chosen:
        return None
    return [a for a in chosen if a in attacks] or list(attacks)


def _backdoor_scan(model: Any, X: np.ndarray, y: np.ndarray, params: Params) -> dict[str, Any]:
    """The scan's report, or ``{"error": ...}`` when it cannot run (the gate then fails closed)."""
    from stages.ml.backdoor_scan import scan_backdoor  # torch: slow to import

    scan = params.evaluate.backdoor_scan
    try:
        return scan_backdoor(model, X, y, steps=scan.steps, samples=scan.samples, success=scan.success, seed=params.evaluate.seed)
    except Exception as err:  # noqa: BLE001 - recorded; the gate counts a scan that could not run as failed
        return {"error": f"backdoor scan could not run: {type(err).__name__}: {err}"}


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
