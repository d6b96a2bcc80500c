"""The one exception type users see.

Every check at a boundary (params, input data, model specs) raises
`DistilflowError` with a message that names the offending thing and, where
there is one, the fix. The CLI prints that message alone and exits non-zero.
"""


class DistilflowError(Exception):
    """A user-facing error: bad params, bad input data, an unusable spec."""
