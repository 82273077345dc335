"""A dependency that fails (Redis, the channel layer) is logged once, not on every call; one
that hangs is not asked again for a while.

`Outage(log, "could not ...")`: `failed(exc)` logs a warning with the cause the first time and
then stays quiet until `ok()` is called, which logs one line that it works again. Callers call
`ok()` after each success (a comparison of one bool when nothing changed).

A call that timed out (a dependency that accepts connections and never answers) costs its
caller the whole timeout. After one, `suspended()` is True for RETRY_AFTER seconds: callers
take their fallback at once instead of waiting for the next timeout, and the first call after
that tries again. A refused connection fails fast and suspends nothing. The Outages of one
dependency share one `Suspension` (routing/core/redis.py `suspension` for Redis): a timeout of
any of its callers spares all the others, a success of any ends it.

Only one event loop's code, or threads that tolerate it, call a given Outage: its fields are
single assignments, and a lost race between threads would at worst log one line twice or try
one call more.
"""

from __future__ import annotations

import logging
import time

RETRY_AFTER = 5.0  # seconds a dependency that timed out is not asked


def timed_out(exc: BaseException | None) -> bool:
    """Whether `exc` is a timeout: the builtin TimeoutError (asyncio's since 3.11) or a client's
    own (redis-py's redis.exceptions.TimeoutError)."""
    return isinstance(exc, TimeoutError) or type(exc).__name__ == "TimeoutError"


class Suspension:
    """When a dependency last timed out (monotonic seconds), None: not since its last success."""

    def __init__(self) -> None:
        self.timed_out_at: float | None = None

    def active(self) -> bool:
        at = self.timed_out_at
        return at is not None and time.monotonic() - at < RETRY_AFTER


class Outage:
    def __init__(self, log: logging.Logger, message: str, suspension: Suspension | None = None) -> None:
        self._log = log
        self._message = message
        self.down = False
        self._suspension = suspension if suspension is not None else Suspension()

    def failed(self, exc: BaseException | None = None) -> None:
        """A call failed: a warning with `exc`'s traceback unless one was logged since the last
        `ok`; a timeout suspends calls for RETRY_AFTER seconds."""
        if timed_out(exc):
            self._suspension.timed_out_at = time.monotonic()
        if not self.down:
            self.down = True
            self._log.warning("%s (logged once until it works again)", self._message, exc_info=exc)

    def ok(self) -> None:
        """A call succeeded: the next failure is logged again."""
        self._suspension.timed_out_at = None
        if self.down:
            self.down = False
            self._log.info("%s: works again", self._message)

    def suspended(self) -> bool:
        """Whether a call timed out less than RETRY_AFTER seconds ago, with no success since (take
        the fallback)."""
        return self._suspension.active()
