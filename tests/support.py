"""Helpers the tests share (kept out of conftest.py, which pytest imports on its own)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The session's promoted digits run (``digits_champion`` in conftest.py), under the project's
# own policy: a short adversarial training, and the full attack set at its default strength
# on a seeded sample of 200 held-out rows (the honesty audit repeats those attacks).
CHAMPION_RUN = ["train.epochs=12", "evaluate.pgd_steps=10", "evaluate.restarts=1", "evaluate.attack_rows=200"]

# The short runs of the promotion, serving and playbook tests (``quick_champion`` in
# conftest.py is the first of them): what those tests check is the policy's decisions, the
# service and the playbooks, not the model's quality or the strength of the evaluation attacks.
QUICK_RUN = ["train.epochs=4", "evaluate.pgd_steps=5", "evaluate.restarts=1", "evaluate.apgd_steps=5",
             "screen.detectors=[label_issues]"]
# Their gate, approvers and reviewers, in the signed policy (a --set would be a weakening, never
# promoted automatically): a robustness floor these short runs reach, no regression check
# against the champion, the identities whose signed approvals count and those whose signed
# labels of a review queue count.
APPROVERS = ("alice", "bob", "carol")
REVIEWERS = ("rita", "sam")
QUICK_POLICY = ["gate.min_robust_accuracy={0.1: 0.05}", "gate.no_regression=null",
                f"promotion.approvers=[{', '.join(APPROVERS)}]", f"promotion.reviewers=[{', '.join(REVIEWERS)}]"]

# Short standard-mode runs on a few hundred digits rows (``small_digits``), for what is checked
# around the pipeline rather than in it: the real servers, the temporary server's logs.
STANDARD_RUN = ["train.mode=standard", "train.model=mlp", "train.epochs=15", "evaluate.pgd_steps=2", "evaluate.restarts=1",
                "evaluate.apgd_steps=5", "screen.folds=2", "screen.backdoor_epochs=1", "orchestration.heartbeat_s=30"]

# The honesty audits' gate (tests/test_honesty*.py), in the signed policy (a --set would be a
# weakening, never auto-promoted): the figures they check are measured whatever the gate says.
AUDIT_POLICY = ["gate.no_regression=null", "gate.max_mia_auc=null", "gate.min_robust_accuracy={}",
                "gate.min_clean_accuracy=0.5", "gate.min_clean_accuracy_all_test=0.5"]


def small_digits(path: Path, *, seed: int, n: int = 400) -> Path:
    """``n`` seeded rows of scikit-learn's digits as an NPZ at ``path`` (8x8 images)."""
    import numpy as np

    from stages.data.io import load_source

    d = load_source("sklearn:digits")
    idx = np.sort(np.random.default_rng(seed).choice(len(d.y), n, replace=False))
    np.savez(path, X=d.X[idx].reshape(n, 8, 8).astype(np.float32), y=d.y[idx])
    return path


def identity(name: str) -> str:
    """``name``, with an identity key in the session's key folder (created once)."""
    from stages.trust.identities import create_identity, identity_public

    if identity_public(name) is None:
        create_identity(name)
    return name


def sign_reviewers(root: Path, reviewers: list[str] | tuple[str, ...] = REVIEWERS):
    """Sign, as the policy owner, the workspace ``root``'s policy with ``reviewers`` as its
    reviewers (their keys created and pinned), the rest as it is signed (the project's
    params.yaml where nothing is signed yet); returns the ``SignedPolicy``."""
    import yaml

    from stages.core.workspace import Workspace
    from stages.trust.policy import load_signed_policy, sign_policy

    ws = Workspace(root)
    signed = load_signed_policy(ws)
    policy = signed.policy if signed else {k: v for k, v in yaml.safe_load((ROOT / "params.yaml").read_text()).items()
                                           if k in ("gate", "promotion")}
    policy["promotion"]["reviewers"] = [identity(n) for n in reviewers]
    return sign_policy(ws, policy, source="test")


def make_workspace(path: Path, params_text: str | None = None, *, policy: list[str] | tuple[str, ...] = ()) -> Path:
    """A pipeline workspace (git + DVC) with the project's params.yaml, or ``params_text``.

    ``policy``: ``key=value`` settings written into the committed params.yaml, so that the
    policy its first run signs (trust on first use) already has them. A test that lowers the
    gate for a short run does it here: the same value given with ``--set`` is a weakened
    policy, which is never promoted without signed approvals."""
    import yaml

    from stages.core.params import apply_overrides

    text = params_text if params_text is not None else (ROOT / "params.yaml").read_text()
    if policy:
        text = yaml.safe_dump(apply_overrides(yaml.safe_load(text), list(policy)), sort_keys=False)
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.yaml").write_text(text)
    from stages.trust.provenance import init_repo

    init_repo(path)
    return path


