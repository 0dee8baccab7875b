"""Robustness evaluation: accuracy under each registered attack at each epsilon, the per-row
worst case over them, and the robustness curve. Epsilons are L-inf budgets on the [0, 1] input
scale. Pure functions of a model and arrays, except ``plot_robustness_curve`` which writes one PNG.

Attacks by name (``evaluate.attacks``): ``fgsm``; ``pgd`` (``pgd_steps`` steps of
``2.5 * epsilon / pgd_steps`` from ``restarts`` random starts); ``apgd_ce``, ``apgd_dlr`` and
``apgd_t`` (AutoAttack's APGD with ``apgd_steps`` iterations, from torchattacks; ``apgd_t``
once per target class). A row counts as robust
at an epsilon only when it is right on clean input and under every attack run at that epsilon.

Every attack runs at the epsilons a decision rests on (``full_strength``: the headline and
the gate's); the other points of the curve may run a cheaper subset (``curve_attacks``), and
the report says which attacks ran where (``attacks_at``). With early exit the rows a cheap
attack leaves standing at a smaller epsilon still meet every attack at the larger one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from stages.core.errors import InvalidInput, PipelineError
from stages.core.fanout import Mapper
from stages.ml.attacks import attack_fgsm, attack_pgd
from stages.ml.autoattack import MIN_CLASSES, attack_apgd_ce, attack_apgd_dlr, attack_apgd_t
from stages.ml.runtime import check_eval_inputs, eval_mode, small_model_threads


@dataclass(frozen=True)
class AttackBudget:
    """How hard the iterative attacks try; epsilons come separately, per column."""
    pgd_steps: int
    restarts: int
    apgd_steps: int = 100
    seed: int = 0


# name -> how evaluation calls the attack at one epsilon (a name-keyed registry; pure functions)
EvalAttack = Callable[[nn.Module, Tensor, Tensor, float, AttackBudget, torch.Generator], Tensor]
EVAL_ATTACKS: dict[str, EvalAttack] = {
    "fgsm": lambda m, X, y, eps, b, g: attack_fgsm(m, X, y, epsilon=eps),
    "pgd": lambda m, X, y, eps, b, g: attack_pgd(m, X, y, epsilon=eps, alpha=2.5 * eps / b.pgd_steps,
                                                 steps=b.pgd_steps, restarts=b.restarts, random_start=True,
                                                 generator=g),
    "apgd_ce": lambda m, X, y, eps, b, g: attack_apgd_ce(m, X, y, epsilon=eps, steps=b.apgd_steps, seed=b.seed),
    "apgd_dlr": lambda m, X, y, eps, b, g: attack_apgd_dlr(m, X, y, epsilon=eps, steps=b.apgd_steps, seed=b.seed),
    "apgd_t": lambda m, X, y, eps, b, g: attack_apgd_t(m, X, y, epsilon=eps, steps=b.apgd_steps, seed=b.seed),
}


def check_attack_names(names: list[str]) -> list[str]:
    """The names, in order and without repeats; unknown names raise ``InvalidInput``."""
    unknown = [n for n in names if n not in EVAL_ATTACKS]
    if unknown or not names:
        raise InvalidInput(f"evaluate.attacks must be a non-empty list of {sorted(EVAL_ATTACKS)}, got {names!r}")
    return list(dict.fromkeys(names))


def applicable_attacks(names: list[str], num_classes: int) -> list[str]:
    """The attacks of ``names`` defined for ``num_classes`` classes: the DLR losses read the top
    three (APGD-T: four) logits, so they are left out on fewer (APGD-CE runs there)."""
    return [n for n in names if int(num_classes) >= MIN_CLASSES.get(n, 2)]


@dataclass(frozen=True)
class RobustnessReport:
    """Accuracies on clean inputs and under attack, per epsilon (on the [0, 1] input scale).

    ``correct`` is an N x len(columns) boolean matrix: column ``"clean"``, then
    ``"<attack>@<eps>"`` for each epsilon and each attack. ``attacked`` marks the rows the
    attacks ran on (all rows, or a seeded sample of ``sample`` rows); attack accuracies and
    ``robust_accuracy[eps]`` are over those rows, and a row counts as robust only when it is
    right on clean input and under every attack at that epsilon (the per-row worst case).
    """

    clean_accuracy: float
    epsilons: list[float]
    attacks: list[str]
    attack_accuracy: dict[str, dict[float, float]]
    robust_accuracy: dict[float, float]
    correct: np.ndarray
    attacked: np.ndarray
    columns: list[str]
    budget: AttackBudget
    n_samples: int = field(default=0)
    early_exit: bool = False
    # epsilon -> the attacks run there (every attack at the full-strength epsilons)
    attacks_at: dict[float, list[str]] = field(default_factory=dict)

    @property
    def full_strength_epsilons(self) -> list[float]:
        """The epsilons at which every attack of ``attacks`` ran."""
        return [e for e in self.epsilons if self.attacks_at.get(e, self.attacks) == self.attacks]

    @property
    def n_attacked(self) -> int:
        return int(self.attacked.sum())

    @property
    def fgsm_accuracy(self) -> dict[float, float]:
        return self.attack_accuracy.get("fgsm", {})

    @property
    def pgd_accuracy(self) -> dict[float, float]:
        return self.attack_accuracy.get("pgd", {})

    @property
    def pgd_steps(self) -> int:
        return self.budget.pgd_steps

    @property
    def restarts(self) -> int:
        return self.budget.restarts

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; epsilon keys become strings such as ``"0.1"``."""
        keyed = lambda d: {str(float(k)): float(v) for k, v in d.items()}  # noqa: E731
        return {"clean_accuracy": float(self.clean_accuracy), "epsilons": [float(e) for e in self.epsilons],
                "attacks": list(self.attacks),
                "attack_accuracy": {a: keyed(v) for a, v in self.attack_accuracy.items()},
                "fgsm_accuracy": keyed(self.fgsm_accuracy), "pgd_accuracy": keyed(self.pgd_accuracy),
                "robust_accuracy": keyed(self.robust_accuracy), "columns": list(self.columns),
                "attacks_at": {str(float(e)): list(self.attacks_at.get(e, self.attacks)) for e in self.epsilons},
                "full_strength_epsilons": [float(e) for e in self.full_strength_epsilons],
                "pgd_steps": self.budget.pgd_steps, "pgd_alpha": "2.5 * epsilon / pgd_steps",
                "restarts": self.budget.restarts, "apgd_steps": self.budget.apgd_steps, "seed": self.budget.seed,
                "n_samples": self.n_samples, "n_attacked": self.n_attacked,
                "robust_accuracy_is": "per-row worst case over clean and every attack at that epsilon"
                                      + (" and the smaller ones" if self.early_exit else ""),
                "attack_accuracy_is": ("cumulative: right on clean input, under this attack and every attack before "
                                       "it at this epsilon and at the smaller epsilons (attacks skip rows already lost)"
                                       if self.early_exit else "each attack alone, on every attacked row"),
                "epsilon_scale": "[0, 1] input scale"}


