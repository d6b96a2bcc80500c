"""Product candidates and the selection policy: every model a run built competes, on the validation split only.

A candidate is one student (the KD student, its no-KD twin, the pruned
student) in one runtime (ONNX Runtime fp32, or int8), kept in
`artifacts/candidates/<student>.<fp32|int8>/`. The policy
(`params.yaml: select`) is a constraint, then an objective:

1. validation accuracy ≥ the teacher's validation accuracy − `max_drop`, and
   validation macro-F1 ≥ the majority-class predictor's + `min_macro_f1_margin`
   (a model that mostly predicts one class is never shipped);
2. among those, the lowest `objective` (batch-1 latency, batch-256 latency or
   size), where values within `tie_tolerance` of the best count as a tie
   (latency medians move a few percent between runs): among tied candidates
   the higher validation accuracy wins, then the smaller size, then the lower
   objective.

That order also means the pick is never dominated: a candidate at least as
good on accuracy, latency and size, and better on one, would have been
picked instead. Test figures are reported, never used to choose.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from distilflow.params import SelectParams

STUDENTS = {"student": "student", "student_nokd": "student (no KD)", "student_pruned": "student pruned"}
# `select.objective` -> the Verdict field it minimises (the search's objectives read the same fields)
OBJECTIVE_FIELD = {"latency_b1": "latency_b1_ms", "latency_b256": "latency_b256_ms", "size": "size_bytes"}


def candidate_name(student: str, runtime: str) -> str:
    """The table's name of a candidate: `student int8`, `student (no KD) ORT fp32`, ..."""
    return f"{STUDENTS[student]} {'int8' if runtime == 'int8' else 'ORT fp32'}"


def majority_macro_f1(class_counts: dict[str, int]) -> float:
    """Macro-F1 of always predicting the most frequent class (F1 of that class, 0 for the others)."""
    total, top = sum(class_counts.values()), max(class_counts.values())
    precision = top / total  # recall of the majority class is 1
    return (2 * precision / (1 + precision)) / len(class_counts)


@dataclass
class Verdict:
    """One candidate under the policy."""

    variant: str
    candidate: str
    val_accuracy: float
    val_macro_f1: float
    latency_b1_ms: float
    latency_b256_ms: float
    size_bytes: int
    test_accuracy: float
    feasible: bool
    why: str


def macro_f1_shortfall(f1: float, majority_f1: float, margin: float) -> str | None:
    """Why a validation macro-F1 misses the majority-class predictor's + `select.min_macro_f1_margin`, or None.

    The select stage's wording; the baseline stage says the same when it stops a run before fine-tuning.
    """
    floor = majority_f1 + margin
    if f1 >= floor - 1e-12:
        return None
    return (
        f"validation macro-F1 {f1:.4f} < {floor:.4f} (majority-class predictor {majority_f1:.4f} + "
        f"select.min_macro_f1_margin {margin}) by {floor - f1:.4f}"
    )


def _problems(acc: float, f1: float, teacher_val_accuracy: float, majority_f1: float, cfg: SelectParams) -> list[str]:
    """What keeps a candidate out, each with its threshold and by how much (empty: it meets the constraint)."""
    floor = teacher_val_accuracy - cfg.max_drop
    problems = []
    if acc < floor - 1e-12:
        problems.append(
            f"validation accuracy {acc:.4f} < {floor:.4f} (teacher {teacher_val_accuracy:.4f} − "
            f"select.max_drop {cfg.max_drop}) by {floor - acc:.4f}"
        )
    if (short := macro_f1_shortfall(f1, majority_f1, cfg.min_macro_f1_margin)) is not None:
        problems.append(short)
    return problems


def verdict(row: dict, teacher_val_accuracy: float, majority_f1: float, cfg: SelectParams) -> Verdict:
    """One evaluation-table row under the policy's constraint."""
    acc, f1 = float(row["val_accuracy"]), float(row["val_macro_f1"])
    problems = _problems(acc, f1, teacher_val_accuracy, majority_f1, cfg)
    return Verdict(
        row["variant"],
        row["candidate"],
        acc,
        f1,
        float(row["latency_b1_median_ms"]),
        float(row["latency_b256_median_ms"]),
        int(row["file_bytes"]),
        float(row["accuracy"]),
        not problems,
        "; ".join(problems) or "meets the constraint",
    )