def copy_workspace(src: Path, dst: Path) -> Path:
    """A copy of the workspace ``src`` at ``dst`` that shares no store with it, for a test that
    changes what it finds (moves an alias, revokes, tampers) while others read ``src``.

    Git, the ledger, the signed records and DVC's cache live inside the folder and copy as
    they are. MLflow's SQLite store and DVC's remote name their folders by absolute path
    (artifact locations, model version sources, the remote's URL): those are pointed into the
    copy, so nothing done to the copy reaches ``src``'s artifacts."""
    import sqlite3

    src, dst = Path(src).resolve(), Path(dst)
    shutil.copytree(src, dst, symlinks=True)
    old, new = str(src) + "/", str(dst.resolve()) + "/"
    con = sqlite3.connect(dst / "mlflow.db")
    try:
        with con:
            tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                for column in [c[1] for c in con.execute(f'PRAGMA table_info("{table}")') if "CHAR" in c[2].upper()
                               or "TEXT" in c[2].upper()]:
                    con.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?) > 0',
                                (old, new, old))
        left = [(t, c[1]) for t in tables for c in con.execute(f'PRAGMA table_info("{t}")')
                if con.execute(f'SELECT count(*) FROM "{t}" WHERE instr(CAST("{c[1]}" AS TEXT), ?) > 0', (old,)).fetchone()[0]]
    finally:
        con.close()
    if left:
        raise AssertionError(f"{dst / 'mlflow.db'} still names {src} in {left}")
    config = dst / ".dvc" / "config"
    config.write_text(config.read_text().replace(old, new))
    return dst


@contextmanager
def inside(path: Path) -> Iterator[Path]:
    """Work in the workspace ``path`` as the command line does (``MLSEC_ROOT``, the working
    directory, MLflow in the workspace) for in-process flows and commands; restored after."""
    old = {k: os.environ.get(k) for k in ("MLSEC_ROOT", "MLFLOW_TRACKING_URI")}
    os.environ["MLSEC_ROOT"] = str(path)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    cwd = os.getcwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(cwd)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_quick_champion(path: Path) -> dict:
    """Version 1 on digits: a workspace under ``QUICK_POLICY`` (its approvers' and reviewers'
    identity keys created, so that first use pins them) and one ``QUICK_RUN`` triggered by
    alice, promoted; returns the run summary."""
    from flows.pipeline import secure_training

    for name in APPROVERS + REVIEWERS:
        identity(name)
    make_workspace(path, policy=QUICK_POLICY)
    with inside(path):
        summary = secure_training(overrides=QUICK_RUN + ["train.seed=1"], triggered_by="alice")
    assert summary["status"] == "promoted" and summary["model"]["version"] == "1", summary
    return summary


def run_cli(args: list[str], *, cwd: Path, env_extra: dict[str, str] | None = None, timeout: int = 600):
    """Run the installed ``mlsec`` command as a user would."""
    env = {**os.environ, "MLSEC_ROOT": str(cwd), **(env_extra or {})}
    exe = shutil.which("mlsec", path=str(Path(sys.executable).parent)) or "mlsec"
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def independent_robust_accuracy(model, X, y, *, epsilon: float) -> dict:
    """Per-row survival under torchattacks' PGD-50 x 10 restarts and AutoAttack (standard: APGD-CE,
    APGD-T, FAB-T, Square): what an auditor runs against a registered model, apart from the
    pipeline's own attack code."""
    import numpy as np
    import torch
    import torchattacks

    torch.manual_seed(0)
    pgd_ok = np.ones(len(X), dtype=bool)
    pgd = torchattacks.PGD(model, eps=epsilon, alpha=2.5 * epsilon / 50, steps=50, random_start=True)
    for _ in range(10):
        adv = pgd(X, y)
        with torch.no_grad():
            pgd_ok &= (model(adv).argmax(1) == y).numpy()
    aa_ok = autoattack_robust_accuracy(model, X, y, epsilon=epsilon)
    return {"pgd": pgd_ok & _clean(model, X, y), "autoattack": aa_ok}


def _clean(model, X, y):
    import torch

    with torch.no_grad():
        return (model(X).argmax(1) == y).numpy()


