"""Helpers for the live-usage tests: a staff session, a websocket reader, snapshot lookups.

The websocket reader talks to a real router process with the `websockets` library, as
a browser would: the session cookie of a staff user and a same-origin Origin header.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

Snapshot = dict[str, Any]


def staff_session(username: str = "ops", password: str = "not-a-secret-pw", *, staff: bool = True) -> str:
    """Create a user in the test database (committed under transactional_db) and return
    a session key logged in as that user."""
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.test import Client

    user = User.objects.create_user(username, password=password, is_staff=staff)
    client = Client()
    client.force_login(user)
    return str(client.cookies[settings.SESSION_COOKIE_NAME].value)


def cookie_header(session: str) -> str:
    from django.conf import settings

    return f"{settings.SESSION_COOKIE_NAME}={session}"


class UsageSocket:
    """A blocking reader of /ws/usage/ on a real router process."""

    def __init__(self, base_url: str, session: str, *, origin: str | None = None) -> None:
        ws_url = base_url.replace("http://", "ws://", 1) + "/ws/usage/"
        self._stack = ExitStack()
        self.conn: ClientConnection = self._stack.enter_context(
            connect(
                ws_url,
                origin=Origin(origin or base_url),
                additional_headers={"Cookie": cookie_header(session)},
                open_timeout=10,
                max_size=2**24,
                proxy=None,
                legacy=False,
            )
        )
        self.received: list[Snapshot] = []

    def next(self, timeout: float = 5.0) -> Snapshot:
        import json

        message = json.loads(self.conn.recv(timeout=timeout))
        self.received.append(message)
        return message  # type: ignore[no-any-return]

    def wait_for(self, predicate: Callable[[Snapshot], bool], timeout: float = 15.0) -> Snapshot:
        """The first snapshot (from now on) that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        last: Snapshot | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no snapshot matched in {timeout} s; the last one was:\n{last}")
            try:
                last = self.next(timeout=left)
            except TimeoutError:
                continue
            if predicate(last):
                return last

    def close(self) -> None:
        self._stack.close()


def endpoint_row(snap: Snapshot, name: str) -> Snapshot:
    for row in snap["endpoints"]:
        if row["name"] == name:
            return row
    raise AssertionError(f"no endpoint {name!r} in {[r['name'] for r in snap['endpoints']]}")


def active_of(snap: Snapshot, name: str) -> int:
    return int(endpoint_row(snap, name)["active"])


def tokens_of(snap: Snapshot, url: str, model: str) -> tuple[int, int, int]:
    """(input, output, total) of one endpoint url and model; zeros when not counted yet."""
    for row in snap["tokens"]:
        if row["endpoint"] == url and row["model"] == model:
            return int(row["input"]), int(row["output"]), int(row["total"])
    return 0, 0, 0


class Background:
    """One HTTP request in a thread: streamed, read to the end; `join()` returns the body."""

    def __init__(self, url: str, body: dict[str, Any], *, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.body = body
        self.headers = headers or {}
        self.status: int | None = None
        self.text = ""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, headers=self.headers, timeout=60) as reply:
                self.status = reply.status_code
                self.text = "".join(reply.iter_text())
        except BaseException as exc:  # reported by join()
            self.error = exc

    def join(self, timeout: float = 60.0) -> str:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"{self.url} did not finish in {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.status == 200, f"{self.url}: HTTP {self.status}: {self.text[:500]}"
        return self.text


def chat(base_url: str, model: str, prompt: str = "why is the sky blue") -> Background:
    """A streaming Ollama /api/chat through the router, running in the background."""
    return Background(
        base_url + "/api/chat",
        {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True},
    )


def prompt_tokens(prompt: str) -> int:
    """What the fake backend reports as prompt tokens for one user message."""
    return len(prompt.split()) + 1
