"""The recorder: requests hand it their token counts; it buffers them and flushes to the database.

Every finished request counts once in `requests` (totals and its minute of the time series),
whether or not its reply reported tokens; one that reported none also counts in `incomplete`.

Timestamps are computed before the buffer lock is taken (one clock read per request,
rounded down to the UTC minute). The buffers are swapped under the lock and written
outside it, in one transaction of atomic upserts (`col = col + excluded.col`), so several
router processes on one PostgreSQL never lose an update. A failed flush puts the swapped
numbers back and is retried; nothing is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connection, transaction

from routing.auth.principal import Principal
from routing.core.events import Signal
from routing.engine.accounting import Counts
from routing.observability.locks import TimedLock
from stats.models import TokenTimeSeries, TokenTotal

log = logging.getLogger("stats.recorder")

Pair = tuple[str, str]  # (endpoint url, model)
# (endpoint url, model, client, requested model or ""): what the database keeps apart
Row = tuple[str, str, str, str]
Minute = tuple[str, str, str, str, datetime]


def minute_of(now: datetime) -> datetime:
    return now.replace(second=0, microsecond=0)


class Recorder:
    def __init__(self) -> None:
        self._lock = TimedLock("recorder")
        # pending writes: (endpoint, model, client, requested) -> [input, output, requests, incomplete]
        self._totals_buf: dict[Row, list[int]] = {}
        # pending writes: (endpoint, model, client, requested, minute) -> [input, output, requests]
        self._series_buf: dict[Minute, list[int]] = {}
        # swapped out by a flush that has not committed yet
        self._inflight: dict[Row, list[int]] = {}
        # what the database held at the last read (start, and after every flush); with
        # the pending numbers above it gives exact live totals. Several processes share
        # the database, so the page sums the newest database read and each one's pending.
        self._db_totals: dict[Row, list[int]] = {}
        self.db_read_at = 0.0
        # Sent (outside the lock) after every change of the numbers (a request, a database read).
        self.changed: Signal[[]] = Signal("recorder.changed")
        self.flushes = 0
        self.failed_flushes = 0
        self.reread_every = 5.0  # seconds between database re-reads while idle
        self._flush_lock: asyncio.Lock | None = None

    # An accounting sink (routing/engine/accounting.py), installed by StatsConfig.ready. Rows are
    # kept per client, the principal's name, and per model asked for when another one served
    # (`requested`: an alias, a fallback's origin); the token metrics are routing's own sink.
    def record(
        self, principal: Principal, endpoint: str, model: str, counts: Counts, *, requested: str = ""
    ) -> None:
        """One request whose reply reported its token counts."""
        row = (endpoint, model, principal.name, requested)
        self._count(row, counts.prompt, counts.completion, incomplete=0)
        self.changed.send()

    def incomplete(
        self, principal: Principal, endpoint: str, model: str, *, requested: str = "", estimate: int = 0
    ) -> None:
        """One request whose reply ended without counts (the server reported no usage, or the
        reply was cut): counted as a request, in the totals and its minute, and in
        `incomplete`; no tokens invented."""
        self._count((endpoint, model, principal.name, requested), 0, 0, incomplete=1)
        self.changed.send()

    def _count(self, key: Row, inp: int, out: int, *, incomplete: int) -> None:
        minute = (*key, minute_of(datetime.now(tz=UTC)))  # outside the lock
        with self._lock:
            self._add(self._totals_buf, key, inp, out, 1, incomplete)
            row = self._series_buf.get(minute)
            if row is None:
                self._series_buf[minute] = [inp, out, 1]
            else:
                row[0] += inp
                row[1] += out
                row[2] += 1

    @staticmethod
    def _add(table: dict[Any, list[int]], key: Any, inp: int, out: int, req: int, inc: int) -> None:
        row = table.get(key)
        if row is None:
            table[key] = [inp, out, req, inc]
        else:
            row[0] += inp
            row[1] += out
            row[2] += req
            row[3] += inc

    def totals(self) -> dict[Pair, tuple[int, int, int]]:
        """Live totals (input, output, total) per pair, including what is not flushed yet."""
        db, pending = self.parts()
        merged: dict[Pair, list[int]] = {k: list(v) for k, v in db.items()}
        for pair, row in pending.items():
            self._add(merged, pair, *row)
        return {k: (v[0], v[1], v[0] + v[1]) for k, v in merged.items()}

    def parts(self, client: str | None = None) -> tuple[dict[Pair, list[int]], dict[Pair, list[int]]]:
        """(database totals at the last read, this process's numbers not in that read), per
        (endpoint, model): summed over clients, or of `client` alone."""
        db: dict[Pair, list[int]] = {}
        pending: dict[Pair, list[int]] = {}
        with self._lock:
            for (endpoint, model, who, _asked), row in self._db_totals.items():
                if client is None or who == client:
                    self._add(db, (endpoint, model), *row)
            for table in (self._inflight, self._totals_buf):
                for (endpoint, model, who, _asked), row in table.items():
                    if client is None or who == client:
                        self._add(pending, (endpoint, model), *row)
        return db, pending

    def client_parts(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """As `parts`, per client: (database totals at the last read, this process's numbers not in
        that read), each client -> [input, output, requests, incomplete]."""
        db: dict[str, list[int]] = {}
        pending: dict[str, list[int]] = {}
        with self._lock:
            for (_endpoint, _model, who, _asked), row in self._db_totals.items():
                self._add(db, who, *row)
            for table in (self._inflight, self._totals_buf):
                for (_endpoint, _model, who, _asked), row in table.items():
                    self._add(pending, who, *row)
        return db, pending

    def client_totals(self) -> dict[str, tuple[int, int, int, int]]:
        """Live totals per client: (input, output, total tokens, requests), the last database read
        plus this process's pending numbers."""
        merged: dict[str, list[int]] = {}
        with self._lock:
            for table in (self._db_totals, self._inflight, self._totals_buf):
                for (_endpoint, _model, who, _asked), row in table.items():
                    self._add(merged, who, *row)
        return {k: (v[0], v[1], v[0] + v[1], v[2]) for k, v in sorted(merged.items())}

    def pending(self) -> int:
        with self._lock:
            return len(self._totals_buf) + len(self._series_buf)

    # -- flushing --------------------------------------------------------------------
    def _swap(self) -> tuple[dict[Row, list[int]], dict[Minute, list[int]]]:
        with self._lock:
            totals, self._totals_buf = self._totals_buf, {}
            series, self._series_buf = self._series_buf, {}
            self._inflight = totals
        return totals, series

    def _put_back(self, totals: dict[Row, list[int]], series: dict[Minute, list[int]]) -> None:
        with self._lock:
            self._inflight = {}
            for pair, row in totals.items():
                self._add(self._totals_buf, pair, *row)
            for key, srow in series.items():
                cur = self._series_buf.get(key)
                if cur is None:
                    self._series_buf[key] = srow
                else:
                    for i in range(3):
                        cur[i] += srow[i]

    def flush_sync(self) -> int:
        """Write what is buffered; returns the number of rows upserted. Raises on failure
        after putting the numbers back."""
        totals, series = self._swap()
        if not totals and not series:
            return 0
        try:
            write(totals, series)
        except Exception:
            self._put_back(totals, series)
            self.failed_flushes += 1
            raise
        self.flushes += 1
        try:
            self.load_totals()  # the committed numbers now come from the database
        except Exception:
            # Keep counting them as pending until a read succeeds: never shown twice or lost.
            log.warning("could not re-read token totals after a flush", exc_info=True)
            with self._lock:
                for pair, row in totals.items():
                    self._add(self._db_totals, pair, *row)
                self._inflight = {}
        return len(totals) + len(series)

    async def flush(self) -> int:
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        async with self._flush_lock:  # one flush at a time per process, keeps order simple
            return await sync_to_async(self._flush_in_thread, thread_sensitive=False)()

    def _flush_in_thread(self) -> int:
        close_old_connections()
        try:
            rows = self.flush_sync()
            if rows == 0 and time.time() - self.db_read_at >= self.reread_every:
                # Idle here, but other router processes may have written: keep the
                # database part of the live totals current for the page.
                self.load_totals()
            return rows
        finally:
            close_old_connections()

    async def run(self, interval: float) -> None:
        """The background flusher. Survives database outages by retrying with backoff."""
        self.reread_every = max(interval, 1.0)
        delay = interval
        while True:
            await asyncio.sleep(delay)
            try:
                await self.flush()
                delay = interval
            except Exception:
                log.exception("token flush failed; will retry (nothing is lost)")
                delay = min(max(interval, 1.0) * 2, 30.0)

    def load_totals(self) -> None:
        """Start from what the database holds, so live numbers continue across restarts."""
        rows = TokenTotal.objects.all().values_list(
            "endpoint",
            "model",
            "client",
            "requested_model",
            "input_tokens",
            "output_tokens",
            "requests",
            "incomplete",
        )
        fresh = {(r[0], r[1], r[2], r[3]): [r[4], r[5], r[6], r[7]] for r in rows}
        with self._lock:
            self._db_totals = fresh
            self._inflight = {}  # committed before this read, so included in it
            self.db_read_at = time.time()
        self.changed.send()

    def clear(self) -> None:
        with self._lock:
            self._totals_buf.clear()
            self._series_buf.clear()
            self._inflight.clear()
            self._db_totals.clear()
        self._flush_lock = None


def write(totals: dict[Row, list[int]], series: dict[Minute, list[int]]) -> None:
    tt = connection.ops.quote_name(TokenTotal._meta.db_table)
    ts = connection.ops.quote_name(TokenTimeSeries._meta.db_table)
    with transaction.atomic(), connection.cursor() as cursor:
        if totals:
            cursor.executemany(
                f"INSERT INTO {tt} (endpoint, model, client, requested_model, input_tokens, output_tokens,"
                " total_tokens, requests, incomplete) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (endpoint, model, client, requested_model) DO UPDATE SET"
                f" input_tokens = {tt}.input_tokens + excluded.input_tokens,"
                f" output_tokens = {tt}.output_tokens + excluded.output_tokens,"
                f" total_tokens = {tt}.total_tokens + excluded.total_tokens,"
                f" requests = {tt}.requests + excluded.requests,"
                f" incomplete = {tt}.incomplete + excluded.incomplete",
                [
                    (e, m, c, q, r[0], r[1], r[0] + r[1], r[2], r[3])
                    for (e, m, c, q), r in sorted(totals.items())
                ],
            )
        if series:
            adapt = connection.ops.adapt_datetimefield_value
            cursor.executemany(
                f"INSERT INTO {ts} (endpoint, model, client, requested_model, input_tokens, output_tokens,"
                " total_tokens, requests, timestamp) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (model, timestamp, endpoint, client, requested_model) DO UPDATE SET"
                f" input_tokens = {ts}.input_tokens + excluded.input_tokens,"
                f" output_tokens = {ts}.output_tokens + excluded.output_tokens,"
                f" total_tokens = {ts}.total_tokens + excluded.total_tokens,"
                f" requests = {ts}.requests + excluded.requests",
                [
                    (e, m, c, q, r[0], r[1], r[0] + r[1], r[2], adapt(t))
                    for (e, m, c, q, t), r in sorted(series.items())
                ],
            )


recorder = Recorder()
