"""The product is chosen by the policy in params, on validation figures, and never dominated."""

import random

import pytest

from distilflow.params import SelectParams
from tasks.candidates import dominated, majority_macro_f1, select_product


def row(variant, val, b1, size, test=None, f1=None, b256=1.0, candidate=None):
    return {
        "variant": variant,
        "candidate": candidate or variant.replace(" ", "_"),
        "val_accuracy": val,
        "val_macro_f1": val if f1 is None else f1,
        "latency_b1_median_ms": b1,
        "latency_b256_median_ms": b256,
        "file_bytes": size,
        "accuracy": val if test is None else test,
    }


POLICY = SelectParams(max_drop=0.01, objective="latency_b1", tie_tolerance=0.05)


def test_a_no_kd_student_that_is_better_on_validation_ships():
    rows = [
        row("student int8", 0.975, 0.012, 26_000),
        row("student ORT fp32", 0.975, 0.011, 42_000),
        row("student (no KD) int8", 0.989, 0.012, 26_000),
        row("student (no KD) ORT fp32", 0.989, 0.0105, 42_000),
    ]
    result = select_product(rows, teacher_val_accuracy=0.996, majority_f1=0.02, cfg=POLICY)
    assert result["pick"]["variant"] == "student (no KD) ORT fp32"
    kd = {v["variant"]: v for v in result["verdicts"]}["student int8"]
    assert not kd["feasible"] and "validation accuracy 0.9750 < 0.9860" in kd["why"] and "by 0.0110" in kd["why"]


def test_when_int8_is_slower_than_fp32_the_fp32_runtime_ships_and_size_can_change_that():
    rows = [row("student int8", 0.99, 0.020, 26_000), row("student ORT fp32", 0.99, 0.010, 42_000)]
    assert select_product(rows, 0.995, 0.02, POLICY)["pick"]["variant"] == "student ORT fp32"
    by_size = POLICY.model_copy(update={"objective": "size"})
    assert select_product(rows, 0.995, 0.02, by_size)["pick"]["variant"] == "student int8"


def test_latencies_within_the_tolerance_tie_and_the_more_accurate_ships():
    rows = [row("a", 0.990, 0.0100, 40_000), row("b", 0.994, 0.0103, 40_000), row("c", 0.999, 0.0200, 40_000)]
    result = select_product(rows, 0.996, 0.02, POLICY)
    assert result["pick"]["variant"] == "b"  # 3% slower than a, within 5%: a tie, b is more accurate
    assert "most accurate on validation of the 2 within 5%" in result["reason"]
    assert select_product(rows, 0.996, 0.02, POLICY.model_copy(update={"tie_tolerance": 0.0}))["pick"]["variant"] == "a"


def test_no_candidate_meeting_the_constraint_ships_nothing_and_says_by_how_much():
    rows = [row("student int8", 0.95, 0.01, 26_000), row("student ORT fp32", 0.96, 0.01, 42_000)]
    result = select_product(rows, 0.99, 0.02, POLICY)
    assert result["pick"] is None
    assert result["reason"] == (
        "no candidate meets select: student ORT fp32 comes closest: validation accuracy "
        "0.9600 < 0.9800 (teacher 0.9900 − select.max_drop 0.01) by 0.0200"
    )


def test_a_model_that_predicts_the_majority_class_is_never_shipped():
    # 62% of the validation split is one class: always predicting it scores 62% accuracy and a poor macro-F1
    majority = majority_macro_f1({"benign": 62, "malignant": 38})
    assert majority == pytest.approx((2 * 0.62 / 1.62) / 2)
    degenerate = row("student int8", 0.622, 0.01, 11_600, f1=0.256)
    result = select_product(
        [degenerate], teacher_val_accuracy=0.63, majority_f1=majority, cfg=POLICY.model_copy(update={"max_drop": 0.05})
    )
    assert result["pick"] is None and "macro-F1 0.2560 <" in result["reason"]


def test_the_pick_is_never_dominated_on_accuracy_latency_and_size():
    rng = random.Random(0)
    for _ in range(300):
        rows = [
            row(
                f"c{i}",
                round(rng.uniform(0.95, 1.0), 3),
                rng.choice([0.010, 0.011, 0.02, 0.03]),
                rng.choice([20_000, 40_000, 80_000]),
            )
            for i in range(rng.randint(1, 6))
        ]
        cfg = SelectParams(
            max_drop=0.03, objective=rng.choice(["latency_b1", "size"]), tie_tolerance=rng.choice([0.0, 0.05, 0.2])
        )
        result = select_product(rows, 0.99, 0.0, cfg)
        if result["pick"] is not None:
            feasible = [v for v in result["verdicts"] if v["feasible"]]
            assert dominated(result["pick"], feasible) == [], (rows, cfg)
