"""Run-to-run honesty at MNIST's standard budget: a model trained and promoted by ``mlsec run``
on a 2,000-row MNIST subset (adversarial mode, PGD-5 training at epsilon 0.3) and attacked by
the pipeline as it attacks by default, on a seeded sample of held-out rows. Independent attacks
run against the registered model on those rows: torchattacks' AutoAttack (standard) and the
APGD-CE, APGD-DLR and APGD-T ensemble with 5 restarts where the pipeline makes 2. The logged
figure is never above what AutoAttack alone leaves standing, and the per-row worst case over
both is within 2 points of it: the logged figure is neither inflated nor short of what more
effort finds. (The digits audit, tests/test_honesty.py, adds PGD-50 x 10; here it never
came near: 0.49 and 0.50 on the models below, and it cost the test over a minute.) The
full-set figures are ``bench/train_mnist.py --full``'s (AutoAttack 0.911 against the
pipeline's 0.910). Skips without MNIST (``MNIST_DIR`` or ``shared/data/mnist`` beside the
project).

Why PGD training and not the default FGSM-RS: at epsilon 0.3 on 1,600 training rows, FGSM-RS
sits on the edge of catastrophic overfitting, and where it falls depends on the machine's
floating point: the collapse guard restored and switched to PGD-2 at epoch 7, leaving a model
that keeps 11% of the rows on one machine and 1% (clean accuracy 0.896) on another. Such a
model masks its gradients in part, and there AutoAttack's standard set (one restart) is not the
strongest attack: logged 0.11, AutoAttack 0.19, the APGD ensemble with 5 restarts 0.10. The
PGD-5 models of seeds 0 and 1 (clean 0.94): logged 0.43 and 0.40, the 5-restart ensemble 0.43
and 0.40, AutoAttack 0.47 and 0.42, PGD-50 x 10 0.49 and 0.50."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.support import AUDIT_POLICY, ROOT, apgd_ensemble_robust_accuracy, autoattack_robust_accuracy, make_workspace, mlflow_run, mnist_folder, run_cli

pytestmark = pytest.mark.slow

EPSILON = 0.3
ROWS = 2000
# a small subset's run: the default attacks at their default strength on 100 held-out rows; the
# screening and the audits this test does not check are cut to what the run needs; cnn_small
# rather than the default cnn_mnist keeps the independent attacks to about three minutes on a CPU
RUN = ["screen.detectors=[label_issues]", "train.model=cnn_small", "train.epochs=8",
       "train.adversarial.method=pgd", "train.adversarial.pgd_steps=5", f"train.adversarial.epsilon={EPSILON}",
       f"evaluate.epsilon={EPSILON}",
       f"evaluate.epsilons=[{EPSILON}]", "evaluate.attack_rows=100", "evaluate.membership_inference=false",
       "evaluate.backdoor_scan.enabled=false"]


@pytest.fixture(scope="module")
def mnist_subset(tmp_path_factory):
    import sys

    folder = mnist_folder()
    if folder is None:
        pytest.skip("MNIST not found (MNIST_DIR, or shared/data/mnist beside the project)")
    sys.path.insert(0, str(ROOT))
    from bench.train_mnist import load_mnist

    Xtr, ytr, _, _ = load_mnist(folder)
    rows = np.sort(np.random.default_rng(0).choice(len(Xtr), ROWS, replace=False))
    path = tmp_path_factory.mktemp("mnist") / "mnist_subset.npz"
    np.savez(path, X=Xtr[rows], y=ytr[rows])
    return path


@pytest.fixture(scope="module")
def promoted(tmp_path_factory, prefect_server, mnist_subset):
    # the backdoor scan is off in this run, so its gate check is off in the signed policy
    ws = make_workspace(tmp_path_factory.mktemp("honesty-mnist") / "ws",
                        policy=[*AUDIT_POLICY, "gate.max_backdoor_anomaly=null"])
    args = ["run", "--json", "--data", str(mnist_subset)]
    for item in RUN:
        args += ["--set", item]
    proc = run_cli(args, cwd=ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["status"] == "promoted", summary
    return ws, summary


def test_logged_robust_accuracy_on_mnist_matches_autoattack_and_a_stronger_apgd_ensemble(promoted, mnist_subset, monkeypatch):
    ws, summary = promoted
    monkeypatch.setenv("MLSEC_ROOT", str(ws))
    from stages.data.io import load_source
    from stages.models.verify import load_verified_model

    logged = mlflow_run(ws, summary["run_id"]).data.metrics  # where an auditor reads it
    assert logged["robust_accuracy"] == summary["metrics"]["robust_accuracy"]
    assert {f"{a}_accuracy_eps_{EPSILON:g}" for a in ("fgsm", "pgd", "apgd_ce", "apgd_dlr", "apgd_t")} <= set(logged)
    model = load_verified_model(summary["model"]["uri"])  # the registered, signature-checked model
    run_dir = ws / "runs" / summary["run_id"]
    with np.load(run_dir / "screen" / "split.npz") as split:
        eval_idx, eval_labels = split["eval_idx"], split["eval_labels"]
    with np.load(run_dir / "evaluation" / "per_sample.npz") as per_sample:
        attacked = per_sample["attacked"]
    X = torch.from_numpy(load_source(str(mnist_subset)).X[eval_idx[attacked]]).float()
    y = torch.from_numpy(eval_labels[attacked]).long()
    assert X.shape[1:] == (1, 28, 28) and logged["attacked_rows"] == len(X) == 100
    independent = {"autoattack": autoattack_robust_accuracy(model, X, y, epsilon=EPSILON),
                   "apgd x5": apgd_ensemble_robust_accuracy(model, X, y, epsilon=EPSILON, restarts=5)}
    independent["worst case"] = independent["autoattack"] & independent["apgd x5"]
    figures = {name: float(ok.mean()) for name, ok in independent.items()}
    print("logged robust accuracy", logged["robust_accuracy"], "independent", figures)
    # never inflated: at most what an auditor's AutoAttack alone leaves standing
    assert logged["robust_accuracy"] <= figures["autoattack"] + 0.005, (figures, logged)
    # nor short of what more effort finds: the per-row worst case over every independent attack,
    # the APGD ensemble with 2.5 times the pipeline's restarts among them, within 2 points
    assert abs(figures["worst case"] - logged["robust_accuracy"]) <= 0.02, (figures, logged["robust_accuracy"])
    # a model worth auditing: it learned MNIST and is neither collapsed nor trivially robust
    assert logged["clean_accuracy"] >= 0.9 and 0.05 <= logged["robust_accuracy"] <= 0.95, logged
