"""The commands that need no Prefect API: one stage, dvc.yaml, batch scoring, the audit trail, serving a model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from distilflow.errors import DistilflowError
from distilflow.layout import Layout
from distilflow.redact import redact
from distilflow.settings import ENV


def up_to_date(args, params, root: Path, uri: str, prefect_api_url: str | None) -> bool:
    """`run` with nothing changed since the last complete run: say so (distilflow/uptodate.py) and return True."""
    from distilflow import uptodate

    if args.check:  # bytes, not size and modification time: an in-place overwrite does not fool it
        current = uptodate.fingerprint(params, root, uri, args.stop_after, prefect_api_url, content=True)
        last = uptodate.last_run(root, current, key="content")
    else:
        last = uptodate.last_run(root, uptodate.fingerprint(params, root, uri, args.stop_after, prefect_api_url))
    if last is None:
        return False
    print(
        f"up to date: nothing changed since MLflow run {last['run_id']} ({last['at']}) in {redact(uri)}; "
        "`run --force` runs anyway"
    )
    return True


def score(args, params, root: Path, uri: str) -> int:
    """Batch scoring with the champion (or --model-uri), without Prefect: a few rows score in seconds."""
    from distilflow.tracking import Tracker
    from tasks.registry.scoring import score_registered

    result = score_registered(Tracker(uri, root), params, Layout(root), args.input, args.out, args.model_uri)
    print(f"scored {result['rows']} rows with {result['model_uri']} → {result['output']}")
    return 0


def serve_model(args, params, root: Path, uri: str) -> int:
    """`mlflow models serve` with this environment's bin/ on PATH (it runs `uvicorn` from there) and our store."""
    from distilflow.tracking import Tracker
    from tasks.registry import CHAMPION

    model_uri = args.model_uri or f"models:/{params.registered_model()}@{CHAMPION}"
    if Tracker(uri, root).model_version(model_uri) is None:
        raise DistilflowError(f"{model_uri}: no such registered model version in {redact(uri)} (promote one first)")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", ENV["tracking_uri"]: uri}
    print(f"serving {model_uri} on http://{args.host}:{args.port}/invocations (Ctrl-C stops it)", flush=True)
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["--host", args.host, "--port", str(args.port)]
    return subprocess.run(command, env=env, cwd=root).returncode


def audit(args, params, root: Path, uri: str) -> int:
    """Every promotion and rollback: when, who, which versions, the decision and why."""
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


def stage(name: str, params, root: Path, uri: str) -> int:
    """One stage as dvc.yaml runs it: the same function as the stage's Prefect task, without Prefect or MLflow."""
    from distilflow.stages import BY_NAME
    from tasks.stage_runner import run_plain

    runtime = {}
    if name == "backbone" and params.backbone.spec.startswith("mlflow:"):
        from distilflow.tracking import Tracker
        from flows.pretrain import ensure_pretrained

        runtime = {"tracker": Tracker(uri, root)}
        ensure_pretrained(params, str(root), runtime["tracker"])
    result = run_plain(BY_NAME[name], params, Layout(root), **runtime)
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


def dvc_yaml(params, root: Path, check: bool) -> int:
    """Write dvc.yaml from the stage declarations, or (`check`) say whether it is current."""
    from distilflow.dvcfile import dvc_yaml as render
    from distilflow.io import write_text

    text, path = render(params), root / "dvc.yaml"
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
