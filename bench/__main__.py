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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from distilflow.layout import Layout

FAMILIES = (
    "data_scale",
    "training",
    "orchestration",
    "quality",
    "compression",
    "transfer",
    "serving",
    "search",
    "stack",
)
RESULTS = Layout(Path(__file__).resolve().parents[1]).bench_results  # the catalog's bench_results


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


# ---------------------------------------------------------------------------- the command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[2])
    parser.add_argument("--only", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    parser.add_argument("--quick", action="store_true", help="reduced sizes, epochs and repeats")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other benchmarks' figures already in today's results file for this host",
    )
    parser.add_argument("--data-sizes", help="override the data_scale row counts, e.g. 2000,8000")
    parser.add_argument(
        "--seeds", help="override the search and transfer families' seeds, e.g. 0 (default: 0,1,2; --quick: 0)"
    )
    return parser


def _selected(parser: argparse.ArgumentParser, only: str) -> list[str]:
    """The families `--only` names; the parser's usage error for a name that is none of them."""
    selected = [f.strip() for f in only.split(",") if f.strip()]
    unknown = set(selected) - set(FAMILIES)
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {sorted(unknown)} (known: {', '.join(FAMILIES)})")
    return selected


# ---------------------------------------------------------------------------- the families


@dataclass
class Session:
    """What the families of one `python -m bench` share: the options, a scratch folder, the scale notes."""

    args: argparse.Namespace
    work: Path
    notes: list[str]
    quality_models: dict = field(default_factory=dict)  # quality's MNIST models, for compression's MNIST setting

    @property
    def quick(self) -> bool:
        return self.args.quick

    @property
    def project(self) -> Path:
        """The demo project orchestration keeps and compression's demo setting reads."""
        return self.work / "demo-plain"


def _data_scale(s: Session) -> dict:
    from bench import data_scale as ds

    sizes = (
        [int(n) for n in s.args.data_sizes.split(",")]
        if s.args.data_sizes
        else ([10_000, 100_000] if s.quick else [10_000, 100_000, 1_000_000])
    )
    if max(sizes) < 1_000_000:
        s.notes.append(f"data_scale up to {max(sizes):,} rows (1M extrapolated)")
    return ds.run(sizes, repeats=2 if s.quick else 3, big_repeats=2, workdir=s.work / "data")


def _training(s: Session) -> dict:
    from bench import training as tr

    if s.quick:
        s.notes.append("training: 1 epoch × 2 pairs, CNN only")
    return tr.run(epochs=1 if s.quick else 2, repeats=2 if s.quick else 5, resnet=not s.quick)


def _orchestration(s: Session) -> dict:
    from bench import orchestration as orch

    if s.quick:
        s.notes.append("orchestration: epochs cut to 3 (pretrain 1), 1 pair")
    return orch.run(repeats=1 if s.quick else 3, quick=s.quick, workdir=s.work / "orch", keep=s.project)


def _quality(s: Session) -> dict:
    from bench import quality as ql

    q = s.quick
    if q:
        s.notes.append("quality: 1 seed, 10 labels/class, 5 epochs")
    section = ql.run(
        budgets=(10,) if q else (10, 50),
        seeds=(0,) if q else (0, 1, 2),
        epochs=5 if q else 15,
        pretrain_epochs=3 if q else 10,
        workdir=s.work / "quality",
    )
    s.quality_models["mnist"] = (section.pop("_models"), section.pop("_data"), max(section["budgets"]))
    return section


def _demo_setting(s: Session, repeats: tuple[int, int]) -> dict:
    """The demo pipeline's artifacts: orchestration's kept project, or built here when orchestration did not run."""
    from bench import compression as cp
    from bench import orchestration as orch
    from bench.common import make_project
    from distilflow.params import load_params

    if not Layout(s.project).teacher.exists():
        make_project(s.project)
        orch.plain_pipeline(load_params(s.project / "params.yaml", orch.QUICK_OVERRIDES if s.quick else []), s.project)
    return cp.from_layout("digits-demo", s.project, s.work / "cmp-demo", repeats=repeats)


# a ResNet-18 trained from scratch at 64 px (where its convs work on 16×16 to 2×2 maps, as a CNN's do): the
# scratch recipe, BatchNorm learning; int8 is the bench's own (compression.compare), not the pipeline's
RESNET18 = [
    "backbone.spec=builtin:resnet18",
    "backbone.input_size=[64,64]",
    "train.freeze_batchnorm=false",
    "train.augment.enabled=false",
    "train.lr_decay=1.0",
    "quantize.enabled=false",
    "evaluate.repeats=3",
]


def _resnet18_setting(s: Session, repeats: tuple[int, int]) -> dict:
    """The demo pipeline with a ResNet-18 teacher trained from scratch, then its artifacts."""
    from bench import compression as cp
    from bench import orchestration as orch
    from bench.common import make_project
    from distilflow.params import load_params

    root = make_project(s.work / "demo-resnet18")
    params = load_params(root / "params.yaml", RESNET18)
    orch.plain_pipeline(params, root)
    return cp.from_layout("digits-resnet18", root, s.work / "cmp-resnet18", repeats=repeats)


def _add_setting(settings: list, errors: dict, name: str, description: str, build: Callable[[], dict]) -> None:
    """One compression setting, or its error: one setting failing (an exporter, say) must not lose the others."""
    print(f"  compression {name} ...", flush=True)
    try:
        setting = build()
    except Exception as exc:
        traceback.print_exc()
        errors[name] = _error_line(exc)
        return
    setting["description"] = description
    settings.append(setting)


