"""Wall time of the whole secured pipeline on digits, split by stage.

Runs the ``secure-training`` flow twice in one process in a throwaway workspace (git + DVC
+ MLflow on SQLite, the flow's own temporary Prefect server): the first run pays for the
server start and the imports, the second shows the steady state. Prints a Markdown table
with wall times and the CPU seconds the run took (this process and the short-lived
commands it started, such as git and DVC): on a shared machine CPU time moves much less
with other load than wall time does.

    python bench/pipeline.py [--set key=value ...] [--runs 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlsec-bench-"))
    os.environ.update({"MLSEC_ROOT": str(tmp / "ws"), "MLSEC_KEY_DIR": str(tmp / "keys"), "PREFECT_HOME": str(tmp / "prefect")})
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from stages.core.telemetry import telemetry_off

    telemetry_off()
    from stages.trust.provenance import init_repo

    (tmp / "ws").mkdir()
    shutil.copy(ROOT / "params.yaml", tmp / "ws" / "params.yaml")
    init_repo(tmp / "ws")
    os.chdir(tmp / "ws")
    t0 = time.perf_counter()
    from flows.pipeline import STAGES, secure_training

    import_s = time.perf_counter() - t0
    def cpu_seconds() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    rows = []
    for i in range(args.runs):
        start, cpu = time.perf_counter(), cpu_seconds()
        summary = secure_training(overrides=args.overrides)
        wall = time.perf_counter() - start
        rows.append((i + 1, summary["status"], summary["timings"], wall, cpu_seconds() - cpu))
    print(f"\nSecured pipeline on scikit-learn digits (1,797 images), {os.cpu_count()} cores; imports {import_s:.1f} s\n")
    print("| run | status | " + " | ".join(STAGES) + " | stages total | flow wall (incl. server, promotion) | CPU s |")
    print("|---|---|" + "---:|" * (len(STAGES) + 3))
    for n, status, t, wall, cpu in rows:
        print(f"| {n} | {status} | " + " | ".join(f"{t.get(s, float('nan')):.1f}" for s in STAGES)
              + f" | {sum(t.get(s, 0) for s in STAGES):.1f} | {wall:.1f} | {cpu:.1f} |")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
