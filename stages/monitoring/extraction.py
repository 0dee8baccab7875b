"""Model-extraction detection over each client's query stream.

PRADA (Juuti et al., 2019): for every query, the L2 distance to the nearest earlier query
of the same client that the model put in the same class. Natural inputs give distances that
are close to normally distributed; the synthetic queries of an extraction attack (small
steps around seed inputs, interpolations, sweeps) do not. Once a client has sent
``min_queries`` distances, a Shapiro-Wilk test runs on them, and a W statistic below
``delta`` flags the client. Noise sweeps, whose distances can look normal, are caught by the
second rule: a client whose recent queries the input detector mostly flags.

A query that repeats an earlier one of its class (distance zero, up to rounding) adds no
distance: it tells the client nothing it was not told, and a client that polls or retries a
few inputs would otherwise send a run of zeros that no normal distribution fits (measured: 100
repeats of four digits, two of one class, gave W 0.11 and a throttled client). A sweep gains
nothing from repeats either way: they are left out, so they neither count against it nor
dilute its distances.

Per-class sets grow only with queries farther than the class threshold (mean minus one
standard deviation of the distances that grew it), as in the paper, so memory grows with
the variety of a client's queries, not their count.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_DISTANCES = 2000          # most recent distances the normality test looks at (Shapiro-Wilk is exact up to 5000)
MAX_SET = 4000                # per class, queries kept for the distance search
# a batch is searched with one product against every class's set (other classes masked out)
# while batch rows x set rows x features stays under this; past it, class by class: measured
# crossover between 1.3 and 5 million on digits (64 features) and MNIST (784)
ONE_PRODUCT_WORK = 1_500_000
# a distance whose square is at most this share of (1 + the row's squared norm) is a repeat:
# far above the rounding of identical float32 rows (about 1e-13 of it), far below any change of
# one value by 1/255 (1.5e-5 of the squared distance)
REPEAT_TOLERANCE = 1e-10
OOD_WINDOW = 100              # recent queries over which the share flagged by the input detector is taken


class _Rows:
    """A growing (n, F) float32 array (doubling), so a distance search reads one block, with
    the rows' squared norms (float64) kept alongside so a search does not recompute them."""

    def __init__(self, features: int):
        self.data = np.empty((16, features), dtype=np.float32)
        self.sq = np.empty(16)
        self.n = 0

    def add(self, row: np.ndarray, sq: float) -> None:
        if self.n == len(self.data):
            self.data = np.concatenate([self.data, np.empty_like(self.data)])
            self.sq = np.concatenate([self.sq, np.empty_like(self.sq)])
        self.data[self.n] = row
        self.sq[self.n] = sq
        self.n += 1


class _Recent:
    """The most recent ``size`` values in a ring (float64): the normality test reads them as
    one array, without a copy (it sorts them, so their order does not matter)."""

    def __init__(self, size: int):
        self.data = np.empty(size)
        self.n = 0          # values held
        self.pos = 0        # where the next one goes

    def extend(self, values: list[float]) -> None:
        if len(values) == 1:
            self.data[self.pos] = values[0]
            self.pos = (self.pos + 1) % len(self.data)
            self.n = min(self.n + 1, len(self.data))
            return
        size = len(self.data)
        new = np.asarray(values[-size:], dtype=np.float64)
        head = min(len(new), size - self.pos)
        self.data[self.pos:self.pos + head] = new[:head]
        self.data[: len(new) - head] = new[head:]
        self.pos = (self.pos + len(new)) % size
        self.n = min(self.n + len(new), size)

    def __len__(self) -> int:
        return self.n

    def values(self) -> np.ndarray:
        return self.data[: self.n]


@dataclass
class ClientStream:
    queries: int = 0
    sets: dict[int, _Rows] = field(default_factory=dict)
    grown: dict[int, list] = field(default_factory=dict)   # class -> [count, sum, sum of squares, threshold]
    distances: _Recent = field(default_factory=lambda: _Recent(MAX_DISTANCES))
    recent_ood: deque = field(default_factory=lambda: deque(maxlen=OOD_WINDOW))
    ood_count: int = 0                  # True values in recent_ood
    w: float | None = None
    tested_at: int = 0                  # queries seen at the last normality test
    flagged_at: int | None = None       # queries seen when first flagged
    reason: str | None = None


