"""Start-up and shutdown of the router's background work, inside the server's event loop.

One object, `lifecycle`, owns it. Other apps add their work at wiring time (`AppConfig.ready`):
`on_prepare` (a function run once in a worker thread with a clean database connection),
`background` (a coroutine factory, started as a task in the server's loop) and `on_shutdown`
(awaited after the requests stopped, retried up to 5 times). Started on the first request at
the latest (daphne has no lifespan events; under daphne `install_daphne_hooks` also starts it as
soon as the reactor runs and runs the shutdown before the reactor stops). Under uvicorn the lifespan
protocol drives the same methods.

Shutdown drains, as production proxies do. The first SIGTERM or SIGINT starts `drain()`:
`serving.draining` (routing/status/serving.py) turns true (the lean handler answers new
proxied requests 503 with Retry-After, /health answers 503 "draining" so a load balancer
stops sending), the requests in flight
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
from collections.abc import Awaitable, Callable, Coroutine
from types import FrameType
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections

from routing.auth.keys import router_key
from routing.engine.board import board
from routing.fleet import control, health
from routing.fleet.registry import registry
from routing.fleet.services import import_config_file
from routing.models import Endpoint, RouterSettings
from routing.status.serving import serving
from routing.upstream import client

log = logging.getLogger("routing.lifecycle")

CUT_GRACE = 5.0  # seconds the cut requests get to send their error, release and record
SHUTDOWN_TRIES = 5  # each on_shutdown hook is retried this often (a final token flush must not be lost)


class Lifecycle:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._prepare: list[Callable[[], None]] = []
        self._background: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._shutdown: list[Callable[[], Awaitable[object]]] = []
        # -- drain state (see the module docstring) ----------------------------------
        self.in_flight: set[asyncio.Task[Any]] = set()
        self.cut: set[asyncio.Task[Any]] = set()
        self._drain_task: asyncio.Task[None] | None = None
        self._hurry: asyncio.Event | None = None
        self._stop_signals = 0
        self._hurried = False  # a second stop signal came (possibly before the drain started)
        self._uvicorn_stop: asyncio.Task[None] | None = None  # the drain, then uvicorn's own stop

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The server's event loop once started, else None."""
        return self._loop

    # -- hooks (wiring time) -------------------------------------------------------------
    def on_prepare(self, fn: Callable[[], None]) -> None:
        """Run `fn` at start-up in a worker thread (database access allowed); its errors are
        logged and start-up goes on. Registering the same function twice changes nothing."""
        if fn not in self._prepare:
            self._prepare.append(fn)

    def background(self, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Start `factory()` as a task in the server's loop after the prepare hooks; cancelled
        at shutdown."""
        if factory not in self._background:
            self._background.append(factory)

    def on_shutdown(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Await `fn()` at shutdown, after the requests stopped (tried SHUTDOWN_TRIES times)."""
        if fn not in self._shutdown:
            self._shutdown.append(fn)

    # -- start ---------------------------------------------------------------------------
    def ensure_started(self) -> None:
        """Cheap after the first call in a loop: start the background work once per loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._loop is loop:
            return
        self._loop = loop
        registry.bind_loop(loop)
        self._tasks.append(loop.create_task(self._start()))

    async def _start(self) -> None:
        try:
            await sync_to_async(self._prepare_database, thread_sensitive=False)()
        except Exception:
            log.exception("could not prepare the database at start-up; continuing")
        loop = asyncio.get_running_loop()
        for factory in self._background:
            self._tasks.append(loop.create_task(factory()))
        self._tasks.append(loop.create_task(control.listen()))
        self._tasks.append(loop.create_task(health.watch()))
        # Pre-warm: the first proxied request should not pay for the client; health.watch()
        # fills the caches right away.
        client.get_client()
        # Everything loaded so far (Django, the apps, Twisted) lives as long as the process:
        # move it out of the collector's reach, so full collections stay short.
        gc.collect()
        gc.freeze()

    def _prepare_database(self) -> None:
        close_old_connections()
        try:
            if settings.ROUTER_CONFIG and not Endpoint.objects.exists():
                result = import_config_file(settings.ROUTER_CONFIG)
                log.info("imported %s: %s", settings.ROUTER_CONFIG, result)
            router_key.set_stored(RouterSettings.load().api_key)
            for fn in self._prepare:
                try:
                    fn()
                except Exception:
                    log.exception("start-up hook %s failed; continuing", getattr(fn, "__qualname__", fn))
        finally:
            close_old_connections()

    # -- shutdown ------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Cancel the background tasks, wait briefly for the requests to unwind, run the
        shutdown hooks (each retried) and close the upstream client inside the loop."""
        for task in self._tasks:
            task.cancel()
        # Requests cut off by the server's own shutdown release their slots and record
        # themselves as they unwind; give them a moment so the final flush includes them.
        for _ in range(50):
            if not board.active() and not board.queued_total():
                break
            await asyncio.sleep(0.05)
        for fn in self._shutdown:
            for attempt in range(SHUTDOWN_TRIES):
                try:
                    await fn()
                    break
                except Exception:
                    log.exception("shutdown hook failed (attempt %d); retrying", attempt + 1)
                    await asyncio.sleep(0.5 * (attempt + 1))
        await client.close_client()

    def drain(self) -> asyncio.Future[None]:
        """Start draining (once per process) and return a future of its end; see the module doc.

        Must be called inside the server's event loop. Awaiting the result never cancels the
        drain itself.
        """
        if self._drain_task is None:
            serving.draining = True
            self._hurry = asyncio.Event()
            if self._hurried:
                self._hurry.set()
            self._drain_task = asyncio.get_running_loop().create_task(
                self._drain(settings.ROUTER_DRAIN_TIMEOUT, self._hurry)
            )
        return asyncio.shield(self._drain_task)

    def hurry(self) -> None:
        """Cut what is still in flight now instead of at the end of ROUTER_DRAIN_TIMEOUT."""
        self._hurried = True
        if self._hurry is not None:
            self._hurry.set()

    async def _drain(self, timeout: float, hurry_event: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        in_flight = self.in_flight
        log.info("draining: new requests are refused; %d in flight get up to %g s", len(in_flight), timeout)
        deadline = loop.time() + timeout
        while in_flight and not hurry_event.is_set() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = list(in_flight)
        if left:
            log.warning("drain: cutting %d request(s) still in flight", len(left))
            for task in left:
                self.cut.add(task)
                task.cancel()
            await asyncio.wait(left, timeout=CUT_GRACE)
        log.info("drained")

    # -- servers -------------------------------------------------------------------------
    def install_daphne_hooks(self) -> None:
        """Under daphne (Twisted's asyncio reactor): start with the reactor; before it stops,
        drain, then shut down. A second stop signal during the drain cuts at once."""
        if "twisted.internet.reactor" not in sys.modules or "daphne.server" not in sys.modules:
            return
        from twisted.internet import defer, reactor  # only under daphne: importing it installs a reactor

        async def drain_then_shutdown() -> None:
            await self.drain()
            await self.shutdown()

        def before_shutdown() -> defer.Deferred[None]:
            return defer.Deferred.fromFuture(asyncio.ensure_future(drain_then_shutdown()))

        reactor.callWhenRunning(self.ensure_started)  # type: ignore[attr-defined]
        reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)  # type: ignore[attr-defined,arg-type]
        # Twisted binds these when the reactor runs (after this import) to SIGINT/SIGTERM/SIGBREAK.
        for name in ("sigInt", "sigTerm", "sigBreak"):
            twisted_handler = getattr(reactor, name, None)
            if twisted_handler is not None:
                setattr(reactor, name, self._second_signal_hurries(twisted_handler, reactor.callFromThread))  # type: ignore[attr-defined]

    def _second_signal_hurries(
        self, server_handler: Callable[[int, FrameType | None], Any], call_in_loop: Callable[..., Any]
    ) -> Callable[[int, FrameType | None], None]:
        """A signal handler: the first stop signal goes to the server, later ones hurry the drain."""

        def on_signal(number: int, frame: FrameType | None = None) -> None:
            self._stop_signals += 1
            if self._stop_signals == 1:
                server_handler(number, frame)
            else:
                call_in_loop(self.hurry)

        return on_signal

    def install_uvicorn_drain(self) -> None:
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
                loop.call_soon_threadsafe(self._stop_requested, number, server_handler)

            signal.signal(sig, on_signal)

    def _stop_requested(self, number: int, server_handler: Callable[[int, FrameType | None], Any]) -> None:
        if self._drain_task is None:

            async def drain_then_stop() -> None:
                await self.drain()
                server_handler(number, None)

            self._uvicorn_stop = asyncio.get_running_loop().create_task(drain_then_stop())
        elif not self._drain_task.done():
            self.hurry()
        else:
            server_handler(number, None)  # drained already: uvicorn's own second-signal behaviour

    async def lifespan(self, scope: object, receive: object, send: object) -> None:
        """ASGI lifespan protocol (uvicorn)."""
        while True:
            message = await receive()  # type: ignore[operator]
            if message["type"] == "lifespan.startup":
                self.ensure_started()
                self.install_uvicorn_drain()
                await send({"type": "lifespan.startup.complete"})  # type: ignore[operator]
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})  # type: ignore[operator]
                return

    def reset_for_tests(self) -> None:
        """Forget the loop, the tasks and the drain state; the registered hooks stay."""
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        self._loop = None
        serving.draining = False
        self._drain_task, self._hurry, self._stop_signals, self._hurried = None, None, 0, False
        self.in_flight.clear()
        self.cut.clear()


lifecycle = Lifecycle()