def _check_in_ball(name: str, adv: Tensor, X: Tensor, epsilon: float) -> None:
    """An attack that leaves the epsilon ball or [0, 1] would report figures nobody asked for."""
    gap = float((adv - X).abs().max()) if len(X) else 0.0
    if adv.shape != X.shape or gap > epsilon + 1e-5 or float(adv.min()) < 0 or float(adv.max()) > 1:
        raise PipelineError(f"attack {name} returned inputs outside the epsilon {epsilon:g} ball or [0, 1] "
                            f"(max change {gap:g}); refusing its figures")


def _sample_rows(n: int, sample: int | None, seed: int) -> np.ndarray:
    """Boolean mask of the rows attacked: all, or ``sample`` rows drawn without replacement."""
    mask = np.zeros(n, dtype=bool)
    if sample is None or sample >= n:
        mask[:] = True
    else:
        mask[np.random.default_rng(seed).choice(n, size=sample, replace=False)] = True
    return mask


CHUNK_ROWS = 512  # attacked rows per fan-out item (attacked in batches of ``batch_size``)


def attack_chunk(job: tuple[Any, ...]) -> np.ndarray:
    """One fan-out item: the attacks of each epsilon (``names[i]``) on one chunk of rows.

    ``job`` = (model, X chunk, y chunk, epsilons, names, budget, batch_size, seeds, early_exit);
    ``names[i]`` lists the attacks run at epsilon ``i`` and ``seeds[i]`` seeds its generator.
    Runs on one intra-op thread with generators of its own, so the answer does not depend on
    the process or the order it runs in. Returns a boolean matrix: rows x (epsilon, attack)
    in that order, True = still right.

    With ``early_exit`` an attack runs only on the rows still standing: right on clean input,
    under the earlier attacks at this epsilon and under every attack at the smaller epsilons
    (an example found inside a smaller ball lies inside the larger one too). A row's worst case
    is the same as when every attack runs on every row; each column then says "right under
    this attack and every one before it" (AutoAttack's convention), not the attack alone.
    """
    model, X, y, epsilons, names, budget, batch_size, seeds, early_exit = job
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        device = next(model.parameters()).device
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        first = np.cumsum([0] + [len(n) for n in names])  # epsilon i's first column
        ok = np.zeros((len(X), int(first[-1])), dtype=bool)
        ascending = sorted(range(len(epsilons)), key=lambda i: epsilons[i])
        with eval_mode(model):
            for start in range(0, len(X), batch_size):
                xb, yb = X[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
                with torch.no_grad():
                    standing = model(xb).argmax(1) == yb if early_exit else torch.ones_like(yb, dtype=torch.bool)
                for e_i in ascending:
                    eps = epsilons[e_i]
                    if not early_exit:
                        standing = torch.ones_like(yb, dtype=torch.bool)
                    for j, name in enumerate(names[e_i]):
                        idx = torch.nonzero(standing).squeeze(1)
                        if len(idx) == 0:
                            break
                        xa, ya = xb[idx], yb[idx]
                        adv = EVAL_ATTACKS[name](model, xa, ya, eps, budget, generators[e_i])
                        _check_in_ball(name, adv, xa, eps)
                        with torch.no_grad():
                            right = model(adv).argmax(1) == ya
                        ok[start + idx.cpu().numpy(), first[e_i] + j] = right.cpu().numpy()
                        if early_exit:
                            standing[idx] = right
        return ok
    finally:
        torch.set_num_threads(previous)


def evaluate_robustness(model: nn.Module, X: np.ndarray, y: np.ndarray, *, epsilons: list[float], pgd_steps: int,
                        restarts: int, attacks: list[str] = ("fgsm", "pgd"), apgd_steps: int = 100,
                        sample: int | None = None, batch_size: int = 256, seed: int = 0, early_exit: bool = True,
                        full_strength: list[float] | None = None, curve_attacks: list[str] | None = None,
                        mapper: Mapper | None = None) -> RobustnessReport:
    """Clean accuracy of ``model`` on (X, y), and accuracy under each of ``attacks`` at each
    L-inf epsilon ([0, 1] scale), on every row or on a seeded sample of ``sample`` rows.

    PGD takes ``pgd_steps`` steps of ``2.5 * epsilon / pgd_steps`` from ``restarts`` random
    starts and keeps, per sample, the start that fools the model; APGD runs ``apgd_steps``
    iterations seeded by ``seed``. With ``early_exit`` (the default) the attacks skip the rows
    already lost (wrong on clean input, fooled by an earlier attack or at a smaller epsilon):
    the per-row worst case is the same, and each attack's accuracy is cumulative (right under
    it and every attack before it, AutoAttack's convention); without, every attack runs on
    every attacked row and its accuracy is its own. The attacks run per chunk of
    ``CHUNK_ROWS`` attacked rows, each chunk with generators seeded from (``seed``, epsilon
    index, chunk index), through ``mapper`` (default: here, one after another; the flow passes
    one that spreads them over workers) with the same results either way.

    ``curve_attacks`` (some of ``attacks``; None = all) are the attacks run at the epsilons
    not in ``full_strength`` (None = every epsilon at full strength): the points of the curve
    no decision rests on. There a row's figure is its worst case over those attacks only.
    """
    X, y = check_eval_inputs(model, X, y)
    eps_list = [float(e) for e in epsilons]
    if not eps_list or any(not (math.isfinite(e) and 0 < e <= 1) for e in eps_list):
        raise InvalidInput(f"epsilons must be a non-empty list in (0, 1] (the [0, 1] input scale), got {epsilons!r}")
    if pgd_steps < 1 or restarts < 1 or batch_size < 1 or apgd_steps < 1:
        raise InvalidInput(f"pgd_steps, restarts, apgd_steps and batch_size must be >= 1, got {pgd_steps}, {restarts}, "
                           f"{apgd_steps}, {batch_size}")
    if sample is not None and sample < 1:
        raise InvalidInput(f"the attack sample must be at least 1 row (or null for every row), got {sample}")
    names = check_attack_names(list(attacks))
    full = set(eps_list) if full_strength is None else {float(e) for e in full_strength}
    if not full & set(eps_list):
        raise InvalidInput(f"no epsilon of {eps_list} is evaluated at full strength (full_strength={full_strength!r})")
    cheap = names if curve_attacks is None else [n for n in names if n in check_attack_names(list(curve_attacks))]
    if not cheap:
        raise InvalidInput(f"curve_attacks must name some of the attacks run ({names}), got {curve_attacks!r}")
    attacks_at = {e: names if e in full else cheap for e in eps_list}
    budget = AttackBudget(pgd_steps=pgd_steps, restarts=restarts, apgd_steps=apgd_steps, seed=seed)
    device = next(model.parameters()).device
    columns = ["clean"] + [f"{name}@{e:g}" for e in eps_list for name in attacks_at[e]]
    correct = np.zeros((len(X), len(columns)), dtype=bool)
    attacked = _sample_rows(len(X), sample, seed)
    with eval_mode(model), small_model_threads(device, tuple(X.shape[1:])), torch.no_grad():
        for start in range(0, len(X), batch_size):
            xb, yb = X[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            correct[start:start + len(xb), 0] = (model(xb).argmax(1) == yb).cpu().numpy()
    rows = np.flatnonzero(attacked)
    chunks = [rows[s:s + CHUNK_ROWS] for s in range(0, len(rows), CHUNK_ROWS)]
    jobs = [(model, X[idx], y[idx], eps_list, [attacks_at[e] for e in eps_list], budget, batch_size,
             [seed * 1_000_003 + e_i * 10_007 + c_i for e_i in range(len(eps_list))], early_exit)
            for c_i, idx in enumerate(chunks)]
    if mapper is None or device.type != "cpu":  # one GPU: its batches are the parallelism
        results = [attack_chunk(job) for job in jobs]
    else:
        results = mapper(attack_chunk, jobs, label="evaluate-attacks")
    for idx, ok in zip(chunks, results):
        correct[idx, 1:] = ok
    on = correct[attacked]
    column = {name: i for i, name in enumerate(columns)}
    per_attack = {name: {e: float(on[:, column[f"{name}@{e:g}"]].mean()) for e in eps_list if name in attacks_at[e]}
                  for name in names}
    robust = {e: float(on[:, [0] + [column[f"{name}@{e:g}"] for name in attacks_at[e]]].all(axis=1).mean())
              for e in eps_list}
    return RobustnessReport(clean_accuracy=float(correct[:, 0].mean()), epsilons=eps_list, attacks=names,
                            attack_accuracy=per_attack, robust_accuracy=robust, correct=correct, attacked=attacked,
                            columns=columns, budget=budget, n_samples=len(X), early_exit=early_exit,
                            attacks_at=attacks_at)


def plot_robustness_curve(report: RobustnessReport, path: Path | str) -> Path:
    """Accuracy against epsilon ([0, 1] scale) under each attack and the worst case, as a PNG."""
    from matplotlib.backends.backend_agg import (
        FigureCanvasAgg,  # matplotlib: only when a curve is drawn
    )
    from matplotlib.figure import Figure  # matplotlib: only when a curve is drawn

    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"fgsm": "o--", "pgd": "s-", "apgd_ce": "d-.", "apgd_dlr": "v-.", "apgd_t": "p-."}
    curves = [(name.upper().replace("_", "-"), report.attack_accuracy[name], styles.get(name, "x-"))
              for name in report.attacks] + [("worst case", report.robust_accuracy, "^:")]
    for name, values, style in curves:  # an attack's points: clean, then the epsilons it ran at
        at = [e for e in report.epsilons if e in values]
        ax.plot([0.0] + at, [report.clean_accuracy] + [values[e] for e in at], style, label=name)
    ax.set_xlabel("L-inf epsilon ([0, 1] input scale)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"PGD-{report.pgd_steps} x {report.restarts} restarts, n = {report.n_attacked} of {report.n_samples}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