def _compression(s: Session) -> dict:
    from bench import compression as cp

    reps = (30, 5) if s.quick else (100, 15)
    settings, errors = [], {}
    _add_setting(
        settings,
        errors,
        "digits-demo",
        "demo pipeline: ImageNet EfficientNet-Lite0 teacher fine-tuned on digits at 48 px, KD student, int8",
        lambda: _demo_setting(s, reps),
    )
    if s.quick:
        s.notes.append("compression: ResNet-18 setting skipped, 30/5 timed calls")
    else:
        _add_setting(
            settings,
            errors,
            "digits-resnet18",
            "ResNet-18 layout (11.2M parameters) trained from scratch on digits at 64 px (the "
            "demo pipeline with backbone.spec=builtin:resnet18), KD student, int8",
            lambda: _resnet18_setting(s, reps),
        )
    if "mnist" in s.quality_models:
        (teacher, student, int8), data, budget = s.quality_models["mnist"]
        _add_setting(
            settings,
            errors,
            f"mnist-{budget}",
            f"MNIST subset, {budget} labels/class, seed 0: digits-pretrained CNN teacher "
            "fine-tuned on those labels, KD student, int8",
            lambda: cp.compare(f"mnist-{budget}", teacher, student, data, s.work / "cmp-mnist", int8, repeats=reps),
        )
    if not settings:
        raise RuntimeError(f"every compression setting failed: {errors}")
    return {"settings": settings, "errors": errors, "targets": [t for st in settings for t in st["targets"]]}


def _transfer(s: Session) -> dict:
    from bench import transfer as tf

    seeds = tuple(int(x) for x in s.args.seeds.split(",")) if s.args.seeds else tf.SEEDS
    if s.quick:
        s.notes.append("transfer: the demo setting at one seed, 3-epoch training")
    return tf.run(s.work / "transfer", quick=s.quick, seeds=seeds)


def _serving(s: Session) -> dict:
    from bench import serving as sv

    if s.quick:
        s.notes.append("serving: 100 timed calls per contender, 3 score start-ups")
    return sv.run(repeats=100 if s.quick else 300, score_runs=3 if s.quick else 5, workdir=s.work / "serving")


def _search(s: Session) -> dict:
    from bench import search as se

    q = s.quick
    if q:
        s.notes.append("search: 1 seed, 6 trials per study, 3-epoch teacher and students")
    else:
        s.notes.append("search: digits only (the MNIST-50 setting is not run: hours on 2 cores)")
    seeds = tuple(int(x) for x in s.args.seeds.split(",")) if s.args.seeds else ((0,) if q else (0, 1, 2))
    if s.args.seeds:
        s.notes.append(f"search: seeds {list(seeds)}")
    return se.run(
        seeds=seeds,
        n_trials=6 if q else 12,
        parallel_trials=4 if q else 6,
        quick=q,
        workdir=s.work / "search",
    )


def _stack(s: Session) -> dict:
    from bench import stack as st

    if s.quick:
        s.notes.append("stack: 1 round of 4 concurrent runs per contender")
    return st.run(concurrency=4, rounds=1 if s.quick else 2, workdir=s.work / "stack")


RUNNERS: dict[str, Callable[[Session], dict]] = {
    "data_scale": _data_scale,
    "training": _training,
    "orchestration": _orchestration,
    "quality": _quality,
    "compression": _compression,
    "transfer": _transfer,
    "serving": _serving,
    "search": _search,
    "stack": _stack,
}


# ---------------------------------------------------------------------------- one run of the bench


def _error_line(exc: Exception) -> str:
    """An exception as one line: its type and the first line of its message."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _new_results(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """The results record before any family ran: the date, the machine, the command."""
    from bench.common import machine_info

    return {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "command": shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]),
        "quick": args.quick,
        "scale_notes": [],
        "benchmarks": {},
        "targets": [],
        "errors": {},
    }


def _attempt(results: dict, name: str, run: Callable[[], dict]) -> None:
    """One family into `results`, timed; its error in `results["errors"]` instead if it fails."""
    print(f"[bench] {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        section = run()
    except Exception as exc:  # one family failing must not lose the others' figures
        traceback.print_exc()
        results["errors"][name] = _error_line(exc)
        return
    section["seconds"] = time.perf_counter() - t0
    results["benchmarks"][name] = section
    results["targets"] += section["targets"]
    print(f"[bench] {name} done in {section['seconds']:.0f} s", flush=True)


def _finish(results: dict, args: argparse.Namespace, work: Path) -> int:
    """The .json and .md files (the families this run did not measure carried over under `--merge`), the scratch
    folder removed, the summary line; exit status 1 when a family failed."""
    from bench import report

    if args.merge:
        report.merge_previous(results, args.out)
    json_path, md_path = report.write(results, args.out)
    shutil.rmtree(work, ignore_errors=True)
    met = sum(t["passed"] for t in results["targets"])
    print(f"[bench] {met} of {len(results['targets'])} targets met; wrote {json_path} and {md_path}")
    return 1 if results["errors"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    only = _selected(parser, args.only)
    _quiet_environment()

    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    results = _new_results(args, argv)
    session = Session(args, work, results["scale_notes"])
    for name in FAMILIES:
        if name in only:
            _attempt(results, name, lambda run=RUNNERS[name]: run(session))
    results["seconds"] = time.perf_counter() - started
    return _finish(results, args, work)


if __name__ == "__main__":
    sys.exit(main())
