"""Fan-out of embarrassingly parallel work, and progress with the time left.

A pure core that has independent pieces of work (cross-validation folds, detectors, attacks
per epsilon and batch) takes a :class:`Mapper` and calls ``mapper(fn, items, label=...)``;
the answer is ``[fn(item) for item in items]``, in order, whatever runs it. The default,
:func:`serial_map`, runs them here one after another; the Prefect flow passes a mapper backed
by its task runner (local processes, or a Dask cluster), so the same core uses every core
or a cluster. ``fn`` must be a module-level function (or a ``functools.partial`` of one) of
picklable arguments, and must not rely on state set up in the caller's process (seeds,
thread counts): each item carries what it needs, so the results do not depend on where or
in which order the items ran.

Progress: a mapper reports each finished item to a :class:`Progress` (``done``, ``total``,
a note); :func:`eta_text` turns that into "3/7, about 2m10s left".
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Progress(Protocol):
    def __call__(self, label: str, done: int, total: int, note: str = "") -> None: ...


class Mapper(Protocol):
    def __call__(self, fn: Callable[[Any], Any], items: Sequence[Any], *, label: str) -> list[Any]: ...


def eta_text(done: int, total: int, elapsed_s: float) -> str:
    """``"3/7, about 2m10s left"`` from the items done so far and the time they took."""
    if done <= 0 or total <= 0:
        return f"{done}/{total}"
    left = elapsed_s / done * (total - done)
    if done >= total:
        return f"{done}/{total} in {_duration(elapsed_s)}"
    return f"{done}/{total}, about {_duration(left)} left"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class StderrProgress:
    """One line per finished item on stderr: ``[screen folds] 3/7, about 2m10s left (fold 2)``."""

    def __init__(self) -> None:
        self._started: dict[str, float] = {}

    def __call__(self, label: str, done: int, total: int, note: str = "") -> None:
        start = self._started.setdefault(label, time.monotonic())
        if done == 0:
            self._started[label] = time.monotonic()
            return
        suffix = f" ({note})" if note else ""
        print(f"[{label}] {eta_text(done, total, time.monotonic() - start)}{suffix}", file=sys.stderr, flush=True)


def serial_map(fn: Callable[[T], R], items: Sequence[T], *, label: str = "items", progress: Progress | None = None) -> list[R]:
    """``[fn(item) for item in items]``, here, in order (reporting each finished item)."""
    out = []
    if progress:
        progress(label, 0, len(items))
    for i, item in enumerate(items):
        out.append(fn(item))
        if progress:
            progress(label, i + 1, len(items))
    return out
