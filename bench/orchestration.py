"""What orchestration costs and what fan-out buys, as Markdown tables.

1. Overhead: ``mlsec run`` (the flow on its own temporary Prefect server) on digits and on a
   10,000-row MNIST sample (one epoch, FGSM and PGD): the flow's wall time (``timings.total``) and the process's wall
   time, each minus the stage functions' own time (the sum of the stages' ``seconds``).
2. Rerun on unchanged data: the same command again in the same workspace (screen, train and
   evaluate reused from the first run after their keys verify) against the first run.
3. Fan-out: screening (``screen_dataset``) and the robustness evaluation
   (``evaluate_robustness`` with the attacks of params.yaml, of a model trained one FGSM-RS
   epoch on the sample's training split) on the MNIST sample with 1 worker (serial), 2 local
   worker processes, and 2 threads; wall and CPU seconds (this process and its workers).
4. ``--full``: screening plus the evaluate stage's work (attacks, membership inference, the
   backdoor scan) on full MNIST (60,000 rows) with 2 workers, against 5 adversarial (FGSM-RS)
   training epochs on the same rows.

MNIST comes from ``../shared/data/mnist`` (or ``--mnist DIR``); without it only the digits
rows are printed. Comparisons of 1 and 2 workers mean nothing on a busy machine: the
load average is printed with each table.

    nice -n 10 python bench/orchestration.py [--rows 10000] [--full [--attack-rows N]] [--skip-runs] [--skip-fanout]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = ("ingest", "validate", "screen", "train", "evaluate", "gate", "register")
MLSEC = Path(sys.executable).parent / "mlsec"


def load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg()) + f" on {os.cpu_count()} cores"


def cpu_seconds() -> float:
    """CPU seconds of this process and of every process under it: the live ones (a pool's
    worker processes, read while they run) and those that have exited."""
    import psutil

    me = psutil.Process()
    mine = me.cpu_times()  # children_*: the exited (reaped) children
    total = mine.user + mine.system + mine.children_user + mine.children_system
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = child.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def trained_model(X: np.ndarray, y: np.ndarray):
    """One FGSM-RS epoch (params.yaml's adversarial settings) on the training split: a model
    whose evaluation costs what a real one does (an untrained one is fooled at once)."""
    from stages.core.params import load_params
    from stages.data.prepared import split_indices
    from stages.ml.training import fit

    params = load_params(ROOT / "params.yaml", ["train.epochs=1"])
    tr, te = split_indices(y, test_fraction=params.evaluate.test_fraction, seed=params.evaluate.seed)
    start, cpu = time.perf_counter(), cpu_seconds()
    model = fit(X[tr], y[tr], params=params.train, num_classes=10, progress=False).model
    return model, te, time.perf_counter() - start, cpu_seconds() - cpu


def mnist_sample(folder: Path, rows: int, out: Path) -> Path:
    from stages.data.io import load_source

    d = load_source(str(folder))
    idx = np.sort(np.random.default_rng(0).choice(len(d.y), rows, replace=False)) if rows < len(d.y) else np.arange(len(d.y))
    X = (d.X[idx] * 255).round().astype(np.uint8).reshape(len(idx), 28, 28)
    np.savez(out, X=X, y=d.y[idx])
    return out


def workspace(tmp: Path, name: str) -> Path:
    from stages.trust.provenance import init_repo

    ws = tmp / name
    ws.mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
    init_repo(ws)
    return ws


def cli_run(ws: Path, data: str | None, overrides: list[str]) -> tuple[dict, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env["MLSEC_ROOT"] = str(ws)
    args = [str(MLSEC), "run", "--json", *(["--data", data] if data else []), *[a for o in overrides for a in ("--set", o)]]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ws, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        raise SystemExit(f"mlsec run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout), wall


def overhead_rows(tmp: Path, mnist: Path | None, *, digits: bool = True) -> list[str]:
    cases = [("digits (1,797 rows)", None, [])] if digits else []
    if mnist is not None:
        cases.append((f"MNIST sample ({int(np.load(mnist)['y'].shape[0]):,} rows, 1 epoch)", str(mnist),
                      ["train.epochs=1", "train.model=cnn_small", "evaluate.attacks=[fgsm, pgd]"]))
    lines = ["| data | run | status | stages (s) | flow wall (s) | flow overhead | process wall (s) | process overhead | reused |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for name, data, overrides in cases:
        ws = workspace(tmp, name.split()[0])
        for run in ("first", "rerun"):
            summary, wall = cli_run(ws, data, overrides)
            stages = sum(summary["timings"].get(s, 0.0) for s in STAGES)
            flow = summary["timings"]["total"]
            lines.append(f"| {name} | {run} | {summary['status']} | {stages:.1f} | {flow:.1f} | "
                         f"{flow - stages:.1f} s ({(flow - stages) / flow:.1%}) | {wall:.1f} | "
                         f"{wall - stages:.1f} s ({(wall - stages) / wall:.1%}) | {', '.join(summary.get('cached', {})) or '-'} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def fanout_rows(mnist: Path, *, label: str, attacks: list[str] | None = None, threads: bool = True) -> list[str]:
    from concurrent.futures import wait

    from flows.fanout import TaskRunnerMapper, make_runner, running, start_workers
    from stages.core.params import OrchestrationParams, load_params
    from stages.evaluate import curve_attacks, full_strength_epsilons
    from stages.ml.robustness import evaluate_robustness
    from stages.screening import screen_dataset

    with np.load(mnist) as d:
        X = (d["X"].astype(np.float32) / 255.0)[:, None]
        y = d["y"].astype(np.int64)
    params = load_params(ROOT / "params.yaml")
    ev = params.evaluate
    attacks = attacks or list(ev.attacks)
    model, te, epoch_s, epoch_cpu = trained_model(X, y)
    lines = [f"One FGSM-RS epoch on the {len(y) - len(te):,} training rows: {epoch_s:.0f} s wall, {epoch_cpu:.0f} CPU s. "
             f"Evaluation: {', '.join(attacks)} at {full_strength_epsilons(params, 'image')}, "
             f"{', '.join(curve_attacks(ev.curve_attacks, attacks) or attacks)} at the rest of {ev.epsilons}, on the {len(te):,} held-out rows, early exit "
             f"{'on' if ev.early_exit else 'off'}.", "",
             f"| {label} | workers | screening (s) | CPU s | speed-up | evaluation (s) | CPU s | speed-up |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    base = {}
    runners = [("serial", None), ("2 processes", OrchestrationParams(task_runner="processes", workers=2))]
    runners += [("2 threads", OrchestrationParams(task_runner="threads", workers=2))] if threads else []
    for name, orch in runners:
        runner = make_runner(orch) if orch else None
        t = {}
        with contextlib.ExitStack() as stack:
            if runner is not None:
                # as a run does: the workers start with the run and are ready by its screen
                # (they start while ingest and validation run); here the clock waits for them
                runner = stack.enter_context(running(runner))
                wait(start_workers(runner))
            mapper = TaskRunnerMapper(runner) if runner is not None else None
            start, cpu = time.perf_counter(), cpu_seconds()
            screen_dataset(X, y, params=params.screen, mapper=mapper)
            t["screen"], t["screen_cpu"] = time.perf_counter() - start, cpu_seconds() - cpu
            start, cpu = time.perf_counter(), cpu_seconds()
            evaluate_robustness(model, X[te], y[te], epsilons=list(ev.epsilons), pgd_steps=ev.pgd_steps,
                                restarts=ev.restarts, attacks=attacks, apgd_steps=ev.apgd_steps, seed=ev.seed,
                                early_exit=ev.early_exit, full_strength=full_strength_epsilons(params, "image"),
                                curve_attacks=curve_attacks(ev.curve_attacks, attacks),
                                mapper=mapper)
            t["evaluate"] = time.perf_counter() - start
            t["evaluate_cpu"] = cpu_seconds() - cpu
        base = base or t
        lines.append(f"| {label} | {name} | {t['screen']:.1f} | {t['screen_cpu']:.0f} | {base['screen'] / t['screen']:.2f}x | "
                     f"{t['evaluate']:.1f} | {t['evaluate_cpu']:.0f} | {base['evaluate'] / t['evaluate']:.2f}x |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def full_rows(mnist_dir: Path, *, attack_rows: int | None = None) -> list[str]:
    """Screening and the evaluate stage's work (2 workers) on full MNIST against 5 FGSM-RS
    epochs: the attacks of params.yaml on a seeded sample of ``attack_rows`` test rows (None:
    params.yaml's ``evaluate.attack_rows``), the membership-inference audit and the backdoor
    scan, as ``stages.evaluate`` runs them."""
    from concurrent.futures import wait

    from flows.fanout import TaskRunnerMapper, make_runner, running, start_workers
    from stages.core.params import OrchestrationParams, load_params
    from stages.data.io import load_source
    from stages.data.prepared import split_indices
    from stages.evaluate import curve_attacks, full_strength_epsilons
    from stages.ml.backdoor_scan import scan_backdoor
    from stages.ml.privacy import membership_inference_audit
    from stages.ml.robustness import evaluate_robustness
    from stages.ml.training import fit
    from stages.screening import screen_dataset

    d = load_source(str(mnist_dir))
    params = load_params(ROOT / "params.yaml", ["train.epochs=1"] + ([f"evaluate.attack_rows={attack_rows}"] if attack_rows else []))
    ev = params.evaluate
    tr, te = split_indices(d.y, test_fraction=ev.test_fraction, seed=ev.seed)
    start = time.perf_counter()
    result = fit(d.X[tr], d.y[tr], params=params.train, num_classes=10)
    epoch = time.perf_counter() - start
    t: dict[str, float] = {}

    def done(part: str, what: str = "") -> None:
        # each part as it ends: the whole run takes an hour or more on two cores
        print(f"full MNIST, {part}: {t[part]:.0f} s ({t[part] / epoch:.1f} epochs of {epoch:.0f} s){what}", file=sys.stderr, flush=True)

    runner = make_runner(OrchestrationParams(task_runner="processes", workers=2))
    with running(runner):
        wait(start_workers(runner))  # started with the run, as in fanout_rows
        mapper = TaskRunnerMapper(runner)
        start = time.perf_counter()
        findings = screen_dataset(d.X, d.y, params=params.screen, mapper=mapper)
        t["screen"] = time.perf_counter() - start
        flagged = len({int(f["index"]) for f in findings.flags})
        done("screen", f", {flagged} rows flagged")
        start = time.perf_counter()
        report = evaluate_robustness(result.model, d.X[te], d.y[te], epsilons=list(ev.epsilons), pgd_steps=ev.pgd_steps,
                                     restarts=ev.restarts, attacks=list(ev.attacks), apgd_steps=ev.apgd_steps,
                                     sample=ev.attack_rows, seed=ev.seed, early_exit=ev.early_exit,
                                     full_strength=full_strength_epsilons(params, "image"), curve_attacks=curve_attacks(ev.curve_attacks, list(ev.attacks)),
                                     mapper=mapper)
        t["attacks"] = time.perf_counter() - start
        done("attacks")
        start = time.perf_counter()
        members = np.random.default_rng(ev.seed).choice(tr, size=min(len(tr), len(te)), replace=False)
        mia = membership_inference_audit(result.model, d.X[members], d.y[members], d.X[te], d.y[te], seed=ev.seed)
        t["mia"] = time.perf_counter() - start
        done("mia")
        start = time.perf_counter()
        scan = scan_backdoor(result.model, d.X[te], d.y[te], steps=ev.backdoor_scan.steps, samples=ev.backdoor_scan.samples,
                             success=ev.backdoor_scan.success, seed=ev.seed)
        t["scan"] = time.perf_counter() - start
        done("scan")
    evaluation = t["attacks"] + t["mia"] + t["scan"]
    total = t["screen"] + evaluation
    robust = ", ".join(f"{e:g}: {a:.3f}" for e, a in report.robust_accuracy.items())
    return ["| full MNIST (60,000 rows) | seconds | in adversarial epochs | result |", "|---|---:|---:|---|",
            f"| one FGSM-RS epoch | {epoch:.0f} | 1.0 | clean accuracy {report.clean_accuracy:.3f} |",
            f"| screening, 2 workers | {t['screen']:.0f} | {t['screen'] / epoch:.1f} | {flagged} rows flagged |",
            f"| attacks, 2 workers, {report.n_attacked:,} of {report.n_samples:,} test rows | {t['attacks']:.0f} | "
            f"{t['attacks'] / epoch:.1f} | robust accuracy {robust} |",
            f"| membership inference | {t['mia']:.0f} | {t['mia'] / epoch:.1f} | AUC {mia['auc']:.3f} |",
            f"| backdoor scan, in-process, {ev.backdoor_scan.steps} steps x 10 classes | {t['scan']:.0f} | {t['scan'] / epoch:.1f} | "
            f"largest anomaly index {scan['max_anomaly_index']:.2f} |",
            f"| evaluation in all | {evaluation:.0f} | {evaluation / epoch:.1f} | |",
            f"| screening + evaluation | {total:.0f} | {total / epoch:.1f} (target <= 5) | |"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # next to the checkout, or next to the folder of worktrees
    default = next((p for p in (ROOT.parent / "shared" / "data" / "mnist", ROOT.parents[1] / "shared" / "data" / "mnist")
                    if p.is_dir()), ROOT.parent / "shared" / "data" / "mnist")
    parser.add_argument("--mnist", default=str(default))
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--full", action="store_true", help="also screen and evaluate full MNIST (long)")
    parser.add_argument("--attack-rows", type=int, default=None,
                        help="--full: attack a seeded sample of this many test rows (evaluate.attack_rows; the gate "
                             "then judges the sample's lower confidence bound); default: params.yaml's")
    parser.add_argument("--skip-runs", action="store_true", help="only the fan-out tables")
    parser.add_argument("--skip-fanout", action="store_true", help="leave out the fan-out tables")
    parser.add_argument("--attacks", help="fan-out table: these attacks (comma-separated) instead of params.yaml's")
    parser.add_argument("--no-threads", action="store_true", help="fan-out table: leave out the 2-thread runner")
    parser.add_argument("--no-digits", action="store_true", help="leave out the digits runs")
    args = parser.parse_args()
    from stages.core.telemetry import telemetry_off

    telemetry_off()
    tmp = Path(tempfile.mkdtemp(prefix="mlsec-bench-orch-"))
    os.environ.setdefault("MLSEC_KEY_DIR", str(tmp / "keys"))
    mnist_dir = Path(args.mnist)
    mnist = mnist_sample(mnist_dir, args.rows, tmp / "mnist.npz") if mnist_dir.is_dir() else None
    stack = contextlib.ExitStack()
    try:
        if not args.skip_runs:
            print(f"\n## Orchestration overhead and reruns ({load()} at start)\n")
            print("\n".join(overhead_rows(tmp, mnist, digits=not args.no_digits)))
        if mnist is not None and (args.full or not args.skip_fanout) and not os.environ.get("PREFECT_API_URL"):
            # one server for the task runners, as 'mlsec run' does: without it every worker
            # process starts a temporary server of its own on one SQLite file
            from flows.server import temporary_server

            stack.enter_context(temporary_server(tmp / "prefect")).ready()
        if mnist is not None and not args.skip_fanout:
            print(f"\n## Fan-out on {args.rows:,} MNIST rows (evaluation on a fifth of them; {load()} at start)\n")
            print("\n".join(fanout_rows(mnist, label="MNIST sample", attacks=args.attacks and args.attacks.split(","),
                                         threads=not args.no_threads)))
        if mnist is not None and args.full:
            print(f"\n## Full MNIST ({load()} at start)\n")
            print("\n".join(full_rows(mnist_dir, attack_rows=args.attack_rows)))
        elif mnist is None:
            print(f"\n(no MNIST at {mnist_dir}: fan-out tables skipped)")
        print(f"\n{load()} at the end")
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