def _ranked(feasible: list[Verdict], cfg: SelectParams) -> tuple[list[Verdict], float, int]:
    """The feasible candidates in pick order, the lowest objective value, and how many tie with it."""
    field = OBJECTIVE_FIELD[cfg.objective]
    best = min(getattr(v, field) for v in feasible)
    tied = lambda v: getattr(v, field) <= best * (1 + cfg.tie_tolerance)  # noqa: E731
    order = sorted(
        feasible,
        key=lambda v: (not tied(v), -v.val_accuracy if tied(v) else getattr(v, field), v.size_bytes, getattr(v, field)),
    )
    return order, best, sum(1 for v in feasible if tied(v))


def _reason(order: list[Verdict], best: float, band: int, n_candidates: int, cfg: SelectParams) -> str:
    field, pick = OBJECTIVE_FIELD[cfg.objective], order[0]
    how = (
        f"the lowest {cfg.objective} ({best:.4g})"
        if band == 1
        else f"the most accurate on validation of the {band} within {cfg.tie_tolerance:.0%} of the lowest "
        f"{cfg.objective} ({best:.4g}; its own {getattr(pick, field):.4g})"
    )
    reason = (
        f"{pick.variant}: {how}, among the {len(order)} of {n_candidates} candidates that meet the "
        f"constraint, at validation accuracy {pick.val_accuracy:.4f}"
    )
    if len(order) > 1:
        runner = order[1]
        reason += (
            f"; next: {runner.variant} ({cfg.objective} {getattr(runner, field):.4g}, "
            f"validation accuracy {runner.val_accuracy:.4f})"
        )
    return reason


def refusal(verdicts: list[Verdict]) -> str:
    """Why nothing ships: the closest candidate (most accurate on validation) and what it misses."""
    if not verdicts:
        return "no candidates were built (distill.enabled=false?)"
    closest = max(verdicts, key=lambda v: (v.val_accuracy, v.val_macro_f1))
    return f"no candidate meets select: {closest.variant} comes closest: {closest.why}"


def select_product(rows: list[dict], teacher_val_accuracy: float, majority_f1: float, cfg: SelectParams) -> dict:
    """The policy applied to the evaluation table's candidate rows: {"pick", "verdicts", "reason", ...}.

    `pick` is None when no candidate meets the constraint; `reason` then says
    which constraint failed and by how much for the closest candidate.
    """
    verdicts = [verdict(r, teacher_val_accuracy, majority_f1, cfg) for r in rows]
    floor, f1_floor = teacher_val_accuracy - cfg.max_drop, majority_f1 + cfg.min_macro_f1_margin
    policy = (
        f"validation accuracy ≥ teacher − {cfg.max_drop} ({floor:.4f}) and macro-F1 ≥ {f1_floor:.4f}; "
        f"then the lowest {cfg.objective}, values within {cfg.tie_tolerance:.0%} of it tied (more accurate wins)"
    )
    table = [asdict(v) for v in verdicts]
    feasible = [v for v in verdicts if v.feasible]
    if not feasible:
        return {"pick": None, "reason": refusal(verdicts), "policy": policy, "verdicts": table}
    order, best, band = _ranked(feasible, cfg)
    reason = _reason(order, best, band, len(verdicts), cfg)
    return {"pick": asdict(order[0]), "reason": reason, "policy": policy, "verdicts": table}


def dominated(pick: dict, verdicts: list[dict]) -> list[str]:
    """Candidates at least as good as `pick` on validation accuracy, batch-1 latency and size, better on one."""
    out = []
    for v in verdicts:
        no_worse = (
            v["val_accuracy"] >= pick["val_accuracy"]
            and v["latency_b1_ms"] <= pick["latency_b1_ms"]
            and v["size_bytes"] <= pick["size_bytes"]
        )
        better = (
            v["val_accuracy"] > pick["val_accuracy"]
            or v["latency_b1_ms"] < pick["latency_b1_ms"]
            or v["size_bytes"] < pick["size_bytes"]
        )
        if no_worse and better:
            out.append(v["variant"])
    return out
