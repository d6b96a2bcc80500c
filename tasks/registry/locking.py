"""What the registry lock of one model is called, and where its file lives beside an embedded store.

The lock itself (an flock, or a Prefect global concurrency limit on a server)
is taken by flows/locks.py:registry_lock; these names are plain functions so
that the lock of two checkouts with their own stores never collide.
"""

from __future__ import annotations

import re
from pathlib import Path

from distilflow.hashing import text_hash
from distilflow.redact import redact
from distilflow.uris import sqlite_path


def lock_name(model: str, tracking_uri: str) -> str:
    """`distilflow-registry-<model>-<store>`: named after the store it guards (two projects never block each other)."""
    store = text_hash(redact(tracking_uri))[:10]
    return "distilflow-registry-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model) + f"-{store}"


def lock_file(tracking_uri: str, model: str) -> Path | None:
    """The file lock beside an embedded SQLite store; None for a tracking server."""
    db = sqlite_path(tracking_uri)
    return None if db is None else db.with_name(db.name + f".{lock_name(model, tracking_uri)}.lock")
