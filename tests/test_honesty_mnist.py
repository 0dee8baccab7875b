"""Run-to-run honesty at MNIST's standard budget: a model trained and promoted by ``mlsec run``
on a 2,000-row MNIST subset (adversarial mode, FGSM-RS at epsilon 0.3) and attacked by the
pipeline as it attacks by default, on a seeded sample of held-out rows. An independent PGD-50
with 10 restarts and AutoAttack (standard, torchattacks) run against the registered model on
those rows: AutoAttack, and the per-row worst case over both, agree with the robust accuracy
logged in MLflow within 2 points, and no independent attack leaves fewer rows standing than
the logged figure. The full-set figures are ``bench/train_mnist.py --full``'s (AutoAttack 0.911
against the pipeline's 0.910). Skips without MNIST (``MNIST_DIR`` or ``shared/data/mnist``
beside the project).

A model trained on so few rows keeps about a fifth of them at 0.3, and there the agreement
depends on the subset: on this one, logged 0.17 and AutoAttack 0.18; on a 1,500-row subset
screened with 3 folds, 0.17 and 0.24 (the pipeline's larger attack set, each attack on the
rows the ones before left, found more than AutoAttack's four). At epsilon 0.1 the same
1,500-row model agreed within a point (0.83 logged, 0.84 AutoAttack) but the test took 400 s
under ``make test``, against about 190 s for this one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.support import AUDIT_POLICY, ROOT, independent_robust_accuracy, make_workspace, mlflow_run, mnist_folder, run_cli

pytestmark = pytest.mark.slow

EPSILON = 0.3
ROWS = 2000
# a small subset's run: the default attacks at their default strength on 100 held-out rows; the
# screening and the audits this test does not check are cut to what the run needs; cnn_small
# rather than the default cnn_mnist keeps the independent attacks to a minute or two on a CPU
RUN = ["screen.detectors=[label_issues]", "train.model=cnn_small", "train.epochs=8",
       f"train.adversarial.epsilon={EPSILON}", "train.adversarial.guard_rows=128", f"evaluate.epsilon={EPSILON}",
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


def test_logged_robust_accuracy_on_mnist_matches_independent_pgd_and_autoattack(promoted, mnist_subset, monkeypatch):
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
    independent = independent_robust_accuracy(model, X, y, epsilon=EPSILON)
    independent["worst case"] = independent["pgd"] & independent["autoattack"]
    figures = {name: float(ok.mean()) for name, ok in independent.items()}
    print("logged robust accuracy", logged["robust_accuracy"], "independent", figures)
    # the auditor's figure is AutoAttack, and the worst case per row over both independent runs
    for name in ("autoattack", "worst case"):
        assert abs(figures[name] - logged["robust_accuracy"]) <= 0.02, (name, figures, logged["robust_accuracy"])
    # a per-row worst case: never above what any one independent attack leaves standing (PGD-50 x 10
    # alone finds fewer rows than the APGD attacks on such a model: 26% standing against 17%)
    assert logged["robust_accuracy"] <= min(figures.values()) + 0.005, (figures, logged["robust_accuracy"])
    # a model worth auditing: it learned MNIST and is neither collapsed nor trivially robust
    assert logged["clean_accuracy"] >= 0.9 and 0.05 <= logged["robust_accuracy"] <= 0.95, logged
