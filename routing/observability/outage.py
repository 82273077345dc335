"""A dependency that fails (Redis, the channel layer) is logged once, not on every call.

`Outage(log, "could not ...")`: `failed(exc)` logs a warning with the cause the first time and
then stays quiet until `ok()` is called, which logs one line that it works again. Callers call
`ok()` after each success (a comparison of one bool when nothing changed). Only one event
loop's code calls a given Outage, so its one flag needs no lock; a lost race between threads
would at worst log one line twice.
"""

from __future__ import annotations

import logging


class Outage:
    def __init__(self, log: logging.Logger, message: str) -> None:
        self._log = log
        self._message = message
        self.down = False

    def failed(self, exc: BaseException | None = None) -> None:
        """A call failed: a warning with `exc`'s traceback unless one was logged since the last `ok`."""
        if not self.down:
            self.down = True
            self._log.warning("%s (logged once until it works again)", self._message, exc_info=exc)

    def ok(self) -> None:
        """A call succeeded: the next failure is logged again."""
        if self.down:
            self.down = False
            self._log.info("%s: works again", self._message)
