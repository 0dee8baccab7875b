"""The prediction service under load and under attack, on loopback. Prints Markdown tables.

1. Throughput and latency: two ``mlsec serve`` subprocesses, one with telemetry, detectors and
   extraction detection off and one with them on, measured in alternating rounds (the
   machine is shared, so its load falls on both alike): a closed-loop load generator
   (``--clients`` threads) for throughput and latency at saturation, then one client at 20
   requests/s for the latency a request pays when the server is not saturated.
2. Input detector: PGD at eps 0.1 and 0.3 and uniform noise on the held-out rows the
   calibration did not use, false positives on clean held-out rows, and what an attacker
   who knows the detector achieves (``stages.monitoring.adaptive``).
3. Extraction: queries before a Jacobian-augmentation sweep is flagged (``mlsec drill
   extraction``'s campaign), and false alarms on normal clients sending real digits.

    python bench/serving.py [--workspace DIR] [--seconds 10] [--clients 4] [--normal-clients 20]

Without ``--workspace`` a throwaway workspace gets a champion from one pipeline run (quick
settings, MLflow on SQLite, the flow's own Prefect server).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUICK = ["train.epochs=10", "evaluate.pgd_steps=10", "evaluate.restarts=1", "screen.detectors=[label_issues]",
         "evaluate.membership_inference=false"]
# no membership audit in these quick runs, so the workspace's signed policy does not gate on it
# (the same change given with --set would be a weakened policy, never promoted automatically)
POLICY = ["gate.max_mia_auc=null"]
OFF = ["serving.telemetry.enabled=false", "serving.detectors.enabled=false", "serving.extraction.enabled=false"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workspace(path: str | None) -> Path:
    if path:
        return Path(path).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="mlsec-bench-serving-"))
    ws = tmp / "ws"
    ws.mkdir()
    import yaml

    from stages.core.params import apply_overrides

    raw = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), POLICY)
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    os.environ.update({"MLSEC_ROOT": str(ws), "MLSEC_KEY_DIR": str(tmp / "keys"), "PREFECT_HOME": str(tmp / "prefect")})
    os.environ.pop("PREFECT_API_URL", None)
    from stages.trust.provenance import init_repo

    init_repo(ws)
    os.chdir(ws)
    from flows.pipeline import secure_training

    summary = secure_training(overrides=QUICK)
    print(f"champion: {summary['model']['uri']} ({summary['status']})", file=sys.stderr)
    return ws


class Server:
    def __init__(self, ws: Path, overrides: list[str]):
        self.port = _port()
        args = [sys.executable, "-m", "flows.cli", "serve", "--port", str(self.port)]
        for o in overrides:
            args += ["--set", o]
        env = {**os.environ, "MLSEC_ROOT": str(ws)}
        self.proc = subprocess.Popen(args, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        import httpx

        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _load(url: str, key: str, X: np.ndarray, *, batch: int, clients: int, seconds: float) -> tuple[list[float], int]:
    """Closed-loop load for ``seconds``: (latencies in ms, non-200 answers)."""
    import httpx

    bodies = [json.dumps({"inputs": X[i:i + batch].reshape(batch, -1).tolist()}).encode()
              for i in range(0, len(X) - batch + 1, batch)]
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker(seed: int) -> None:
        mine, bad = [], 0
        with httpx.Client(headers={"Authorization": f"Bearer {key}", "content-type": "application/json"}) as http:
            i = seed
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = http.post(f"{url}/v1/predict", content=bodies[i % len(bodies)])
                mine.append((time.perf_counter() - t) * 1000)
                bad += r.status_code != 200
                i += 1
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=worker, args=(k * 7,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0]


def bench_latency(ws: Path, X: np.ndarray, *, seconds: float, clients: int, rounds: int = 6) -> None:
    """Both servers run at once and the rounds alternate, so a change in the machine's load
    (it is shared) falls on both modes alike."""
    from stages.monitoring.access import KeyStore

    store = KeyStore(ws / "serving" / "api-keys.json")
    key = store.add(f"bench-{os.getpid()}-{int(time.time())}", budget=10**9, rate="100000/second")
    servers = {"off": Server(ws, OFF), "on": Server(ws, ["serving.extraction.action=flag"])}
    print(f"\n## Throughput and latency (loopback, {clients} closed-loop clients, {seconds:g} s per case in {rounds} "
          "alternating rounds)\n")
    print("| monitoring | batch | requests/s | rows/s | p50 ms | p99 ms | non-200 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    results = {}
    try:
        for batch in (1, 32):
            for mode, server in servers.items():
                _load(server.url, key, X, batch=batch, clients=clients, seconds=1.0)        # warm-up
            lat: dict[str, list[float]] = {"off": [], "on": []}
            bad = {"off": 0, "on": 0}
            for _ in range(rounds):
                for mode, server in servers.items():
                    got, errors = _load(server.url, key, X, batch=batch, clients=clients, seconds=seconds / rounds)
                    lat[mode] += got
                    bad[mode] += errors
            for mode in ("off", "on"):
                arr = np.asarray(lat[mode])
                r = {"rps": len(arr) / seconds, "p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99))}
                results[(mode, batch)] = r
                print(f"| {mode} | {batch} | {r['rps']:.0f} | {r['rps'] * batch:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                      f"{bad[mode]} |", flush=True)
        paced = _paced(servers, key, X, rate=20.0, seconds=seconds)
    finally:
        for server in servers.values():
            server.stop()
    print("\n| batch | p50 added by telemetry + detectors (saturated) | p99 added (saturated) |")
    print("|---:|---:|---:|")
    for batch in (1, 32):
        off, on = results[("off", batch)], results[("on", batch)]
        print(f"| {batch} | {100 * (on['p50'] / off['p50'] - 1):+.0f}% | {100 * (on['p99'] / off['p99'] - 1):+.0f}% |")
    print(f"\nOne client at 20 requests/s (the server not saturated), {seconds:g} s per mode, alternating:\n")
    print("| batch | off p50 ms | on p50 ms | added | off p99 ms | on p99 ms | added |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch, (off, on) in paced.items():
        print(f"| {batch} | {off[0]:.2f} | {on[0]:.2f} | {100 * (on[0] / off[0] - 1):+.0f}% | {off[1]:.2f} | {on[1]:.2f} | "
              f"{100 * (on[1] / off[1] - 1):+.0f}% |")


def _paced(servers: dict, key: str, X: np.ndarray, *, rate: float, seconds: float, rounds: int = 6) -> dict:
    """Open loop: one request every 1/rate s from one client; (p50, p99) per mode and batch."""
    import httpx

    out = {}
    for batch in (1, 32):
        body = json.dumps({"inputs": X[:batch].reshape(batch, -1).tolist()}).encode()
        lat: dict[str, list[float]] = {"off": [], "on": []}
        with httpx.Client(headers={"Authorization": f"Bearer {key}", "content-type": "application/json"}) as http:
            for _ in range(rounds):
                for mode, server in servers.items():
                    stop = time.perf_counter() + seconds / rounds
                    while time.perf_counter() < stop:
                        t = time.perf_counter()
                        http.post(f"{server.url}/v1/predict", content=body)
                        lat[mode].append((time.perf_counter() - t) * 1000)
                        time.sleep(max(0.0, 1 / rate - (time.perf_counter() - t)))
        out[batch] = tuple((float(np.percentile(lat[m], 50)), float(np.percentile(lat[m], 99))) for m in ("off", "on"))
    return out


def bench_detector(ws: Path) -> None:
    import torch

    from stages.core.params import load_params
    from stages.core.workspace import Workspace
    from stages.ml.attacks import attack_pgd
    from stages.models.store import resolve
    from stages.models.verify import load_verified_model
    from stages.monitoring.adaptive import attack_detector_aware
    from stages.monitoring.detector import calibrate_detector
    from stages.monitoring.reference import served_reference

    params = load_params(ws / "params.yaml")
    name = params.project.name
    mv = resolve(Workspace(ws), f"{name}@champion")
    # the network behind the verified model's input handling: what the service serves and calibrates on
    model = load_verified_model(f"models:/{name}/{mv.version}").net
    cfg = model.mlsec_config
    ref = served_reference(Workspace(ws), model=name, run_id=mv.tags["mlsec.run_id"], weights_sha256=mv.tags["mlsec.weights_sha256"],
                           input_shape=tuple(cfg["input_shape"]), most_rows=params.serving.detectors.calibration_rows)
    det = calibrate_detector(model, X_train=ref.X_train, y_train=ref.y_train, X_held=ref.X_held, y_held=ref.y_held,
                             num_classes=cfg["num_classes"], epsilons=[0.1, 0.3], target_fpr=params.serving.detectors.target_fpr)
    r = det.report
    print(f"\n## Input detector (champion v{mv.version}; {r['measured_rows']} held-out rows not used by calibration)\n")
    print(f"False positives on clean held-out rows: **{r['false_positive_rate']:.1%}** (target {r['target_fpr']:.0%}); "
          f"uniform noise detected: {r['noise_detection_rate']:.1%}\n")
    print("| attack | eps | model fooled | detected | fooled and undetected |")
    print("|---|---:|---:|---:|---:|")
    for e in ("0.1", "0.3"):
        print(f"| PGD-10 (detector-blind) | {e} | {r['pgd_success_rate'][e]:.1%} | {r['pgd_detection_rate'][e]:.1%} | "
              f"{r['pgd_evasion_rate'][e]:.1%} |")
    rng = np.random.default_rng(5)
    pick = rng.choice(len(ref.X_held), size=min(200, len(ref.X_held)), replace=False)
    X, y = torch.from_numpy(ref.X_held[pick]), torch.from_numpy(ref.y_held[pick])
    gen = torch.Generator().manual_seed(0)
    for e in (0.1, 0.3):
        for attack, adv in (("PGD-50 (detector-blind)", attack_pgd(model, X, y, epsilon=e, alpha=2.5 * e / 50, steps=50, restarts=1,
                                                                    generator=gen)),
                            ("PGD-50 knowing the detector", attack_detector_aware(model, det, X, y, epsilon=e, steps=50,
                                                                                  generator=gen))):
            _, _, flagged = det.score(model, adv)
            with torch.no_grad():
                fooled = model(adv).argmax(1) != y
            print(f"| {attack} | {e:g} | {fooled.float().mean():.1%} | {flagged.float().mean():.1%} | "
                  f"{(fooled & ~flagged).float().mean():.1%} |")


def bench_extraction(ws: Path, *, normal_clients: int, queries: int) -> None:
    import torch

    from flows.drill import Target, drill_extraction
    from stages.core.params import load_params
    from stages.data.io import load_source
    from stages.models.verify import load_verified_model
    from stages.monitoring.access import KeyStore

    store = KeyStore(ws / "serving" / "api-keys.json")
    tag = f"{os.getpid()}-{int(time.time())}"
    admin = store.add(f"admin-{tag}", role="admin")
    d = load_source("sklearn:digits")
    X, y = d.X.astype(np.float32), d.y
    server = Server(ws, ["serving.extraction.action=flag", "serving.access.rate_limit=100000/second"])
    try:
        flagged_normal, w_seen = 0, []
        rng = np.random.default_rng(0)
        for c in range(normal_clients):
            key = store.add(f"normal{c}-{tag}", budget=10**9)
            target = Target(server.url, key, admin)
            idx = rng.choice(len(X), size=queries)
            for s in range(0, queries, 10):
                target.predict(X[idx[s:s + 10]])
            state = target.admin("/v1/admin/clients")["clients"][f"normal{c}-{tag}"]
            flagged_normal += state["flagged"]
            w_seen.append(state["w"])
        order = rng.permutation(len(X))
        seeds = np.concatenate([order[y[order] == k][:5] for k in range(10)])
        test = np.setdiff1d(order, seeds)[:500]
        champion = load_verified_model(f"{load_params(ws / 'params.yaml').project.name}@champion")
        with torch.no_grad():
            labels = champion(torch.from_numpy(X[test])).argmax(1).numpy()
        sweeps = []
        for run in range(3):
            key = store.add(f"sweep{run}-{tag}", budget=10**9)
            sweeps.append(drill_extraction(Target(server.url, key, admin), seeds=X[seeds], test=X[test], champion_labels=labels,
                                           client=f"sweep{run}-{tag}", max_queries=1000, step=0.1 + 0.05 * run))
    finally:
        server.stop()
    print(f"\n## Extraction detection (PRADA, delta {0.9}; action flag so the sweep runs to its end)\n")
    print(f"Normal clients (real digits, {queries} queries each): **{flagged_normal} of {normal_clients} flagged**; "
          f"Shapiro-Wilk W {min(w for w in w_seen if w is not None):.3f}-{max(w for w in w_seen if w is not None):.3f}\n")
    print("| sweep | step | queries before flagged | surrogate agreement with the champion (500 unseen digits) |")
    print("|---|---:|---:|---:|")
    for run, s in enumerate(sweeps):
        print(f"| Jacobian augmentation #{run + 1} | {0.1 + 0.05 * run:.2f} | {s['flagged_after_queries']} | "
              f"{s.get('surrogate_agreement', float('nan')):.1%} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", default=None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--normal-clients", type=int, default=20)
    parser.add_argument("--queries", type=int, default=500, help="queries per normal client")
    parser.add_argument("--only", choices=["latency", "detector", "extraction"], default=None)
    args = parser.parse_args()
    from stages.core.telemetry import telemetry_off

    telemetry_off()
    ws = _workspace(args.workspace)
    os.environ["MLSEC_ROOT"] = str(ws)
    from stages.data.io import load_source

    X = load_source("sklearn:digits").X.astype(np.float32)
    print(f"# bench/serving.py (load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)")
    if args.only in (None, "latency"):
        bench_latency(ws, X, seconds=args.seconds, clients=args.clients)
    if args.only in (None, "detector"):
        bench_detector(ws)
    if args.only in (None, "extraction"):
        bench_extraction(ws, normal_clients=args.normal_clients, queries=args.queries)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
