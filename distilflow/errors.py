"""The one exception type users see.

Every check at a boundary (params, input data, model specs) raises
`DistilflowError` with a message that names the offending thing and, where
there is one, the fix. The CLI prints that message alone and exits non-zero.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class DistilflowError(Exception):
    """A user-facing error: bad params, bad input data, an unusable spec."""


def quiet_user_error_tracebacks() -> None:
    """Log a DistilflowError (or Ctrl-C) as its one line, without the traceback Prefect attaches to task failures.

    Installed by the CLI, and in every process that runs tasks for it (a search's trial workers).
    """
    import logging

    class _NoUserTracebacks(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and isinstance(record.exc_info[1], (DistilflowError, KeyboardInterrupt)):
                record.exc_info, record.exc_text = None, None
            return True

    flt = _NoUserTracebacks()
    for name in ("", "prefect", "prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        logger.addFilter(flt)
        for handler in logger.handlers:
            handler.addFilter(flt)


def one_line_errors(run: Callable[[], int], errors: type | tuple[type, ...], interrupted: str = "interrupted") -> int:
    """`run()`'s exit code; a user error (`errors`) is one `distilflow: error:` line and 1, Ctrl-C one line and 130.

    The one error handler of the project's command lines (the CLI and `python -m stack`); credentials in a
    message are hidden (distilflow/redact.py).
    """
    from distilflow.redact import redact

    try:
        return run()
    except errors as exc:
        print(f"distilflow: error: {redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"distilflow: {interrupted}", file=sys.stderr)
        return 130
