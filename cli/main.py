"""distilflow: labeled data in, a small, fast model registered in MLflow out.

A `DistilflowError` (bad params, bad data) prints one line and exits 1, with
no traceback; Ctrl-C prints one line and exits 130; anything else is a bug
and keeps its traceback. The environment is read here, once
(distilflow/settings.py), and what it says is passed down.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from distilflow.errors import DistilflowError, one_line_errors, quiet_user_error_tracebacks
from distilflow.layout import Layout
from distilflow.settings import Settings

NO_PREFECT = ("score", "audit", "serve-model")  # commands that answer without the Prefect API


def _quiet_environment() -> None:
    """Offline-safe defaults, set before Prefect or MLflow are imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the first start of the temporary API migrates its database: more than the 30 s default on 2 cores
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _run(args) -> int:
    from cli import commands
    from distilflow.params import load_params

    params = load_params(args.params, args.overrides)
    root = Path(args.params).resolve().parent
    if args.command == "dvc-yaml":
        return commands.dvc_yaml(params, root, args.check)
    settings = Settings.from_env()  # the one read of the environment: everything below gets what it needs
    uri = Layout(root).tracking_uri(settings.tracking_uri)
    if args.command == "stage":
        return commands.stage(args.name, params, root, uri)
    from distilflow.tracking import check_store

    check_store(uri)  # a stopped server or a refused database login: one line within seconds
    if args.command in NO_PREFECT:
        return getattr(commands, args.command.replace("-", "_"))(args, params, root, uri)
    if args.command == "deploy":
        from flows.deployments import deploy_for_worker

        return deploy_for_worker(params, args.params)
    if args.command == "search":  # space, scheduler and storage are checked before any API, run or trial starts
        from tasks.search.study import preflight, storage_url, with_environment

        params = with_environment(params, settings)
        preflight(params, storage_url(params, Layout(root), settings))
    if (
        args.command == "run"
        and not args.force
        and commands.up_to_date(args, params, root, uri, settings.prefect_api_url)
    ):
        return 0
    quiet_user_error_tracebacks()
    if args.command == "serve":
        from flows.deployments import serve

        serve(params, args.params)
        return 0
    from cli.prefect_api import temporary_api

    with temporary_api():
        return _with_prefect(args, params, root, uri, settings)


def _with_prefect(args, params, root: Path, uri: str, settings: Settings) -> int:
    from pydantic import SecretStr  # flows take the tracking URI as a secret: Prefect records it as ********

    from cli import flows_commands

    secret = SecretStr(uri)
    if args.command == "pretrain":
        return flows_commands.pretrain(params, root, secret)
    if args.command in ("promote", "rollback"):
        return flows_commands.registry(args, params, root, secret)
    if args.command == "search":
        return flows_commands.search(args, params, root, secret, settings)
    return flows_commands.run(args, params, root, secret, settings)


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


def _dispatch(args) -> int:
    if args.command == "demo-data":
        from tasks.data import export_digits

        print(f"wrote {export_digits(args.out)}")
        return 0
    if args.command == "add-data":
        from cli.add_data import add_data

        return add_data(args)
    return _run(args)


def main(argv: list[str] | None = None) -> int:
    """Parse, run, and turn errors into one line and an exit code."""
    from cli.parser import build_parser

    args = build_parser(__doc__.split("\n")[0]).parse_args(argv)
    _quiet_environment()
    _interrupt_quietly()
    return one_line_errors(lambda: _dispatch(args), DistilflowError)
