"""Benchmark the hashing core against sha256sum, openssl and `dvc add`; print a Markdown table.

Datasets (built under a temporary folder in /tmp, removed at the end):
  * one file of ``--size-mb`` MiB;
  * ``--files`` files of ``--file-kb`` KiB each.
Every tool reads from a warm page cache (one untimed pass first); each timing is the best
of ``--repeat`` runs, tools interleaved, except `dvc add`, which runs once on a fresh repo
(its first add is what a user pays; a second add would hit DVC's own state cache).

The CPU-s column is user + system CPU time (threads and child processes included): unlike
wall time it does not move when other work shares the cores.

    python bench/hashing.py                       # full run: 1 GiB + 10,000 x 100 KiB
    python bench/hashing.py --size-mb 64 --files 500
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.trust.hashing import StatCache, hash_files, safe_files, sha256_file, verify_files  # noqa: E402

MiB = 1 << 20
DVC = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "dvc"


@dataclass
class Row:
    dataset: str
    tool: str
    workers: str
    seconds: float
    cpu_s: float
    nbytes: int


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    c0, t0 = _cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, _cpu() - c0


def _sh(cmd: str | list[str], **kw) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, shell=isinstance(cmd, str), **kw)


def make_data(repo: Path, *, size_mb: int, files: int, file_kb: int) -> tuple[Path, Path]:
    """Unique-content data: a random pool, each block/file stamped with its own counter."""
    big = repo / "big.bin"
    pool = os.urandom(8 * MiB)
    with open(big, "wb") as f:
        left = size_mb * MiB
        i = 0
        while left > 0:
            block = i.to_bytes(8, "little") + pool[8:]
            f.write(block[:left])
            left -= len(block)
            i += 1
    many = repo / "many"
    many.mkdir()
    n = file_kb * 1024
    for i in range(files):
        d = many / f"{i // 1000:02d}"
        d.mkdir(exist_ok=True)
        off = (i * 7919) % (len(pool) - n)
        (d / f"f{i:05d}.bin").write_bytes(i.to_bytes(8, "little") + pool[off + 8:off + n])
    return big, many


def best(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    runs = [_timed(fn) for _ in range(repeat)]
    return min(runs)


def bench(args: argparse.Namespace) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="mlsec-bench-", dir=args.dir))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1", "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site")}
    try:
        repo = tmp / "repo"
        repo.mkdir()
        big, many = make_data(repo, size_mb=args.size_mb, files=args.files, file_kb=args.file_kb)
        many_paths = [str(p) for p in safe_files(many)]
        sizes = {"big": big.stat().st_size, "many": sum(os.path.getsize(p) for p in many_paths)}
        labels = {"big": f"1 file x {args.size_mb} MiB", "many": f"{args.files:,} files x {args.file_kb} KiB"}
        hash_files(many_paths + [str(big)])  # warm the page cache

        openssl = shutil.which("openssl")
        tools: dict[str, dict[tuple[str, str], Callable[[], object]]] = {
            "big": {
                ("mlsec sha256_file", "1"): lambda: sha256_file(big),
                ("mlsec hash_files", "all"): lambda: hash_files([str(big)], workers=0),
                ("sha256sum", "1"): lambda: _sh(["sha256sum", str(big)]),
            },
            "many": {
                ("mlsec hash_files", "1"): lambda: hash_files(many_paths, workers=1),
                ("mlsec hash_files", "all"): lambda: hash_files(many_paths, workers=0),
                ("sha256sum (find | xargs)", "1"): lambda: _sh(f"find '{many}' -type f -print0 | xargs -0 sha256sum"),
            },
        }
        if openssl:
            tools["big"][("openssl dgst -sha256", "1")] = lambda: _sh([openssl, "dgst", "-sha256", str(big)])
            tools["many"][("openssl dgst (find | xargs)", "1")] = lambda: _sh(
                f"find '{many}' -type f -print0 | xargs -0 '{openssl}' dgst -sha256")

        results: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
        for _ in range(args.repeat):  # interleave tools so background load hits them alike
            for ds, fns in tools.items():
                for (tool, w), fn in fns.items():
                    results.setdefault((ds, tool, w), []).append(_timed(fn))
        rows = [Row(ds, tool, w, *min(runs), sizes[ds]) for (ds, tool, w), runs in results.items()]

        if not args.skip_dvc:
            _sh(["git", "init", "-q"], cwd=repo, env=env)
            _sh([str(DVC), "init", "-q"], cwd=repo, env=env)
            for ds, target in (("big", big.name), ("many", many.name)):
                t, c = _timed(lambda: _sh([str(DVC), "add", "-q", target], cwd=repo, env=env))
                rows.append(Row(ds, "dvc add (md5 + cache copy)", "1", t, c, sizes[ds]))

        # Re-verify with a warm stat cache. `dvc add` may have re-created the files: wait
        # until they are older than the racy window, or the cache (rightly) refuses them.
        digests = hash_files(many_paths)
        expected = {os.path.relpath(p, many): (d.sha256, d.size) for p, d in digests.items()}
        cache_path = tmp / "statcache.json"
        cache = StatCache(cache_path)
        newest = max(os.stat(p).st_ctime_ns for p in many_paths) / 1e9
        time.sleep(max(0.0, newest + cache.racy_ns / 1e9 + 0.1 - time.time()))
        first = verify_files(many, expected, cache=cache)
        cache.save()
        assert first.ok and first.rehashed == len(expected), first

        def reverify() -> None:
            res = verify_files(many, expected, cache=StatCache(cache_path))
            assert res.ok and res.rehashed == 0, (res.rehashed, res.mismatches[:3])

        t, c = best(reverify, args.repeat)
        rows.append(Row("many", "mlsec verify_files, warm stat cache (load + verify, 0 files read)", "1", t, c, 0))
        return render(rows, labels, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def render(rows: list[Row], labels: dict[str, str], args: argparse.Namespace) -> str:
    ref = {r.dataset: r.seconds for r in rows if r.tool.startswith("sha256sum")}
    dvc = {r.dataset: r.seconds for r in rows if r.tool.startswith("dvc add")}
    lines = ["| dataset | tool | workers | wall s | CPU s | MiB/s | vs sha256sum | vs dvc add |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mbs = f"{r.nbytes / MiB / r.seconds:,.0f}" if r.nbytes else "-"
        vs_sha = f"{ref[r.dataset] / r.seconds:.2f}x" if r.dataset in ref and r.nbytes else "-"
        vs_dvc = f"{dvc[r.dataset] / r.seconds:.2f}x" if r.dataset in dvc and r.nbytes else "-"
        lines.append(f"| {labels[r.dataset]} | {r.tool} | {r.workers} | {r.seconds:.3f} | {r.cpu_s:.2f} | {mbs} "
                     f"| {vs_sha} | {vs_dvc} |")

    def get(ds: str, tool: str, w: str) -> float:
        return next(r.seconds for r in rows if r.dataset == ds and r.tool.startswith(tool) and r.workers == w)

    checks = [
        ("one core >= 0.9x sha256sum (1 file)", ref["big"] / get("big", "mlsec sha256_file", "1"), 0.9),
        ("one core >= 0.9x sha256sum (many files)", ref["many"] / get("many", "mlsec hash_files", "1"), 0.9),
        ("all cores >= 1.6x sha256sum (many files)", ref["many"] / get("many", "mlsec hash_files", "all"), 1.6),
    ]
    if dvc:
        checks += [(f">= 5x faster than dvc add ({ds})", dvc[ds] / get(ds, "mlsec hash_files", "all"), 5.0)
                   for ds in ("big", "many")]
    scale = get("many", "mlsec hash_files", "1") / get("many", "mlsec hash_files", "all")
    reverify = get("many", "mlsec verify_files", "1")
    out = ["\n".join(lines), "", "| target | measured | met |", "|---|---:|---|"]
    out += [f"| {name} | {v:.2f}x | {'yes' if v >= goal else 'NO'} |" for name, v, goal in checks]
    out += [f"| re-verify {args.files:,} unchanged files < 0.2 s | {reverify:.3f} s | {'yes' if reverify < 0.2 else 'NO'} |",
            f"| (info) many files, all cores vs 1 worker | {scale:.2f}x | - |"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=1024, help="size of the one-file dataset, MiB")
    p.add_argument("--files", type=int, default=10_000, help="number of files in the many-files dataset")
    p.add_argument("--file-kb", type=int, default=100, help="size of each of those files, KiB")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per tool (best is kept)")
    p.add_argument("--dir", default="/tmp", help="where the temporary data folder goes")
    p.add_argument("--skip-dvc", action="store_true", help="leave out `dvc add`")
    args = p.parse_args(argv)
    ncpu = len(os.sched_getaffinity(0))
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    load0 = os.getloadavg()
    table = bench(args)
    load1 = os.getloadavg()
    print(f"## SHA-256 hashing benchmark\n\n{cpu}, {ncpu} cores; Python {platform.python_version()}, "
          f"{ssl.OPENSSL_VERSION}; load average {load0[0]:.2f} at start, {load1[0]:.2f} at end "
          f"(wall times are best of {args.repeat}; `dvc add` once).\n")
    print(table)


if __name__ == "__main__":
    main()
