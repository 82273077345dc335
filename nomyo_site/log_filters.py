"""Logging filters: a client's bad request is one log line, never a traceback.

Django logs a request it refused (a SuspiciousOperation such as TooManyFieldsSent or
DisallowedHost, or a BadRequest) with the exception attached, so the console handler
would print a full traceback for every hostile request: log flooding is a cost too. The
filter keeps the record (its message says what was wrong) and drops the traceback when
the response was a 4xx. Server errors (5xx) keep theirs.
"""

from __future__ import annotations

import logging


class ClientErrorsOnOneLine(logging.Filter):
    """On a handler: records about 4xx responses lose their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        status = getattr(record, "status_code", None)
        if isinstance(status, int) and 400 <= status < 500 and record.exc_info:
            record.exc_info = None
            record.exc_text = None
        return True
