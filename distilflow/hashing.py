"""The one hashing helper: content hashes of files, folders, tables and params."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

_CHUNK = 1 << 20


def file_md5(path: str | Path) -> str:
    """MD5 of a file's bytes: the same digest DVC records for a file."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


_MD5_MEMO: dict[tuple, str] = {}


def _memo_md5(path: Path) -> str:
    """file_md5, remembered per (file, inode, size, mtime): the model stages' cache keys re-hash the same splits.

    Our writers replace files atomically (a new inode), so a changed file never
    matches a remembered key.
    """
    st = path.stat()
    # ctime too: writing a file in place and putting its mtime back still moves its ctime
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _MD5_MEMO:
        _MD5_MEMO[key] = file_md5(path)
    return _MD5_MEMO[key]


def path_hash(path: str | Path) -> str:
    """Content hash of a file, or of every file below a folder (names included)."""
    path = Path(path)
    if path.is_file():
        return _memo_md5(path)
    h = hashlib.md5()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(_memo_md5(p).encode())
    return h.hexdigest()


def text_hash(text: str) -> str:
    """SHA-256 of a string (code, keys)."""
    return hashlib.sha256(text.encode()).hexdigest()


def params_hash(obj: Any) -> str:
    """Hash of a JSON-able object (a params section), independent of key order."""
    return text_hash(json.dumps(obj, sort_keys=True, default=str))[:16]


def frame_hash(df: pd.DataFrame) -> str:
    """Hash of a table's values and column names, independent of file format.

    Uses pandas' row hashes (little-endian uint64 everywhere), so the same rows
    give the same hash on every machine, whatever the parquet writer version.
    """
    h = hashlib.sha256()
    h.update(json.dumps([str(c) for c in df.columns]).encode())
    h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]
