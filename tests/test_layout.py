"""The catalog (distilflow/layout.py) and the settings (distilflow/settings.py) are the only places that name
the project's default paths and read the environment: the code says so when scanned."""

import ast
import re
from pathlib import Path

import pytest

from distilflow.layout import PATHS, Layout
from distilflow.settings import ENV, Settings
from distilflow.uris import parse_models_uri, sqlite_path, sqlite_uri
from tests.conftest import REPO

PACKAGES = ("distilflow", "tasks", "flows", "cli", "stack", "bench")
# every catalog entry: a module names a path by its catalog name, never by spelling it
DEFAULTS = tuple(PATHS)


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module, docstrings left out (they describe the layout; code must not spell it)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def _sources():
    return [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py")) if "results" not in p.parts]


def test_no_module_but_the_catalog_spells_a_default_path():
    spelled = []
    for path in _sources():
        if path == REPO / "distilflow/layout.py":
            continue
        for line, text in _code_strings(path):
            for name in DEFAULTS:
                if re.search(rf"(^|[/'\" ]){re.escape(PATHS[name])}($|[/'\" ])", text):
                    spelled.append(f"{path.relative_to(REPO)}:{line} spells {PATHS[name]!r} ({name})")
    assert not spelled, "\n".join(spelled)


def test_no_module_but_the_settings_names_the_clients_environment():
    named = []
    for path in _sources():
        if path == REPO / "distilflow/settings.py":
            continue
        for line, text in _code_strings(path):
            named += [f"{path.relative_to(REPO)}:{line} names ${v}" for v in ENV.values() if text == v]
    assert not named, "\n".join(named)


def test_the_core_and_the_stages_never_read_the_environment():
    readers = []
    for pkg in ("distilflow", "tasks", "flows"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            if path.name == "settings.py" and pkg == "distilflow":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                    readers.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not readers, readers


def test_the_makefile_makes_the_catalogs_demo_data():
    makefile = (REPO / "Makefile").read_text()
    assert f"\n{PATHS['demo_data']}: " in makefile and f"data: {PATHS['demo_data']}" in makefile


def test_settings_come_from_the_environment_and_empty_means_the_default(tmp_path):
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "PREFECT_API_URL": "", "DISTILFLOW_DASK_ADDRESS": "x:1"}
    settings = Settings.from_env(env)
    assert settings == Settings(tracking_uri="http://127.0.0.1:5000", dask_address="x:1")
    layout = Layout(tmp_path)
    assert layout.tracking_uri(settings.tracking_uri) == "http://127.0.0.1:5000"
    assert sqlite_path(layout.tracking_uri(Settings.from_env({}).tracking_uri)) == tmp_path / "mlflow.db"


def test_one_resolver_for_sqlite_and_models_uris(tmp_path):
    assert sqlite_path(sqlite_uri(tmp_path / "a.db")) == tmp_path / "a.db"
    assert sqlite_path("postgresql://u:p@db/mlflow") is None and sqlite_path("http://x") is None
    assert parse_models_uri("models:/m@champion") == ("m", "champion", None)
    assert parse_models_uri("models:/m/3") == ("m", None, "3")
    for bad in ("models:/m", "models:/@a", "runs:/x/model", "models:/a/b@c"):
        with pytest.raises(Exception, match="not a registered model URI"):
            parse_models_uri(bad)


def test_study_and_trial_folders_are_under_the_catalogs_studies(tmp_path):
    layout = Layout(tmp_path)
    assert layout.trial("s.v2", 7) == tmp_path / ".distilflow/search/s.v2/trial-0007"
    assert layout.study_inputs("s.v2").parent == layout.study("s.v2") and layout.study("s").parent == layout.studies