class ExtractionDetector:
    """Per-client PRADA state; ``observe`` returns whether the client is flagged."""

    def __init__(self, *, min_queries: int, delta: float, ood_fraction: float, test_every: int = 10):
        self.min_queries = min_queries
        self.delta = delta
        self.ood_fraction = ood_fraction
        self.test_every = test_every
        self._streams: dict[str, ClientStream] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _threshold(grown: list[float]) -> float:
        """Mean minus one standard deviation of the distances that grew the class's set
        (``grown`` holds count, sum and sum of squares)."""
        n, total, squares = grown[:3]
        if not n:
            return 0.0
        mean = total / n
        return mean - math.sqrt(max(squares / n - mean * mean, 0.0))

    def observe(self, client: str, X: np.ndarray, labels: np.ndarray, ood: np.ndarray) -> bool:
        """Feed a batch of one client's queries (rows ``X`` (N, ...), predicted ``labels``,
        input-detector alarms ``ood``); True once the client is flagged (it stays flagged).

        Rows are taken in order, as if sent one by one (a client that batches its queries
        produces the same distances); the distances of a batch to the class sets and among its
        own rows come from matrix products, not a search per row.
        """
        flat = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
        labels_l = [int(v) for v in np.asarray(labels).tolist()]
        alarms = [bool(v) for v in np.asarray(ood).tolist()]
        with self._lock:
            s = self._streams.setdefault(client, ClientStream())
            to_set, rows, sq = self._batch_distances(s, flat, labels_l)
            # Python floats for the row loop. A row added to its class's set becomes a candidate for
            # the later rows of its class in the batch: their distances to it are taken then, one
            # product per added row, into ``nearer`` (few, once a client's sets exist; the whole
            # N x N product cost 1 ms of a 256-row pass)
            to_set_l, sq_l = to_set.tolist(), sq.tolist()
            lab = np.asarray(labels_l)
            nearer: np.ndarray | None = None      # per row, distance to the nearest earlier row of its class added here
            added: set[int] = set()              # classes with a row added to their set in this batch
            distances: list[float] = []
            # the share test needs at least this many alarms in the window; below it, it cannot fire
            ood_floor = self.ood_fraction * min(OOD_WINDOW, self.min_queries)
            for i, (label, alarm) in enumerate(zip(labels_l, alarms)):
                s.queries += 1
                if len(s.recent_ood) == s.recent_ood.maxlen:
                    s.ood_count -= s.recent_ood[0]
                s.recent_ood.append(alarm)
                s.ood_count += alarm
                members = s.sets.get(label)
                d = to_set_l[i]
                if label in added:
                    d = min(d, float(nearer[i]))
                if members is None:
                    s.sets[label] = members = _Rows(flat.shape[1])
                if members.n == 0:
                    members.add(flat[i], sq_l[i])
                    nearer = _candidate(nearer, rows, sq, lab, i)
                    added.add(label)
                else:
                    if d * d > REPEAT_TOLERANCE * (1.0 + sq_l[i]):
                        distances.append(d)
                    grown = s.grown.setdefault(label, [0, 0.0, 0.0, 0.0])
                    if d > grown[3] and members.n < MAX_SET:
                        members.add(flat[i], sq_l[i])
                        nearer = _candidate(nearer, rows, sq, lab, i)
                        added.add(label)
                        grown[0] += 1
                        grown[1] += d
                        grown[2] += d * d
                        grown[3] = self._threshold(grown)
                if s.flagged_at is None and s.ood_count >= ood_floor:
                    self._test_ood(s)
            s.distances.extend(distances)
            if s.flagged_at is None:
                self._test_prada(s)                  # once per batch: Shapiro-Wilk is the costly part
            return s.flagged_at is not None

    @staticmethod
    def _batch_distances(s: ClientStream, flat: np.ndarray, labels: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distance of each row to its class set as it was before the batch (inf if empty),
        the rows as float64 (N x F), their squared norms (N)).

        While the batch and the sets of its classes are small, one product against all of them
        (rows of other classes masked out) replaces one per class: on 32-row digits batches the
        per-class calls cost more than the arithmetic (measured: 0.25 ms of a 0.33 ms batch).
        Larger ones are searched class by class, so the work stays proportional to the sets."""
        rows = flat.astype(np.float64)
        sq = np.einsum("ij,ij->i", rows, rows)
        to_set = np.full(len(rows), np.inf)
        present = set(labels)
        sets = [(label, s.sets[label]) for label in sorted(present) if label in s.sets and s.sets[label].n]
        if not sets:
            return to_set, rows, sq
        lab = np.asarray(labels) if len(present) > 1 else None
        if len(sets) > 1 and len(rows) * sum(m.n for _, m in sets) * rows.shape[1] <= ONE_PRODUCT_WORK:
            block = np.concatenate([m.data[: m.n] for _, m in sets]).astype(np.float64)
            block_sq = np.concatenate([m.sq[: m.n] for _, m in sets])
            block_lab = np.repeat([label for label, _ in sets], [m.n for _, m in sets])
            d2 = sq[:, None] + block_sq[None, :] - 2 * rows @ block.T
            d2[lab[:, None] != block_lab[None, :]] = np.inf
            return np.sqrt(np.maximum(d2.min(axis=1), 0.0)), rows, sq
        for label, members in sets:
            idx = slice(None) if lab is None else np.flatnonzero(lab == label)
            block = members.data[: members.n].astype(np.float64)
            d2 = sq[idx, None] + members.sq[None, : members.n] - 2 * rows[idx] @ block.T
            to_set[idx] = np.sqrt(np.maximum(d2, 0.0).min(axis=1))
        return to_set, rows, sq

    def _test_ood(self, s: ClientStream) -> None:
        if len(s.recent_ood) >= min(OOD_WINDOW, self.min_queries) and s.ood_count / len(s.recent_ood) >= self.ood_fraction:
            s.flagged_at = s.queries
            s.reason = f"{s.ood_count} of the last {len(s.recent_ood)} queries were flagged by the input detector"

    def _test_prada(self, s: ClientStream) -> None:
        if len(s.distances) < self.min_queries or s.queries - s.tested_at < self.test_every:
            return
        s.tested_at = s.queries
        s.w = shapiro_w(s.distances.values())
        if s.w < self.delta:
            s.flagged_at, s.reason = s.queries, f"query distances are not normal (Shapiro-Wilk W {s.w:.3f} < {self.delta})"

    def state(self, client: str) -> dict[str, Any]:
        with self._lock:
            s = self._streams.get(client)
            if s is None:
                return {"queries": 0, "flagged": False}
            return {"queries": s.queries, "flagged": s.flagged_at is not None, "flagged_at": s.flagged_at,
                    "reason": s.reason, "w": None if s.w is None else round(s.w, 4),
                    "ood_share": round(s.ood_count / len(s.recent_ood), 4) if s.recent_ood else 0.0}

    def clients(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            names = list(self._streams)
        return {n: self.state(n) for n in names}


def _candidate(nearer: np.ndarray | None, rows: np.ndarray, sq: np.ndarray, labels: np.ndarray, i: int) -> np.ndarray:
    """``nearer`` (per row of the batch, the distance to the nearest earlier row of its class
    added to the sets in this batch) once row ``i`` is added: the later rows of its class take
    their distance to it where it is nearer."""
    if nearer is None:
        nearer = np.full(len(rows), np.inf)
    later = i + 1 + np.flatnonzero(labels[i + 1:] == labels[i])
    if len(later):
        d = np.sqrt(np.maximum(sq[later] + sq[i] - 2 * (rows[later] @ rows[i]), 0.0))
        nearer[later] = np.minimum(nearer[later], d)
    return nearer


# Royston (1995, algorithm AS R94) polynomial corrections of the two largest coefficients
_C1 = (0.0, 0.221157, -0.147981, -2.071190, 4.434685, -2.706056)
_C2 = (0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633)


@functools.lru_cache(maxsize=8)
def _shapiro_coefficients(n: int) -> np.ndarray:
    """Shapiro-Wilk coefficients for ``n`` sorted values, centred and scaled to unit norm, so
    that W is the squared correlation of the sorted sample with them (as in SciPy's ``swilk``).
    Cached: once a client has ``MAX_DISTANCES`` distances every test uses the same ``n``."""
    from scipy.special import ndtri  # SciPy: slow to import, only the test needs it

    half = n // 2
    if n == 3:
        a = np.array([math.sqrt(0.5)])
    else:
        m = ndtri((np.arange(1, half + 1) - 0.375) / (n + 0.25))       # lower-half normal scores (negative)
        summ2, rsn = 2.0 * float(m @ m), 1.0 / math.sqrt(n)
        a1 = sum(c * rsn**k for k, c in enumerate(_C1)) - m[0] / math.sqrt(summ2)
        if n > 5:
            a2 = sum(c * rsn**k for k, c in enumerate(_C2)) - m[1] / math.sqrt(summ2)
            a = -m / math.sqrt((summ2 - 2 * m[0] ** 2 - 2 * m[1] ** 2) / (1 - 2 * a1**2 - 2 * a2**2))
            a[0], a[1] = a1, a2
        else:
            a = -m / math.sqrt((summ2 - 2 * m[0] ** 2) / (1 - 2 * a1**2))
            a[0] = a1
    full = np.zeros(n)
    full[:half], full[n - half:] = -a, a[::-1]
    full -= full.mean()
    full /= math.sqrt(float(full @ full))
    full.flags.writeable = False
    return full


def shapiro_w(distances: np.ndarray) -> float:
    """Shapiro-Wilk W of the distances (1.0 for a constant sample: nothing to judge).

    The statistic of ``scipy.stats.shapiro`` (equal to about 1e-9, from its normal quantile
    approximation) without its per-call overhead and with the coefficients cached per sample
    size: ``scipy.stats.shapiro`` took 0.3 ms for 2,000 distances, most of it argument
    handling, and the test runs after every batch of a client's queries.
    """
    x = np.sort(np.asarray(distances, dtype=np.float64))
    if len(x) < 3 or float(x[-1] - x[0]) == 0.0:
        return 1.0
    centred = x - x.mean()
    w = float(_shapiro_coefficients(len(x)) @ centred) ** 2 / float(centred @ centred)
    return w if math.isfinite(w) else 1.0
