"""The one exception type users see.

Every check at a boundary (params, input data, model specs) raises
`DistilflowError` with a message that names the offending thing and, where
there is one, the fix. The CLI prints that message alone and exits non-zero.
"""


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
