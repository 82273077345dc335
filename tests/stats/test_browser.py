"""The live usage page in a real browser: Debian's chromium driven by Playwright.

A staff user logs in through the admin's login form, opens the page, and watches real
requests go through the real router process: active counts and token totals change in
the page without a reload. The page is saved to docs/dashboard.png (UPDATE_SCREENSHOTS=1) while it shows data.
A second test restarts the router under the open page and sees it reconnect by itself.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.stats.live import Background, chat, prompt_tokens

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "dashboard.png"
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and Path(p).exists()), None)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
USER = "admin"
PASSWORD = "correct-horse-battery"
PROMPT = "summarise the incident report in three short bullet points"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary (/usr/bin/chromium): `apt-get install -y chromium` (.ci/run does)",
)


# -- fixtures ------------------------------------------------------------------------
@pytest.fixture
def browser(transactional_db: None) -> Iterator[Any]:
    """Request it after the fixtures that write to the database: Playwright's sync API
    runs an event loop in this thread, and Django refuses ORM calls while one runs."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """A logged-in page on the dashboard that records console errors."""

    def __init__(self, browser: Any, base_url: str) -> None:
        self.context = browser.new_context(
            viewport={"width": 1440, "height": 900}, device_scale_factor=1, color_scheme="light"
        )
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.on(
            "console", lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None
        )
        self.base_url = base_url

    def log_in(self) -> None:
        self.log_in_without_waiting()
        self.wait_badge("live")

    def log_in_without_waiting(self) -> None:
        page = self.page
        # A browser at the base URL is sent to the page (API clients get Ollama's answer
        # there); not logged in: the admin's login form, then back to the page.
        page.goto(self.base_url + "/")
        assert "/admin/login/" in page.url
        page.fill("#id_username", USER)
        page.fill("#id_password", PASSWORD)
        page.click("input[type=submit]")
        page.wait_for_url(self.base_url + "/dashboard/")

    def wait_badge(self, state: str, timeout: float = 20) -> None:
        self.page.wait_for_selector(f'#conn[data-state="{state}"]', timeout=timeout * 1000)

    def text(self, selector: str) -> str:
        return str(self.page.text_content(selector) or "").strip()

    def wait_text(self, selector: str, expected: str, timeout: float = 20) -> None:
        self.page.wait_for_function(
            """([sel, want]) => {
                const node = document.querySelector(sel);
                return !!node && node.textContent.trim() === want;
            }""",
            arg=[selector, expected],
            timeout=timeout * 1000,
        )

    def wait_number(self, selector: str, predicate_js: str, timeout: float = 20) -> int:
        """Wait until the number in `selector` satisfies `predicate_js` (a JS expression of n)."""
        self.page.wait_for_function(
            f"""(sel) => {{
                const node = document.querySelector(sel);
                if (!node) return false;
                const n = Number(node.textContent.replace(/[^0-9]/g, ""));
                return {predicate_js};
            }}""",
            arg=selector,
            timeout=timeout * 1000,
        )
        return number(self.text(selector))


def number(text: str) -> int:
    return int("".join(ch for ch in text if ch.isdigit()) or 0)


def fmt(n: int) -> str:
    return f"{n:,}"


def make_staff() -> None:
    from django.contrib.auth.models import User

    User.objects.create_user(USER, password=PASSWORD, is_staff=True, is_superuser=True)


# -- realistic history for the charts ------------------------------------------------------
def seed_history(
    pairs: dict[tuple[str, str], float], now: datetime
) -> dict[tuple[str, str], tuple[int, int]]:
    """Minute rows for the last 30 days at a plausible office-hours rhythm (every minute in
    the last hour, every 10 minutes in the last day, hourly before), and matching totals.
    `pairs` maps (endpoint url, model) to its share of the traffic. Returns the totals."""
    from stats.models import TokenTimeSeries, TokenTotal

    rnd = random.Random(20250310)
    now = now.replace(second=0, microsecond=0)
    rows: list[TokenTimeSeries] = []
    totals: dict[tuple[str, str], list[int]] = {pair: [0, 0, 0] for pair in pairs}

    def rate(moment: datetime) -> float:
        hour = moment.hour + moment.minute / 60
        office = max(0.0, math.sin(math.pi * (hour - 6) / 14)) if 6 <= hour <= 20 else 0.0
        weekend = 0.35 if moment.weekday() >= 5 else 1.0
        return 900 * weekend * (0.12 + office) * (0.75 + 0.5 * rnd.random())  # tokens a minute

    def add(moment: datetime, minutes: int) -> None:
        for (endpoint, model), share in pairs.items():
            tokens = rate(moment) * minutes * share
            if tokens < 1:
                continue
            inp = int(tokens * (0.55 + 0.1 * rnd.random()))
            out = int(tokens) - inp
            reqs = max(1, int(tokens / 700))
            rows.append(
                TokenTimeSeries(
                    endpoint=endpoint,
                    model=model,
                    timestamp=moment,
                    input_tokens=inp,
                    output_tokens=out,
                    total_tokens=inp + out,
                    requests=reqs,
                )
            )
            t = totals[(endpoint, model)]
            t[0] += inp
            t[1] += out
            t[2] += reqs

    for minutes_ago in range(60, 0, -1):  # the current minute is left to the live requests
        add(now - timedelta(minutes=minutes_ago), 1)
    for tens_ago in range(143, 6, -1):
        add(now - timedelta(minutes=10 * tens_ago), 10)
    for hours_ago in range(30 * 24, 24, -1):
        add((now - timedelta(hours=hours_ago)).replace(minute=0), 60)
    TokenTimeSeries.objects.bulk_create(rows, batch_size=500)
    TokenTotal.objects.bulk_create(
        TokenTotal(
            endpoint=e,
            model=m,
            input_tokens=v[0],
            output_tokens=v[1],
            total_tokens=v[0] + v[1],
            requests=v[2],
        )
        for (e, m), v in totals.items()
    )
    return {pair: (v[0], v[1]) for pair, v in totals.items()}


def openai_chat(base_url: str, model: str, prompt: str) -> Background:
    return Background(
        base_url + "/v1/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True},
    )


# -- the tests -----------------------------------------------------------------------------
@pytest.fixture
def fleet(fakes, endpoint, router) -> dict[str, Any]:
    """Three endpoints (two Ollama GPUs and a llama.cpp server), a few models, a month of history."""
    slow = {"tokens": 60, "delay": 0.1}  # about 6 s a reply
    gpu1 = fakes(
        kind="ollama",
        models=["llama3.1:8b", "qwen2.5:14b", "nomic-embed-text:latest"],
        loaded=["llama3.1:8b", "qwen2.5:14b"],
        version="0.12.3",
        **slow,
    )
    gpu2 = fakes(
        kind="ollama", models=["llama3.1:8b", "mistral:7b"], loaded=["llama3.1:8b"], version="0.12.3", **slow
    )
    cpp = fakes(kind="openai", models=["qwen2.5-coder:32b"], **slow)
    endpoint(gpu1.url, name="gpu-1", max_concurrent_connections=2)
    endpoint(gpu2.url, name="gpu-2", max_concurrent_connections=2)
    endpoint(cpp.url + "/v1", name="llamacpp-1", kind="openai", max_concurrent_connections=2)
    history = seed_history(
        {
            (gpu1.url, "llama3.1:8b"): 0.32,
            (gpu1.url, "qwen2.5:14b"): 0.14,
            (gpu1.url, "nomic-embed-text:latest"): 0.05,
            (gpu2.url, "llama3.1:8b"): 0.27,
            (gpu2.url, "mistral:7b"): 0.07,
            (cpp.url + "/v1", "qwen2.5-coder:32b"): 0.15,
        },
        datetime.now(tz=UTC),
    )
    make_staff()
    server = router()
    # Versions are probed by /api/version (Ollama) and /api/config (every kind), not at start-up.
    assert httpx.get(server.url + "/api/config", timeout=10).status_code == 200
    return {"gpu1": gpu1, "gpu2": gpu2, "cpp": cpp, "server": server, "history": history}


def test_the_page_shows_live_usage_and_token_totals(fleet, browser, tmp_path) -> None:
    server = fleet["server"]
    gpu1, gpu2, cpp = fleet["gpu1"], fleet["gpu2"], fleet["cpp"]
    history = fleet["history"]
    view = Page(browser, server.url)
    view.log_in()
    page = view.page

    # The first snapshot and the charts are on the page.
    view.wait_text('#endpoints tr[data-endpoint="gpu-1"] .active-count', "0")
    assert view.text('#endpoints tr[data-endpoint="gpu-2"] td:nth-child(3)') == "0.12.3"
    assert view.text('#endpoints tr[data-endpoint="llamacpp-1"] td:nth-child(3)') == "openai-compatible"
    llama_before = sum(history[(url, "llama3.1:8b")][i] for url in (gpu1.url, gpu2.url) for i in (0, 1))
    view.wait_text('#tokens tr[data-model="llama3.1:8b"] .tok-total', fmt(llama_before))
    page.wait_for_selector("#time-chart svg path.line-input")
    page.wait_for_selector('#dist-chart li[data-endpoint="gpu-1"]')
    # The legend names the servers (two share 127.0.0.1); the full url is in the tooltip.
    legend = page.eval_on_selector_all(
        "#dist-chart li",
        "items => items.map(li => [li.dataset.endpoint, li.querySelector('.dist-name').title])",
    )
    assert sorted(legend) == sorted(
        [["gpu-1", gpu1.url], ["gpu-2", gpu2.url], ["llamacpp-1", cpp.url + "/v1"]]
    ), legend
    assert view.text("#processes") == "1 router process"

    # Real traffic: five llama3.1 chats (two slots on each GPU: one waits), a qwen chat
    # and two chats on the llama.cpp server.
    replies = [chat(server.url, "llama3.1:8b", PROMPT) for _ in range(5)]
    replies.append(chat(server.url, "qwen2.5:14b", PROMPT))
    replies += [openai_chat(server.url, "qwen2.5-coder:32b", PROMPT) for _ in range(2)]

    view.wait_number('#endpoints tr[data-endpoint="gpu-1"] .active-count', "n === 3")
    view.wait_number('#endpoints tr[data-endpoint="gpu-2"] .active-count', "n === 2")
    view.wait_number('#endpoints tr[data-endpoint="llamacpp-1"] .active-count', "n === 2")
    view.wait_text('#queue tr[data-model="llama3.1:8b"] .queue-count', "1")
    view.wait_text("#card-active", "7")
    # Tokens are counted when a reply ends: nothing yet.
    assert view.text('#tokens tr[data-model="llama3.1:8b"] .tok-total') == fmt(llama_before)
    page.wait_for_selector('#running li[data-model="qwen2.5:14b"]')
    assert view.text("#conn") == "live"
    # The README's picture is refreshed on request only, so a test run leaves the tree clean.
    shot = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000  # a rendered page, not a blank one
    charts_read_at = view.text("#series-note")

    for reply in replies:
        reply.join()
    # Every reply counted: 5 llama3.1 chats of (prompt + 60) tokens each, shown without a reload.
    per_reply = prompt_tokens(PROMPT) + 60
    view.wait_text('#tokens tr[data-model="llama3.1:8b"] .tok-total', fmt(llama_before + 5 * per_reply))
    view.wait_text(
        '#tokens tr[data-model="llama3.1:8b"] .tok-out',
        fmt(sum(history[(url, "llama3.1:8b")][1] for url in (gpu1.url, gpu2.url)) + 5 * 60),
    )
    coder_before = sum(history[(cpp.url + "/v1", "qwen2.5-coder:32b")])
    view.wait_text('#tokens tr[data-model="qwen2.5-coder:32b"] .tok-total', fmt(coder_before + 2 * per_reply))
    for name in ("gpu-1", "gpu-2", "llamacpp-1"):
        view.wait_text(f'#endpoints tr[data-endpoint="{name}"] .active-count', "0")
    view.wait_text("#card-queued", "0")
    # New tokens make the page re-read its charts (once they are flushed), well before the
    # 30 s refresh.
    page.wait_for_function(
        "(before) => document.getElementById('series-note').textContent !== before",
        arg=charts_read_at,
        timeout=10_000,
    )
    # Every range draws; longer ranges hold more of the seeded month.
    sums = {}
    for name in ("day", "week", "month", "hour"):
        page.click(f'.tab[data-range="{name}"]')
        view.wait_text("#dist-note", f"last {name}")
        assert page.get_attribute(f'.tab[data-range="{name}"]', "aria-selected") == "true"
        page.wait_for_selector("#time-chart svg path.line-output")
        sums[name] = number(view.text("#sum-input"))
    assert 0 < sums["hour"] < sums["day"] < sums["week"] < sums["month"], sums
    assert gpu1.stats.snapshot()["completed"] + gpu2.stats.snapshot()["completed"] == 6
    assert cpp.stats.snapshot()["completed"] == 2
    # The page was never reloaded: the same document got every update.
    assert page.evaluate("performance.getEntriesByType('navigation')[0].type") == "navigate"
    assert view.errors == []
    view.context.close()


@pytest.fixture
def small_fleet(fakes, endpoint, router) -> Any:
    gpu = fakes(kind="ollama", models=["llama3:latest"], tokens=20, delay=0.05)
    endpoint(gpu.url, name="gpu-1", max_concurrent_connections=2)
    make_staff()
    return router()


def test_the_page_reconnects_after_the_router_restarts(small_fleet, browser, tmp_path) -> None:
    from tests import conftest

    first = small_fleet
    view = Page(browser, first.url)
    view.log_in()
    view.wait_text('#endpoints tr[data-endpoint="gpu-1"] .active-count', "0")

    first.stop()
    view.wait_badge("reconnecting", timeout=10)
    assert view.page.evaluate("document.getElementById('main').classList.contains('is-stale')")

    # The same address again (what a restart or a deploy looks like to the browser).
    original = conftest.free_port
    conftest.free_port = lambda: first.port
    try:
        second = conftest.start_router(tmp_path)
    finally:
        conftest.free_port = original
    try:
        view.wait_badge("live", timeout=40)  # by itself, with backoff capped at 30 s
        assert not view.page.evaluate("document.getElementById('main').classList.contains('is-stale')")
        reply = chat(second.url, "llama3", PROMPT)
        view.wait_number('#endpoints tr[data-endpoint="gpu-1"] .active-count', "n === 1")
        reply.join()
        view.wait_text('#tokens tr[data-model="llama3:latest"] .tok-total', fmt(prompt_tokens(PROMPT) + 20))
        # While the server was down the browser logged failed connections; nothing else.
        assert [e for e in view.errors if not ("WebSocket" in e or "ERR_CONNECTION_REFUSED" in e)] == []
    finally:
        view.context.close()
        second.stop()


def test_a_failing_server_reads_for_how_long_from_its_since_time(small_fleet, browser) -> None:
    """The page's own arithmetic (and its endpoint line): snapshots are stood in for
    (Playwright answers the page's websocket), with the server's clock 1,000 s ahead of the
    browser's, as on a machine whose clock is off; the durations come from the snapshot's
    times, not the browser's clock."""
    import json
    import time

    view = Page(browser, small_fleet.url)
    served_at = time.time() + 1000

    def snapshot(down_for: float) -> str:
        endpoint = {
            "id": 1,
            "name": "gpu-1",
            "url": "http://127.0.0.1:9",
            "kind": "ollama",
            "enabled": True,
            "limit": 2,
            "tier": 1,
            "weight": 2,
            "healthy": False,
            "failing_since": served_at - down_for,
            "failing_reason": "connection refused",
            "version": None,
            "models": [],
            "loaded": [],
            "active": 0,
        }
        snap = {"type": "usage.snapshot", "taken_at": served_at, "processes": 1, "endpoints": [endpoint]}
        return json.dumps({**snap, "active": [], "tokens": [], "queued": {}})

    sockets: list[Any] = []
    view.page.route_web_socket("**/ws/usage/", lambda ws: sockets.append(ws))
    view.log_in_without_waiting()
    reason = '#endpoints tr[data-endpoint="gpu-1"] .reason'
    for down_for, shown in (
        (0.4, "0s"),
        (42, "42s"),
        (90, "1m 30s"),
        (600, "10m"),
        (7300, "2h 1m"),
        (90061, "1d 1h"),
    ):
        view.page.wait_for_function("(n) => n > 0", arg=len(sockets))
        sockets[-1].send(snapshot(down_for))
        view.wait_text(reason, f"connection refused · for {shown}")
    # tier and weight beside the url, when not the defaults
    line = '#endpoints tr[data-endpoint="gpu-1"] .ep-url'
    view.wait_text(line, "Ollama · http://127.0.0.1:9 · tier 1 · weight 2")
    view.context.close()


@pytest.fixture
def two_keys(fakes, endpoint, router) -> tuple[Any, str, str]:
    """A router with one Ollama server (about 3 s a reply) and two client keys, team-a and team-b."""
    from tests.integration.test_keys import make_key

    gpu = fakes(kind="ollama", models=["llama3:latest"], tokens=20, delay=0.15)
    endpoint(gpu.url, name="gpu-1", max_concurrent_connections=4)
    team_a, team_b = make_key("team-a"), make_key("team-b")
    make_staff()
    return router(), team_a, team_b


def test_the_page_shows_tokens_and_active_requests_by_client(two_keys, browser) -> None:
    """Two client keys send chats at once: the "By client" table shows each key's requests in
    flight while they run, then its tokens, without a reload."""
    from tests.integration.test_keys import bearer

    server, team_a, team_b = two_keys
    view = Page(browser, server.url)
    view.log_in()
    view.wait_text("#clients tbody", "No client counted yet.")

    body = {"model": "llama3", "messages": [{"role": "user", "content": PROMPT}], "stream": True}
    replies = [Background(server.url + "/api/chat", body, headers=bearer(team_a)) for _ in range(2)]
    replies.append(Background(server.url + "/api/chat", body, headers=bearer(team_b)))
    view.wait_text('#clients tr[data-client="team-a"] .client-active', "2")
    view.wait_text('#clients tr[data-client="team-b"] .client-active', "1")
    for reply in replies:
        reply.join()
        assert reply.status == 200, reply.text
    per_reply = prompt_tokens(PROMPT) + 20
    view.wait_text('#clients tr[data-client="team-a"] .client-total', fmt(2 * per_reply))
    view.wait_text('#clients tr[data-client="team-b"] .client-total', fmt(per_reply))
    for client in ("team-a", "team-b"):
        view.wait_text(f'#clients tr[data-client="{client}"] .client-active', "0")
    rows = view.page.eval_on_selector_all("#clients tbody tr", "rows => rows.map(r => r.dataset.client)")
    assert rows == ["team-a", "team-b"]  # most tokens first; no anonymous or operator row
    assert view.errors == []
    view.context.close()
