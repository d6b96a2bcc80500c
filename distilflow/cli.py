"""Command line: the edge where params, environment and exit codes meet.

    python -m distilflow run   [--params params.yaml] [--set key=value ...] [--force]
    python -m distilflow stage NAME [--params ...] [--set ...]   # one DVC stage
    python -m distilflow promote [--by NAME]                       # challenger → champion, if the gates pass
    python -m distilflow rollback --reason TEXT                    # champion → previous-champion
    python -m distilflow audit                                     # every promotion and rollback
    python -m distilflow score INPUT.csv --out OUTPUT.csv          # batch scoring with the champion
    python -m distilflow serve                                     # the scheduled deployments (Prefect)
    python -m distilflow demo-data [--out data/raw/digits.csv]

A `DistilflowError` (bad params, bad data) prints one line and exits 1, with
no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from distilflow.errors import DistilflowError

STAGES = ("ingest", "clean", "split", "normalize")


def _quiet_environment() -> None:
    """Offline-safe defaults, set before Prefect or MLflow are imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the first start of the ephemeral API migrates its database: more than the 30 s default on 2 cores
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class _NoUserTracebacks(logging.Filter):
    """Prefect logs task failures with their traceback; a user error needs only its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], DistilflowError):
            record.exc_info, record.exc_text = None, None
        return True


def _install_log_filter() -> None:
    flt = _NoUserTracebacks()
    for name in ("", "prefect", "prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        logger.addFilter(flt)
        for handler in logger.handlers:
            handler.addFilter(flt)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distilflow", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_params(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one param for this run, e.g. --set train.epochs=2 (repeatable)")
        return p

    run = with_params(sub.add_parser("run", help="run the pipeline as a Prefect flow, tracked in MLflow"))
    run.add_argument("--stop-after", choices=["normalize"], help="stop after this stage (the data half)")
    run.add_argument("--force", action="store_true",
                     help="run even when nothing changed since the last complete run (distilflow/uptodate.py)")
    with_params(sub.add_parser("pretrain", help="pretrain the demo backbone on MNIST and register it in MLflow"))
    stage = with_params(sub.add_parser("stage", help="run one stage without Prefect (what dvc.yaml calls)"))
    stage.add_argument("name", choices=STAGES)
    promote = with_params(sub.add_parser("promote", help="promote the challenger to champion if it passes the gates"))
    promote.add_argument("--by", help="who promotes, for the audit trail (default: the OS user)")
    rollback = with_params(sub.add_parser("rollback", help="restore previous-champion as champion"))
    rollback.add_argument("--reason", required=True, help="why, for the audit trail")
    rollback.add_argument("--by", help="who rolls back (default: the OS user)")
    audit = with_params(sub.add_parser("audit", help="list every promotion and rollback of the model"))
    audit.add_argument("--all", action="store_true", help="every registered model, not just this project's")
    score = with_params(sub.add_parser("score", help="score a CSV of raw rows with the champion"))
    score.add_argument("input", help="CSV with the model's raw feature columns (other columns are kept)")
    score.add_argument("--out", required=True, help="where to write the predictions (CSV)")
    score.add_argument("--model-uri", help="another registered model, e.g. models:/<name>@challenger")
    with_params(sub.add_parser("serve", help="serve the scheduled deployments (pipeline + promote) until Ctrl-C"))
    demo = sub.add_parser("demo-data", help="write scikit-learn's digits as the demo raw CSV")
    demo.add_argument("--out", default="data/raw/digits.csv")
    return parser


def _run(args) -> int:
    from distilflow.params import load_params

    params = load_params(args.params, args.overrides)
    root = Path(args.params).resolve().parent
    if args.command == "stage":
        return _stage(args.name, params, root)

    from distilflow.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(root)
    _install_log_filter()
    if args.command in ("promote", "rollback", "audit", "score", "serve"):
        return _registry_command(args, params, root, uri)
    if args.command == "pretrain":
        from flows.pretrain import pretrain

        summary = pretrain(params=params, root=str(root), tracking_uri=uri)
        print(f"done: {summary['uri']} (version {summary['version']}) in {uri}")
        return 0
    from distilflow import uptodate

    if not args.force:
        last = uptodate.last_run(root, uptodate.fingerprint(params, root, uri, args.stop_after))
        if last is not None:
            print(f"up to date: nothing changed since MLflow run {last['run_id']} ({last['at']}) in {uri}; "
                  "`run --force` runs anyway")
            return 0
    from flows.pipeline import pipeline

    summary = pipeline(params=params, root=str(root), tracking_uri=uri, stop_after=args.stop_after)
    uptodate.record_run(root, uptodate.fingerprint(params, root, uri, args.stop_after), summary["run_id"])
    print(f"done: MLflow run {summary['run_id']} in {uri}")
    print("stages: " + ", ".join(f"{k}={v}" for k, v in summary["stages"].items()))
    if "teacher" in summary:
        print(f"teacher test accuracy: {summary['teacher']['test.accuracy']:.4f}")
    for budget, row in (summary.get("transfer_gain") or {}).items():
        print(f"transfer gain at {budget} labels/class: {row['gain']:+.4f} "
              f"(pretrained {row['pretrained']:.4f} vs scratch {row['scratch']:.4f})")
    for budget, row in (summary.get("kd_gain") or {}).items():
        print(f"KD gain, {'all labels' if budget == 'all' else f'{budget} labels/class'}: {row['gain']:+.4f} "
              f"(student with KD {row['kd']:.4f} vs without {row['no_kd']:.4f})")
    if summary.get("compression"):
        print(f"compression report: {root / 'reports/compression.md'}")
    if summary.get("registered"):
        reg = summary["registered"]
        state = "unchanged since the last run" if reg["unchanged"] else "@challenger"
        print(f"registered: {reg['model']} version {reg['version']} ({state}); review with `make ui`, "
              "then `make promote`")
    return 0


def _registry_command(args, params, root: Path, uri: str) -> int:
    from flows import registry as flows

    if args.command == "promote":
        result = flows.promote(params=params, root=str(root), tracking_uri=uri, actor=args.by)
        print(f"{result['decision']}: {result['model']} v{result['version']} ({result['reasons']})")
    elif args.command == "rollback":
        flows.rollback(params=params, root=str(root), tracking_uri=uri, reason=args.reason, actor=args.by)
    elif args.command == "score":
        flows.score(params=params, root=str(root), tracking_uri=uri, source=args.input, out=args.out,
                    model_uri=args.model_uri)
    elif args.command == "audit":
        from distilflow.tracking import Tracker
        from tasks.registry import audit_trail

        rows = audit_trail(Tracker(uri, root), None if args.all else params.registered_model())
        print("at (UTC)            | model | action | version | from | decision | by | reason")
        for r in rows:
            previous = "-" if r["from_version"] in (None, "none") else f"v{r['from_version']}"
            print(f"{r['at']} | {r['model']} | {r['action']} | v{r['version']} | {previous} | "
                  f"{r['decision'] or '-'} | {r['by']} | {r['reason']}")
        if not rows:
            print("(no promotions or rollbacks yet)")
    else:
        from flows.deployments import serve

        serve(params, args.params)
    return 0


def _stage(name: str, params, root: Path) -> int:
    from distilflow.layout import Layout
    from tasks import data

    layout = Layout(root)
    if name == "ingest":
        info = data.ingest_stage(layout.resolve(params.data.source), layout.ingested, params.data)
    elif name == "clean":
        report = data.clean_stage(layout.ingested, layout.cleaned, layout.cleaning_report, params.clean, params.data,
                                  params.split.n_parts)
        if report["rare_classes_dropped"]:
            print(f"warning: dropped classes too small to stratify (class: rows): {report['rare_classes_dropped']}",
                  file=sys.stderr)
        info = {k: report[k] for k in ("rows_in", "rows_out")}
    elif name == "split":
        info = data.split_stage(layout.cleaned, layout.split_dir, layout.split_report, params.split, params.seed)["sizes"]
    else:
        info = data.normalize_stage(layout.split("train"), layout.preprocessor, params.normalize.method,
                                    params.data.image_shape)
    print(f"{name}: {info}")
    return 0


def _interrupt_on_sigterm() -> None:
    """A scheduler's SIGTERM unwinds like Ctrl-C, so MLflow runs are closed as KILLED."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_environment()
    _interrupt_on_sigterm()
    try:
        if args.command == "demo-data":
            from tasks.data import export_digits

            print(f"wrote {export_digits(args.out)}")
            return 0
        return _run(args)
    except DistilflowError as exc:
        print(f"distilflow: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("distilflow: interrupted", file=sys.stderr)
        return 130
