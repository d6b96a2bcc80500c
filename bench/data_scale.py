"""5. Data stages at scale: clean + split + normalize on synthetic 64-column tables.

Each size runs in its own child process (`python -m bench.data_scale --child`),
so its peak resident memory (the kernel's high-water mark, VmHWM) belongs to
that size alone; the table is generated and written beforehand by the parent,
so generating it does not count. The stages are the real entry points
(`tasks/data.py: clean_stage, split_stage, normalize_stage`), parquet I/O
included, as `python -m distilflow stage` and the Prefect tasks call them.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import check, summarize

N_COLS = 64


def synthetic_table(rows: int, cols: int = N_COLS, seed: int = 0):
    """A raw-ingested-like table: text labels 0..9 and float features in [0, 16], with dirt.

    About 0.1% of rows get a NaN, 0.1% a value out of range, 0.5% are exact
    duplicates and 0.1% carry an invalid label, so every cleaning rule has work.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 16, size=(rows, cols))
    labels = rng.integers(0, 10, size=rows).astype(str).astype(object)
    k = max(1, rows // 1000)
    X[rng.integers(0, rows, k), rng.integers(0, cols, k)] = np.nan
    X[rng.integers(0, rows, k), rng.integers(0, cols, k)] = 99.0
    dup_src, dup_dst = rng.integers(0, rows, 5 * k), rng.integers(0, rows, 5 * k)
    X[dup_dst], labels[dup_dst] = X[dup_src], labels[dup_src]
    labels[rng.integers(0, rows, k)] = "ten"
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(cols)])
    frame.insert(0, "label", labels)
    return frame


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _child(table: Path, workdir: Path, repeats: int) -> dict:
    """Run clean → split → normalize `repeats` times after one warm-up; time each stage."""
    from distilflow.params import CleanParams, DataParams, SplitParams
    from tasks.data import clean_stage, normalize_stage, split_stage

    data = DataParams(source=str(table), image_shape=None, value_range=(0.0, 16.0), classes=list(range(10)))
    split = SplitParams()
    baseline_kb = _rss_kb("VmRSS")
    times: dict[str, list[float]] = {"clean": [], "split": [], "normalize": [], "total": []}
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        clean_stage(
            table,
            workdir / "clean.parquet",
            workdir / "cleaning.json",
            CleanParams(),
            data.classes,
            data.value_range,
            split.n_parts,
        )
        t1 = time.perf_counter()
        split_stage(
            workdir / "clean.parquet",
            *(workdir / f"split/{s}.parquet" for s in ("train", "val", "test")),
            workdir / "split.json",
            split,
            seed=42,
        )
        t2 = time.perf_counter()
        normalize_stage(workdir / "split/train.parquet", workdir / "preprocessor.json", "standard", None, None)
        t3 = time.perf_counter()
        if i == 0:
            continue  # warm-up: first-touch page faults, lazy imports
        for name, seconds in (("clean", t1 - t0), ("split", t2 - t1), ("normalize", t3 - t2), ("total", t3 - t0)):
            times[name].append(seconds)
    return {
        "seconds": {k: summarize(v) for k, v in times.items()},
        "baseline_rss_bytes": baseline_kb * 1024,
        "peak_rss_bytes": _rss_kb("VmHWM") * 1024,
    }


def measure_size(rows: int, workdir: Path, repeats: int) -> dict:
    """Generate and write one table, then time its stages in a fresh child process."""
    from distilflow.io import write_table

    workdir.mkdir(parents=True, exist_ok=True)
    frame = synthetic_table(rows)
    table_bytes = int(frame.memory_usage(deep=True).sum())
    table = write_table(frame, workdir / "ingested.parquet")
    del frame
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.data_scale",
            "--child",
            str(table),
            "--workdir",
            str(workdir),
            "--repeats",
            str(repeats),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    if out.returncode != 0:
        raise RuntimeError(f"data_scale child for {rows} rows failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    extra = result["peak_rss_bytes"] - result["baseline_rss_bytes"]
    return {
        "rows": rows,
        "cols": N_COLS,
        "table_bytes": table_bytes,
        **result,
        "peak_extra_bytes": extra,
        "peak_over_table": extra / table_bytes,
        "us_per_row": 1e6 * result["seconds"]["total"]["median"] / rows,
    }


def run(
    sizes: list[int],
    repeats: int = 3,
    big_repeats: int = 2,
    workdir: Path | None = None,
    target_rows: int = 1_000_000,
    target_seconds: float = 20.0,
) -> dict:
    """Every size, then the targets: linear growth, time at `target_rows`, peak memory ≤ 4× the table."""
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        base = Path(workdir or tmp)
        for rows in sorted(sizes):
            r = repeats if rows < 1_000_000 else big_repeats
            rows_out.append(measure_size(rows, base / f"rows{rows}", r))
            print(
                f"  data_scale {rows:>9,} rows: {rows_out[-1]['seconds']['total']['median']:.2f} s, "
                f"peak +{rows_out[-1]['peak_extra_bytes'] / 2**20:.0f} MiB "
                f"({rows_out[-1]['peak_over_table']:.2f}× table)",
                flush=True,
            )
    largest, second = rows_out[-1], rows_out[-2] if len(rows_out) > 1 else None
    targets = []
    if second is not None:
        # growth exponent between the two largest sizes, where fixed costs no longer hide the slope
        slope = math.log(largest["seconds"]["total"]["median"] / second["seconds"]["total"]["median"]) / math.log(
            largest["rows"] / second["rows"]
        )
        targets.append(
            check(
                "data.growth_exponent",
                f"time growth exponent, {second['rows']:,} → {largest['rows']:,} rows (1.0 = linear)",
                slope,
                "<=",
                1.1,
                unit="",
            )
        )
    t_big = largest["seconds"]["total"]["median"]
    if largest["rows"] >= target_rows:
        targets.append(
            check(
                "data.time_1m",
                f"clean+split+normalize, {largest['rows']:,} rows × {N_COLS} cols",
                t_big,
                "<=",
                target_seconds,
                unit="s",
            )
        )
    else:
        estimate = t_big * target_rows / largest["rows"]
        targets.append(
            check(
                "data.time_1m",
                f"clean+split+normalize, {target_rows:,} rows (linear extrapolation "
                f"from {largest['rows']:,}: not measured)",
                estimate,
                "<=",
                target_seconds,
                unit="s",
                note="extrapolated, not measured",
            )
        )
    targets.append(
        check(
            "data.peak_memory",
            f"peak extra memory / table size, {largest['rows']:,} rows",
            largest["peak_over_table"],
            "<=",
            4.0,
        )
    )
    return {
        "sizes": rows_out,
        "targets": targets,
        "setting": f"synthetic tables, {N_COLS} float64 columns + text label, ~0.1% NaN / out-of-range / "
        "invalid labels, 0.5% duplicates; clean (defaults) → split 70/15/15 → normalize (standard); "
        "parquet I/O included; each size in a fresh process",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", type=Path, help="(internal) time the stages on this ingested table")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.workdir, args.repeats)))


if __name__ == "__main__":
    main()
