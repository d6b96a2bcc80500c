"""What the sampler optimizes, the Pareto front, its hypervolume, and which trials are re-measured before the pick.

A student trial is summarized by the candidate its own `select:` picked (or,
when none met the constraint, its most accurate one, marked infeasible):
validation accuracy (maximized) and `select.objective` (minimized). The
constraint (`select.max_drop` below the teacher) goes to Optuna as a
constraint value (≤ 0 is feasible), which TPE and NSGA-II respect.
"""

from __future__ import annotations

from distilflow.params import Params
from tasks.candidates import OBJECTIVE_FIELD  # what each select.objective minimises, one declaration

__all__ = ["OBJECTIVE_FIELD", "constraint", "directions", "hypervolume", "pareto_mask", "shortlist", "trial_values"]


def directions(params: Params) -> list[str]:
    """Optuna's study directions for these params."""
    if params.search.target == "teacher":
        return ["maximize"]
    if params.search.objectives == "constrained":
        return ["minimize"]
    return ["maximize", "minimize"]


def trial_values(params: Params, objective: dict) -> list[float]:
    """The values a completed trial reports, in `directions` order."""
    if params.search.target == "teacher":
        return [objective["val_accuracy"]]
    cost = float(objective[OBJECTIVE_FIELD[params.select.objective]])
    return [cost] if params.search.objectives == "constrained" else [float(objective["val_accuracy"]), cost]


def constraint(params: Params, objective: dict, teacher_val_accuracy: float) -> float:
    """≤ 0 when the trial's candidate meets `select:` (accuracy floor and macro-F1 margin), else how far off."""
    if params.search.target == "teacher":
        return 0.0
    shortfall = teacher_val_accuracy - params.select.max_drop - float(objective["val_accuracy"])
    if objective["feasible"]:
        return min(shortfall, 0.0)
    return max(shortfall, 1e-6)  # infeasible on macro-F1 alone still counts as infeasible


def pareto_mask(accuracy: list[float], cost: list[float]) -> list[bool]:
    """True where no other point is at least as accurate and as cheap, and strictly better on one."""
    n = len(accuracy)
    return [
        not any(
            accuracy[j] >= accuracy[i] and cost[j] <= cost[i] and (accuracy[j] > accuracy[i] or cost[j] < cost[i])
            for j in range(n)
        )
        for i in range(n)
    ]


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by (accuracy ↑, cost ↓) points and bounded by `reference` (worst accuracy, worst cost)."""
    acc_ref, cost_ref = reference
    inside = sorted((c, a) for a, c in points if a > acc_ref and c < cost_ref)
    area, best = 0.0, acc_ref
    for i, (cost, acc) in enumerate(inside):
        best = max(best, acc)
        right = inside[i + 1][0] if i + 1 < len(inside) else cost_ref
        area += (right - cost) * (best - acc_ref)
    return area


def shortlist(trials: list[dict], n: int) -> list[int]:
    """The trial numbers re-measured before the pick: feasible front first, then feasible by cost, at most n.

    `trials`: completed trials as {"number", "val_accuracy", "cost", "feasible"}.
    If none is feasible, the most accurate (the pick will then say why none ships).
    """
    feasible = [t for t in trials if t["feasible"]]
    if not feasible:
        return [t["number"] for t in sorted(trials, key=lambda t: -t["val_accuracy"])[:n]]
    mask = pareto_mask([t["val_accuracy"] for t in feasible], [t["cost"] for t in feasible])
    front = sorted((t for t, m in zip(feasible, mask) if m), key=lambda t: t["cost"])
    rest = sorted((t for t, m in zip(feasible, mask) if not m), key=lambda t: t["cost"])
    return [t["number"] for t in (front + rest)[:n]]
