"""Credentials never leave in a printed or recorded URI: `postgresql://user:secret@host/db` → `postgresql://user:***@host/db`."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@/\s]+)@")
_QUERY = re.compile(r"(?i)(?P<key>(?:password|passwd|pwd|token|secret|access_key|secret_key|api_key)=)[^&\s]+")


def redact(text: str) -> str:
    """`text` with every password in a URL's user info, and every password/token query value, replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    return _QUERY.sub(lambda m: f"{m['key']}***", text)
