"""Start-up and shutdown of the router's background work, inside the server's event loop.

Started on the first request at the latest (daphne has no lifespan events; under daphne
`install_daphne_hooks` also starts it as soon as the reactor runs and flushes tokens
before the reactor stops). Under uvicorn the lifespan protocol drives the same functions.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys

from asgiref.sync import sync_to_async
from django.conf import settings

log = logging.getLogger("routing.lifecycle")

_started_loop: asyncio.AbstractEventLoop | None = None
_tasks: list[asyncio.Task[None]] = []
_api_key_from_db = ""


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
    from routing import control, fleet, upstream
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
    _tasks.append(loop.create_task(fleet.watch()))
    # Pre-warm: the first proxied request should not pay for the client; fleet.watch()
    # fills the caches right away.
    upstream.get_client()
    # Everything loaded so far (Django, the apps, Twisted) lives as long as the process:
    # move it out of the collector's reach, so full collections stay short.
    gc.collect()
    gc.freeze()


def _prepare_database() -> None:
    from django.db import close_old_connections

    from routing.models import Endpoint, RouterSettings
    from routing.services import import_config_file
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
    from routing import upstream
    from routing.board import board
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
    await upstream.close_client()


def install_daphne_hooks() -> None:
    """Under daphne (Twisted's asyncio reactor): start with the reactor, flush before it stops."""
    if "twisted.internet.reactor" not in sys.modules or "daphne.server" not in sys.modules:
        return
    from twisted.internet import defer, reactor

    def on_start() -> None:
        ensure_started()

    def before_shutdown() -> defer.Deferred[None]:
        return defer.Deferred.fromFuture(asyncio.ensure_future(shutdown()))

    reactor.callWhenRunning(on_start)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)  # type: ignore[attr-defined,arg-type]


async def lifespan(scope: object, receive: object, send: object) -> None:
    """ASGI lifespan protocol (uvicorn)."""
    while True:
        message = await receive()  # type: ignore[operator]
        if message["type"] == "lifespan.startup":
            ensure_started()
            await send({"type": "lifespan.startup.complete"})  # type: ignore[operator]
        elif message["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})  # type: ignore[operator]
            return


def reset_for_tests() -> None:
    global _started_loop
    for task in _tasks:
        task.cancel()
    _tasks.clear()
    _started_loop = None