def autoattack_robust_accuracy(model, X, y, *, epsilon: float):
    """Per-row survival (right on clean input and under attack) under torchattacks' AutoAttack,
    standard version, seed 0."""
    import torch
    import torchattacks

    with torch.no_grad():
        classes = model(X[:1]).shape[1]
    auto = torchattacks.AutoAttack(model, norm="Linf", eps=epsilon, version="standard", n_classes=classes, seed=0)
    adv = auto(X, y)
    with torch.no_grad():
        return (model(adv).argmax(1) == y).numpy() & _clean(model, X, y)


def mlflow_run(ws, run_id: str):
    """The MLflow run of pipeline run ``run_id`` in workspace ``ws``, read from its tracking store."""
    import mlflow

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("mlsec-digits").experiment_id],
                              filter_string=f"tags.`mlsec.run_id` = '{run_id}'")
    assert len(runs) == 1
    return runs[0]


def mnist_folder() -> Path | None:
    """The MNIST IDX folder the benchmarks use (``MNIST_DIR``, or ``shared/data/mnist`` beside or
    above the project), or None: the MNIST tests skip without it, the project never needs it."""
    candidates = [Path(os.environ["MNIST_DIR"])] if os.environ.get("MNIST_DIR") else [
        ROOT.parent / "shared" / "data" / "mnist", ROOT.parents[1] / "shared" / "data" / "mnist"]
    return next((c for c in candidates if list(c.glob("train-images-idx3-ubyte*"))), None)


def briefly_trained_digits_model():
    """A cnn_small trained for 6 epochs on 600 digits (on one thread), and 200 held-out digits
    as tensors: (model, X, y)."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    from stages.core.params import TrainParams
    from stages.ml.training import fit

    digits = load_digits()
    X = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    params = TrainParams.model_validate({
        "mode": "standard", "epochs": 6, "batch_size": 64, "lr": 0.005, "device": "cpu", "seed": 0,
        "adversarial": {"epsilon": 0.1}, "dp": {}})
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = fit(X[:600], y[:600], params=params, num_classes=10, progress=False).model
    finally:
        torch.set_num_threads(previous)
    return model, torch.from_numpy(X[1000:1200]), torch.from_numpy(y[1000:1200])


TEST_CHECKPOINT_KEY = b"k" * 32  # a test's own seal key (the train stage derives the real one)


def sealed_store(folder: Path, run_id: str = "r1", key: bytes = TEST_CHECKPOINT_KEY):
    from stages.ml.training.checkpoints import CheckpointStore

    return CheckpointStore(folder, run_id=run_id, key=key)


def sealed_epoch(folder: Path, run_id: str = "r1") -> int:
    """The epoch of the sealed checkpoint in ``folder`` (read through its seal)."""
    import json
    import struct

    from stages.ml.training.checkpoints import MAGIC

    raw = (folder / "last.pt").read_bytes()
    (n,) = struct.unpack(">I", raw[len(MAGIC):len(MAGIC) + 4])
    return json.loads(raw[len(MAGIC) + 4:len(MAGIC) + 4 + n])["epoch"]


def apgd_ensemble_robust_accuracy(model, X, y, *, epsilon: float, restarts: int):
    """Per-row survival under torchattacks' APGD-CE, APGD-DLR and APGD-T (100 steps each, nine
    target classes), each with ``restarts`` random starts and run on the rows the ones before
    left standing: the pipeline's strongest attacks, called directly on a registered model with
    more restarts than the pipeline makes, to show that more effort would not find more."""
    import numpy as np
    import torch
    import torchattacks

    with torch.no_grad():
        logits = model(X)
    ok = (logits.argmax(1) == y).numpy()
    attacks = (torchattacks.APGD(model, norm="Linf", eps=epsilon, steps=100, n_restarts=restarts, loss="ce", seed=0),
               torchattacks.APGD(model, norm="Linf", eps=epsilon, steps=100, n_restarts=restarts, loss="dlr", seed=0),
               torchattacks.APGDT(model, norm="Linf", eps=epsilon, steps=100, n_restarts=restarts,
                                  n_classes=logits.shape[1], seed=0))
    for attack in attacks:
        rows = np.flatnonzero(ok)
        if len(rows) == 0:
            break
        adv = attack(X[rows], y[rows])
        with torch.no_grad():
            ok[rows] = (model(adv).argmax(1) == y[rows]).numpy()
    return ok


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited and not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
