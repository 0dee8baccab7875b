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
a note); :func:`eta_text` turns that into "3/7, about 2m10s left". Other long loops (the
training epochs) report to the same protocol, so the flow shows them the same way.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Progress(Protocol):
    """Called with ``done == first`` when a piece of work starts (``first`` is 0, or what a
    resumed loop already had), then after each finished item; ``done`` may go back (a loop
    that restores an earlier state), which starts the clock again from there."""

    def __call__(self, label: str, done: int, total: int, note: str = "") -> None: ...


class Mapper(Protocol):
    def __call__(self, fn: Callable[[Any], Any], items: Sequence[Any], *, label: str) -> list[Any]: ...


def eta_text(done: int, total: int, elapsed_s: float, *, first: int = 0) -> str:
    """``"3/7, about 2m10s left"`` from the items done so far and the time they took.

    ``first`` items were done before the clock started (a resumed loop): the time left is
    extrapolated from the ``done - first`` items timed.
    """
    if done <= first or total <= 0:
        return f"{done}/{total}"
    left = elapsed_s / (done - first) * (total - done)
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


class Clock:
    """When each named piece of work started and how many items it had then, for the time
    left of a :class:`Progress` call. A first call, a call with 0 done or one that goes back
    starts the clock again."""

    def __init__(self) -> None:
        self._start: dict[str, tuple[float, int]] = {}
        self._last: dict[str, int] = {}

    def text(self, label: str, done: int, total: int) -> str:
        """``"3/7, about 2m10s left"`` for ``label`` now."""
        if label not in self._start or done == 0 or done < self._last[label]:
            self._start[label] = (time.monotonic(), done)
        self._last[label] = done
        started, first = self._start[label]
        return eta_text(done, total, time.monotonic() - started, first=first)


class StderrProgress:
    """One line per report on stderr: ``[epochs] 3/7, about 2m10s left (standard: loss 0.41)``."""

    def __init__(self) -> None:
        self._clock = Clock()

    def __call__(self, label: str, done: int, total: int, note: str = "") -> None:
        text = self._clock.text(label, done, total)
        if done or note:
            print(f"[{label}] {text}" + (f" ({note})" if note else ""), file=sys.stderr, flush=True)


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
