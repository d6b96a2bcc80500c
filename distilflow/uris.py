"""The one resolver of the URIs the project passes around: `models:/` references and `sqlite:` stores.

Nothing else splits these strings (timm's `parse_model_name` idea): a
registered-model reference is parsed by `parse_models_uri`, and whether a
store is an embedded SQLite file, and where that file is, by `sqlite_path`.
"""

from __future__ import annotations

from pathlib import Path

from distilflow.errors import DistilflowError

SQLITE = "sqlite:///"


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` → (name, alias, None); `models:/name/3` → (name, None, "3")."""
    ref = uri.removeprefix("models:/") if uri.startswith("models:/") else None
    name, sep, alias = (ref or "").partition("@")
    if ref and sep and name and alias and "/" not in name:
        return name, alias, None
    name, _, version = (ref or "").partition("/")
    if ref and name and version.isdigit():
        return name, None, version
    raise DistilflowError(
        f"{uri!r} is not a registered model URI: use models:/<name>@<alias> or models:/<name>/<version>"
    )


def sqlite_uri(path: str | Path) -> str:
    """The SQLAlchemy URI of a SQLite file (absolute: `sqlite:////abs/path`)."""
    return f"{SQLITE}{Path(path).resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The file behind a `sqlite:///` URI; None for any other store (a server, PostgreSQL)."""
    return Path(uri.removeprefix(SQLITE)) if uri.startswith(SQLITE) else None


def is_http(uri: str) -> bool:
    """Whether `uri` names a server reached over HTTP(S) (an MLflow tracking server)."""
    return uri.startswith(("http://", "https://"))
