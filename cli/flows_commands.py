"""The commands that run a Prefect flow (on the configured API or a temporary one): run, search, pretrain, promote."""

from __future__ import annotations

from pathlib import Path

from distilflow.settings import Settings


def run(args, params, root: Path, uri, settings: Settings) -> int:
    """`distilflow run`: the pipeline flow, then its record in dvc.lock and the up-to-date stamp."""
    from cli.dvc_sync import record_run_in_dvc
    from cli.report import print_run
    from distilflow import uptodate
    from flows.pipeline import pipeline

    summary = pipeline(
        params=params,
        root=str(root),
        tracking_uri=uri,
        stop_after=args.stop_after,
        overrides=args.overrides,
        prefect_ui=bool(settings.prefect_api_url),
    )
    print_run(summary, root, uri.get_secret_value())
    print(record_run_in_dvc(params, root, args.overrides, args.stop_after))
    fingerprint = lambda content: uptodate.fingerprint(  # noqa: E731
        params, root, uri.get_secret_value(), args.stop_after, settings.prefect_api_url, content=content
    )
    uptodate.record_run(root, fingerprint(False), summary["run_id"], fingerprint(True))
    return 0


def search(args, params, root: Path, uri, settings: Settings) -> int:
    """`distilflow search` (params already sent to $DISTILFLOW_DASK_ADDRESS): the storage URL goes in as a secret,
    the params Prefect and MLflow record keep it without its password."""
    from pydantic import SecretStr

    from cli.report import print_search
    from distilflow.layout import Layout
    from distilflow.params import raw_params
    from distilflow.redact import redact
    from flows.search import run_search
    from tasks.search.study import storage_url

    storage = storage_url(params, Layout(root), settings)
    if params.search.storage:
        params = params.with_values({"search.storage": redact(params.search.storage)})
    summary = run_search(
        params,
        root=str(root),
        tracking_uri=uri,
        storage=SecretStr(storage),
        raw_params=raw_params(args.params, args.overrides),
    )
    print_search(summary, uri.get_secret_value())
    return 0


def pretrain(params, root: Path, uri) -> int:
    """`distilflow pretrain`: the MNIST backbone, registered as `@pretrained`."""
    from flows.pretrain import pretrain as pretrain_flow

    summary = pretrain_flow(pretrain_params=params.pretrain, seed=params.seed, root=str(root), tracking_uri=uri)
    print(f"done: {summary['uri']} (version {summary['version']})")
    return 0


def registry(args, params, root: Path, uri) -> int:
    """`distilflow promote` and `distilflow rollback`."""
    from flows import registry as flows

    if args.command == "promote":
        result = flows.promote(params=params, root=str(root), tracking_uri=uri, actor=args.by, version=args.version)
        print(f"{result['decision']}: {result['model']} v{result['version']} ({result['reasons']})")
    else:
        flows.rollback(params=params, root=str(root), tracking_uri=uri, reason=args.reason, actor=args.by)
    return 0
