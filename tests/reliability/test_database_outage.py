"""The database briefly unavailable: no token is lost or counted twice, flushes are retried,
and routing goes on with the endpoint list the router already has.

Unit level on stats/recorder.py and routing/fleet/registry.py (a write or read that raises), and,
when the suite runs on PostgreSQL, end to end with a real outage: the router reaches the
database through a TCP relay that the test cuts and restores.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError
from django.db.models import Sum

from routing.auth.principal import ANONYMOUS
from routing.engine.accounting import Counts
from routing.fleet import registry as registry_module
from routing.fleet.registry import EndpointInfo, Registry
from stats import recorder as recorder_module
from stats.models import TokenTimeSeries, TokenTotal
from stats.recorder import Recorder
from tests.conftest import free_port
from tests.reliability.support import MODEL_KEY, PROMPT_TOKENS, Totals, chat_body, wait_db_totals

URL = "http://gpu-1:11434"
OTHER = "http://gpu-2:11434"


def stored() -> dict[tuple[str, str], tuple[int, int, int, int, int]]:
    return {
        (r.endpoint, r.model): (r.input_tokens, r.output_tokens, r.total_tokens, r.requests, r.incomplete)
        for r in TokenTotal.objects.all()
    }


def stored_series() -> tuple[int, int, int, int]:
    sums = TokenTimeSeries.objects.aggregate(
        i=Sum("input_tokens"), o=Sum("output_tokens"), t=Sum("total_tokens"), r=Sum("requests")
    )
    return (sums["i"] or 0, sums["o"] or 0, sums["t"] or 0, sums["r"] or 0)


@pytest.mark.django_db(transaction=True)
def test_it_puts_the_counts_back_and_writes_them_exactly_once_after_a_failed_flush(monkeypatch):
    rec = Recorder()
    real_write = recorder_module.write
    calls = 0

    def write_once_unavailable(totals, series):
        nonlocal calls
        calls += 1
        if calls == 1:
            # requests go on while the write hangs and fails; live totals stay exact meanwhile
            rec.record(ANONYMOUS, URL, MODEL_KEY, Counts(1, 2))
            assert rec.totals() == {(URL, MODEL_KEY): (31, 44, 75), (OTHER, MODEL_KEY): (4, 0, 4)}
            raise OperationalError("the database system is shutting down")
        real_write(totals, series)

    monkeypatch.setattr(recorder_module, "write", write_once_unavailable)
    for _ in range(3):
        rec.record(ANONYMOUS, URL, MODEL_KEY, Counts(10, 14))
    rec.incomplete(ANONYMOUS, URL, MODEL_KEY)
    rec.record(ANONYMOUS, OTHER, MODEL_KEY, Counts(4, 0))
    with pytest.raises(OperationalError):
        rec.flush_sync()
    assert rec.failed_flushes == 1 and rec.flushes == 0
    assert stored() == {}
    assert rec.totals() == {(URL, MODEL_KEY): (31, 44, 75), (OTHER, MODEL_KEY): (4, 0, 4)}
    assert rec.flush_sync() > 0
    # the request without counts counts as a request (totals and its minute), with no tokens
    assert stored() == {(URL, MODEL_KEY): (31, 44, 75, 5, 1), (OTHER, MODEL_KEY): (4, 0, 4, 1, 0)}
    assert stored_series() == (35, 44, 79, 6)
    # the committed numbers now come from the database: shown once, written once
    assert rec.totals() == {(URL, MODEL_KEY): (31, 44, 75), (OTHER, MODEL_KEY): (4, 0, 4)}
    assert rec.flush_sync() == 0
    assert stored() == {(URL, MODEL_KEY): (31, 44, 75, 5, 1), (OTHER, MODEL_KEY): (4, 0, 4, 1, 0)}


@pytest.mark.django_db(transaction=True)
def test_it_neither_loses_nor_double_counts_when_rereading_the_totals_fails(monkeypatch):
    rec = Recorder()
    real_load = rec.load_totals
    calls = 0

    def load_once_unavailable() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OperationalError("connection lost")
        real_load()

    monkeypatch.setattr(rec, "load_totals", load_once_unavailable)
    rec.record(ANONYMOUS, URL, MODEL_KEY, Counts(3, 5))
    rec.flush_sync()  # written; the read-back fails
    assert stored() == {(URL, MODEL_KEY): (3, 5, 8, 1, 0)}
    assert rec.totals() == {(URL, MODEL_KEY): (3, 5, 8)}
    rec.record(ANONYMOUS, URL, MODEL_KEY, Counts(1, 1))
    assert rec.totals() == {(URL, MODEL_KEY): (4, 6, 10)}
    rec.flush_sync()
    assert stored() == {(URL, MODEL_KEY): (4, 6, 10, 2, 0)}
    assert rec.totals() == {(URL, MODEL_KEY): (4, 6, 10)}


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(30)
def test_it_retries_a_failed_flush_in_the_background_until_the_database_is_back(monkeypatch):
    rec = Recorder()
    real_write = recorder_module.write
    failures = [OperationalError("could not connect to server: Connection refused")]

    def write(totals, series):
        if failures:
            raise failures.pop()
        real_write(totals, series)

    monkeypatch.setattr(recorder_module, "write", write)
    for _ in range(5):
        rec.record(ANONYMOUS, URL, MODEL_KEY, Counts(2, 3))

    async def scenario() -> None:
        flusher = asyncio.create_task(rec.run(0.05))
        try:
            async with asyncio.timeout(15):
                while not await sync_to_async(stored, thread_sensitive=False)():
                    await asyncio.sleep(0.05)
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher

    asyncio.run(scenario())
    assert rec.failed_flushes == 1 and rec.flushes == 1
    assert stored() == {(URL, MODEL_KEY): (10, 15, 25, 5, 0)}
    assert stored_series() == (10, 15, 25, 5)


def test_it_keeps_routing_with_the_endpoints_it_knows_while_the_database_is_unavailable(
    monkeypatch, settings
):
    settings.ROUTER_REGISTRY_RELOAD = 0  # every call wants a fresh copy
    known = (EndpointInfo(1, "gpu-1", URL, "ollama", "", True, 2),)
    later = (*known, EndpointInfo(2, "gpu-2", OTHER, "ollama", "", True, 1))
    answers: list[object] = [known, OperationalError("connection refused"), later]

    def load_endpoints() -> tuple[EndpointInfo, ...]:
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    monkeypatch.setattr(registry_module, "load_endpoints", load_endpoints)
    registry = Registry()

    async def scenario() -> list[tuple[EndpointInfo, ...]]:
        return [await registry.all(), await registry.all(), await registry.all()]

    first, during, after = asyncio.run(scenario())
    assert first == known
    assert during == known  # the last copy, not an error for every request
    assert after == later


# --------------------------------------------------------------------------- PostgreSQL


class TcpRelay:
    """A loopback TCP relay to the database. `cut()` drops every connection through it and
    refuses new ones (as a database restart or a network outage would); `restore()` ends that."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.restore()

    def _call(self, coro) -> None:  # type: ignore[no-untyped-def]
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()

    def restore(self) -> None:
        self._call(self._start())

    def cut(self) -> None:
        self._call(self._cut())

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def _postgres() -> bool:
    from django.conf import settings

    return settings.DATABASES["default"]["ENGINE"].endswith("postgresql")


