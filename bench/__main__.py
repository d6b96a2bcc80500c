"""python -m bench [--only data_scale,training,...,search,stack] [--quick] [--out DIR]

Runs the benchmark families and writes bench/results/<date>-<host>.json and .md.
`--quick` cuts sizes, epochs and repeats (minutes instead of a quarter hour);
the results say which scale they were taken at.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from distilflow.layout import Layout

FAMILIES = ("data_scale", "training", "orchestration", "quality", "compression", "serving", "search", "stack")


def _quiet_environment() -> None:
    """Offline, no telemetry; as the CLI sets before Prefect or MLflow are imported."""
    for key, value in (
        ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        ("DO_NOT_TRACK", "true"),
        ("MLFLOW_DISABLE_TELEMETRY", "true"),
        ("HF_HUB_OFFLINE", "1"),
        ("GIT_PYTHON_REFRESH", "quiet"),
        ("TQDM_DISABLE", "1"),
    ):
        os.environ.setdefault(key, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[2])
    parser.add_argument("--only", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    parser.add_argument("--quick", action="store_true", help="reduced sizes, epochs and repeats")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other benchmarks' figures already in today's results file for this host",
    )
    parser.add_argument("--data-sizes", help="override the data_scale row counts, e.g. 2000,8000")
    parser.add_argument("--seeds", help="override the search family's seeds, e.g. 0 (default: 0,1,2; --quick: 0)")
    args = parser.parse_args(argv)
    only = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = set(only) - set(FAMILIES)
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {sorted(unknown)} (known: {', '.join(FAMILIES)})")
    _quiet_environment()

    import torch

    from bench import report
    from bench.common import machine_info

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "command": shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]),
        "quick": args.quick,
        "scale_notes": [],
        "benchmarks": {},
        "targets": [],
        "errors": {},
    }
    notes = results["scale_notes"]
    q = args.quick

    def attempt(name: str, fn) -> None:
        if name not in only:
            return
        print(f"[bench] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            section = fn()
        except Exception as exc:  # one family failing must not lose the others' figures
            traceback.print_exc()
            results["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return
        section["seconds"] = time.perf_counter() - t0
        results["benchmarks"][name] = section
        results["targets"] += section["targets"]
        print(f"[bench] {name} done in {section['seconds']:.0f} s", flush=True)

    def data_scale():
        from bench import data_scale as ds

        sizes = (
            [int(s) for s in args.data_sizes.split(",")]
            if args.data_sizes
            else ([10_000, 100_000] if q else [10_000, 100_000, 1_000_000])
        )
        if max(sizes) < 1_000_000:
            notes.append(f"data_scale up to {max(sizes):,} rows (1M extrapolated)")
        return ds.run(sizes, repeats=2 if q else 3, big_repeats=2, workdir=work / "data")

    def training():
        from bench import training as tr

        if q:
            notes.append("training: 1 epoch × 2 pairs, CNN only")
        return tr.run(epochs=1 if q else 2, repeats=2 if q else 5, resnet=not q)

    project = work / "demo-plain"

    def orchestration():
        from bench import orchestration as orch

        if q:
            notes.append("orchestration: epochs cut to 3 (pretrain 1), 1 pair")
        return orch.run(repeats=1 if q else 3, quick=q, workdir=work / "orch", keep=project)

    quality_models = {}

    def quality():
        from bench import quality as ql

        if q:
            notes.append("quality: 1 seed, 10 labels/class, 5 epochs")
        section = ql.run(
            budgets=(10,) if q else (10, 50),
            seeds=(0,) if q else (0, 1, 2),
            epochs=5 if q else 15,
            pretrain_epochs=3 if q else 10,
            workdir=work / "quality",
        )
        quality_models["mnist"] = (section.pop("_models"), section.pop("_data"), max(section["budgets"]))
        return section

    def compression():
        from bench import compression as cp
        from bench import orchestration as orch
        from distilflow.params import load_params

        reps = (30, 5) if q else (100, 15)
        settings, errors = [], {}

        def setting(name: str, description: str, build) -> None:
            print(f"  compression {name} ...", flush=True)
            try:  # one setting failing (an exporter, say) must not lose the others
                s = build()
            except Exception as exc:
                traceback.print_exc()
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                return
            s["description"] = description
            settings.append(s)

        def demo():
            if not Layout(project).teacher.exists():  # orchestration not run: build the demo artifacts here
                orch.make_project(project)
                orch.plain_pipeline(load_params(project / "params.yaml", orch.QUICK_OVERRIDES if q else []), project)
            return cp.from_layout("digits-demo", project, work / "cmp-demo", repeats=reps)

        def resnet18():
            root = orch.make_project(work / "demo-resnet18")
            params = load_params(
                root / "params.yaml", ["backbone.spec=builtin:resnet18", "quantize.enabled=false", "evaluate.repeats=3"]
            )
            orch.plain_pipeline(params, root)
            return cp.from_layout("digits-resnet18", root, work / "cmp-resnet18", repeats=reps)

        setting(
            "digits-demo", "demo pipeline: MNIST-pretrained CNN teacher fine-tuned on digits, KD student, int8", demo
        )
        if q:
            notes.append("compression: ResNet-18 setting skipped, 30/5 timed calls")
        else:
            setting(
                "digits-resnet18",
                "ResNet-18 layout (11.2M parameters) trained from scratch on digits (the "
                "demo pipeline with backbone.spec=builtin:resnet18), KD student, int8",
                resnet18,
            )
        if "mnist" in quality_models:
            (teacher, student, int8), data, budget = quality_models["mnist"]
            setting(
                f"mnist-{budget}",
                f"MNIST subset, {budget} labels/class, seed 0: digits-pretrained CNN teacher "
                "fine-tuned on those labels, KD student, int8",
                lambda: cp.compare(f"mnist-{budget}", teacher, student, data, work / "cmp-mnist", int8, repeats=reps),
            )
        if not settings:
            raise RuntimeError(f"every compression setting failed: {errors}")
        return {"settings": settings, "errors": errors, "targets": [t for s in settings for t in s["targets"]]}

    def serving():
        from bench import serving as sv

        if q:
            notes.append("serving: 100 timed calls per contender, 3 score start-ups")
        return sv.run(repeats=100 if q else 300, score_runs=3 if q else 5, workdir=work / "serving")

    def search():
        from bench import search as se

        if q:
            notes.append("search: 1 seed, 6 trials per study, 3-epoch teacher and students")
        else:
            notes.append("search: digits only (the MNIST-50 setting is not run: hours on 2 cores)")
        seeds = tuple(int(x) for x in args.seeds.split(",")) if args.seeds else ((0,) if q else (0, 1, 2))
        if args.seeds:
            notes.append(f"search: seeds {list(seeds)}")
        return se.run(
            seeds=seeds,
            n_trials=6 if q else 12,
            parallel_trials=4 if q else 6,
            quick=q,
            workdir=work / "search",
        )

    def stack():
        from bench import stack as st

        if q:
            notes.append("stack: 1 round of 4 concurrent runs per contender")
        return st.run(concurrency=4, rounds=1 if q else 2, workdir=work / "stack")

    for name, fn in (
        ("data_scale", data_scale),
        ("training", training),
        ("orchestration", orchestration),
        ("quality", quality),
        ("compression", compression),
        ("serving", serving),
        ("search", search),
        ("stack", stack),
    ):
        attempt(name, fn)
    results["seconds"] = time.perf_counter() - started
    if args.merge:
        report.merge_previous(results, args.out)
    json_path, md_path = report.write(results, args.out)
    shutil.rmtree(work, ignore_errors=True)
    met = sum(t["passed"] for t in results["targets"])
    print(f"[bench] {met} of {len(results['targets'])} targets met; wrote {json_path} and {md_path}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
