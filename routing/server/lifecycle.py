"""Start-up and shutdown of the router's background work, inside the server's event loop.

Started on the first request at the latest (daphne has no lifespan events; under daphne
`install_daphne_hooks` also starts it as soon as the reactor runs and flushes tokens
before the reactor stops). Under uvicorn the lifespan protocol drives the same functions.

Shutdown drains, as production proxies do. The first SIGTERM or SIGINT starts `drain()`:
`draining` turns true (the lean handler answers new proxied requests 503 with Retry-After,
/health answers 503 "draining" so a load balancer stops sending), the requests in flight
get up to ROUTER_DRAIN_TIMEOUT seconds to finish, then those left are cut (each ends with
its protocol's error, releases its slot and records itself as incomplete), and only then
does the server close its connections and the final token flush run. A second signal
during the drain cuts at once. Under daphne the drain runs in a "before shutdown" trigger
of the reactor (the listening sockets stay open until it ends; daphne's own cancelling of
applications waits for it, see routing/server/daphne_hooks.py); under uvicorn the router's
signal handler runs it first and then hands the signal to uvicorn, whose own shutdown then
finds nothing in flight.

Invariants: `in_flight` holds exactly the tasks of proxied requests being served (the lean
handler adds its task before any await and discards it in `finally`); a task is in `cut`
only if the drain cancelled it; the drain runs at most once per process.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings

log = logging.getLogger("routing.lifecycle")

_started_loop: asyncio.AbstractEventLoop | None = None
_tasks: list[asyncio.Task[None]] = []
_api_key_from_db = ""

# -- drain state (see the module docstring) --------------------------------------------
draining = False
in_flight: set[asyncio.Task[Any]] = set()
cut: set[asyncio.Task[Any]] = set()
_drain_task: asyncio.Task[None] | None = None
_hurry: asyncio.Event | None = None
_stop_signals = 0
_hurried = False  # a second stop signal came (possibly before the drain started)
_uvicorn_stop: asyncio.Task[None] | None = None  # the drain, then uvicorn's own stop
CUT_GRACE = 5.0  # seconds the cut requests get to send their error, release and record


def router_api_key() -> str:
    return settings.ROUTER_API_KEY or _api_key_from_db


def set_db_api_key(key: str) -> None:
    global _api_key_from_db
    _api_key_from_db = key


def ensure_started() -> None:
    """Cheap after the first call in a loop: start the background tasks once per loop."""
    global _started_loop
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    if _started_loop is loop:
        return
    _started_loop = loop
    _tasks.append(loop.create_task(_start()))


async def _start() -> None:
    from routing.fleet import control, health
    from routing.upstream import client
    from stats.publisher import publisher
    from stats.recorder import recorder

    try:
        await sync_to_async(_prepare_database, thread_sensitive=False)()
    except Exception:
        log.exception("could not prepare the database at start-up; continuing")
    loop = asyncio.get_running_loop()
    _tasks.append(loop.create_task(recorder.run(settings.ROUTER_FLUSH_INTERVAL)))
    _tasks.append(loop.create_task(publisher.run()))
    _tasks.append(loop.create_task(control.listen()))
    _tasks.append(loop.create_task(health.watch()))
    # Pre-warm: the first proxied request should not pay for the client; fleet.watch()
    # fills the caches right away.
    client.get_client()
    # Everything loaded so far (Django, the apps, Twisted) lives as long as the process:
    # move it out of the collector's reach, so full collections stay short.
    gc.collect()
    gc.freeze()


def _prepare_database() -> None:
    from django.db import close_old_connections

    from routing.fleet.services import import_config_file
    from routing.models import Endpoint, RouterSettings
    from stats.recorder import recorder

    close_old_connections()
    try:
        if settings.ROUTER_CONFIG and not Endpoint.objects.exists():
            result = import_config_file(settings.ROUTER_CONFIG)
            log.info("imported %s: %s", settings.ROUTER_CONFIG, result)
        set_db_api_key(RouterSettings.load().api_key)
        recorder.load_totals()
    finally:
        close_old_connections()


async def shutdown() -> None:
    """Flush tokens (retrying a few times) and close the upstream client inside the loop."""
    from routing.engine.board import board
    from routing.upstream import client
    from stats.recorder import recorder

    for task in _tasks:
        task.cancel()
    # Requests cut off by the server's own shutdown release their slots and record
    # themselves as they unwind; give them a moment so the final flush includes them.
    for _ in range(50):
        if not board.active() and not board.queued_total():
            break
        await asyncio.sleep(0.05)
    for attempt in range(5):
        try:
            await recorder.flush()
            break
        except Exception:
            log.exception("final token flush failed (attempt %d); retrying", attempt + 1)
            await asyncio.sleep(0.5 * (attempt + 1))
    await client.close_client()


def drain() -> asyncio.Future[None]:
    """Start draining (once per process) and return a future of its end; see the module doc.

    Must be called inside the server's event loop. Awaiting the result never cancels the
    drain itself.
    """
    global draining, _drain_task, _hurry
    if _drain_task is None:
        draining = True
        _hurry = asyncio.Event()
        if _hurried:
            _hurry.set()
        _drain_task = asyncio.get_running_loop().create_task(_drain(settings.ROUTER_DRAIN_TIMEOUT, _hurry))
    return asyncio.shield(_drain_task)


def hurry() -> None:
    """Cut what is still in flight now instead of at the end of ROUTER_DRAIN_TIMEOUT."""
    global _hurried
    _hurried = True
    if _hurry is not None:
        _hurry.set()


async def _drain(timeout: float, hurry_event: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    log.info("draining: new requests are refused; %d in flight get up to %g s", len(in_flight), timeout)
    deadline = loop.time() + timeout
    while in_flight and not hurry_event.is_set() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    left = list(in_flight)
    if left:
        log.warning("drain: cutting %d request(s) still in flight", len(left))
        for task in left:
            cut.add(task)
            task.cancel()
        await asyncio.wait(left, timeout=CUT_GRACE)
    log.info("drained")


def install_daphne_hooks() -> None:
    """Under daphne (Twisted's asyncio reactor): start with the reactor; before it stops,
    drain, then flush. A second stop signal during the drain cuts at once."""
    if "twisted.internet.reactor" not in sys.modules or "daphne.server" not in sys.modules:
        return
    from twisted.internet import defer, reactor

    def on_start() -> None:
        ensure_started()

    async def drain_then_shutdown() -> None:
        await drain()
        await shutdown()

    def before_shutdown() -> defer.Deferred[None]:
        return defer.Deferred.fromFuture(asyncio.ensure_future(drain_then_shutdown()))

    reactor.callWhenRunning(on_start)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)  # type: ignore[attr-defined,arg-type]
    # Twisted binds these when the reactor runs (after this import) to SIGINT/SIGTERM/SIGBREAK.
    for name in ("sigInt", "sigTerm", "sigBreak"):
        twisted_handler = getattr(reactor, name, None)
        if twisted_handler is not None:
            setattr(reactor, name, _second_signal_hurries(twisted_handler, reactor.callFromThread))  # type: ignore[attr-defined]


def _second_signal_hurries(
    server_handler: Callable[[int, FrameType | None], Any], call_in_loop: Callable[..., Any]
) -> Callable[[int, FrameType | None], None]:
    """A signal handler: the first stop signal goes to the server, later ones hurry the drain."""

    def on_signal(number: int, frame: FrameType | None = None) -> None:
        global _stop_signals
        _stop_signals += 1
        if _stop_signals == 1:
            server_handler(number, frame)
        else:
            call_in_loop(hurry)

    return on_signal


def install_uvicorn_drain() -> None:
    """Under uvicorn (called at lifespan start-up, inside its loop): the first SIGTERM or
    SIGINT drains while uvicorn still listens, then goes to uvicorn's own handler; a
    second one during the drain cuts at once. uvicorn restores its handlers when it stops."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        server_handler = signal.getsignal(sig)
        if not str(getattr(server_handler, "__module__", "")).startswith("uvicorn."):
            continue  # not uvicorn's capture (another server, or a test): leave it alone

        def on_signal(number: int, frame: FrameType | None, server_handler: Any = server_handler) -> None:
            loop.call_soon_threadsafe(_stop_requested, number, server_handler)

        signal.signal(sig, on_signal)


def _stop_requested(number: int, server_handler: Callable[[int, FrameType | None], Any]) -> None:
    global _uvicorn_stop
    if _drain_task is None:

        async def drain_then_stop() -> None:
            await drain()
            server_handler(number, None)

        _uvicorn_stop = asyncio.get_running_loop().create_task(drain_then_stop())
    elif not _drain_task.done():
        hurry()
    else:
        server_handler(number, None)  # drained already: uvicorn's own second-signal behaviour


async def lifespan(scope: object, receive: object, send: object) -> None:
    """ASGI lifespan protocol (uvicorn)."""
    while True:
        message = await receive()  # type: ignore[operator]
        if message["type"] == "lifespan.startup":
            ensure_started()
            install_uvicorn_drain()
            await send({"type": "lifespan.startup.complete"})  # type: ignore[operator]
        elif message["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})  # type: ignore[operator]
            return


def reset_for_tests() -> None:
    global _started_loop, draining, _drain_task, _hurry, _stop_signals, _hurried
    for task in _tasks:
        task.cancel()
    _tasks.clear()
    _started_loop = None
    draining, _drain_task, _hurry, _stop_signals, _hurried = False, None, None, 0, False
    in_flight.clear()
    cut.clear()