@pytest.mark.skipif(not _postgres(), reason="a real outage needs PostgreSQL (make test-postgres)")
@pytest.mark.timeout(60)
def test_it_loses_no_token_and_keeps_routing_through_a_postgresql_outage(fakes, endpoint, router):
    from django.conf import settings

    db = settings.DATABASES["default"]
    relay = TcpRelay(int(db.get("PORT") or 5432))
    try:
        fake = fakes(models=[MODEL_KEY], tokens=3)
        endpoint(fake.url, name="solo", max_concurrent_connections=2)
        user = db.get("USER") or "postgres"
        auth = f"{user}:{db['PASSWORD']}" if db.get("PASSWORD") else user
        server = router(DATABASE_URL=f"postgres://{auth}@127.0.0.1:{relay.port}/{db['NAME']}")

        def chat(n: int) -> None:
            for _ in range(n):
                response = httpx.post(server.url + "/api/chat", json=chat_body(stream=False), timeout=10)
                assert response.status_code == 200, response.text

        chat(5)
        wait_db_totals(Totals(5 * PROMPT_TOKENS, 15, 5, 0), settle=False)
        relay.cut()
        chat(10)  # routing does not need the database
        time.sleep(2.5)  # flushes fail meanwhile, and registry reloads
        assert "token flush failed" in server.log()
        chat(5)
        relay.restore()
        wait_db_totals(Totals(20 * PROMPT_TOKENS, 60, 20, 0), timeout=20)
        assert stored_series() == (20 * PROMPT_TOKENS, 60, 20 * (PROMPT_TOKENS + 3), 20)
    finally:
        relay.close()
