"""The origin policy (routing/server/cors.py): Ollama's defaults, ROUTER_ORIGINS patterns, header lists."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from routing.server.cors import DEFAULT_ORIGINS, OriginPolicy, preflight_headers, same_origin

DEFAULTS = OriginPolicy(DEFAULT_ORIGINS)
LABEL = st.text(string.ascii_lowercase + string.digits + "-", min_size=1, max_size=20)
PORT = st.integers(min_value=1, max_value=65535)


def allows(policy: OriginPolicy, origin: str) -> bool:
    return policy.allows(origin.encode("latin-1"))


def test_ollamas_default_origins() -> None:
    for origin in (
        "http://localhost",
        "https://localhost",
        "http://localhost:5173",
        "https://127.0.0.1:8443",
        "http://0.0.0.0:3000",
        "HTTP://LOCALHOST:80",
        "app://obsidian.md",
        "file://",
        "tauri://localhost",
        "vscode-webview://1b2c3d4e",
        "vscode-file://vscode-app",
    ):
        assert allows(DEFAULTS, origin), origin
    for origin in (
        "http://localhost.evil.example",
        "http://127.0.0.1.nip.io",
        "http://evil.example/?http://localhost",
        "http://user@localhost",
        "https://example.com",
        "http://10.0.0.5:11434",
        "chrome-extension://abcdef",
        "null",
        "",
        " ",
    ):
        assert not allows(DEFAULTS, origin), origin
    assert not DEFAULTS.allows("http://l\xf6calhost".encode("latin-1"))


def test_entries_are_cleaned_and_wildcards_match() -> None:
    policy = OriginPolicy([' "https://App.Example.com/" ', "https://*.corp.example", "null", ""])
    assert allows(policy, "https://app.example.com")
    assert not allows(policy, "http://app.example.com")
    assert not allows(policy, "https://app.example.com.evil.example")
    assert allows(policy, "https://a.corp.example") and allows(policy, "https://a.b.corp.example")
    assert not allows(policy, "https://corp.example") and not allows(
        policy, "https://evil.example/.corp.example"
    )
    assert allows(policy, "null")
    assert OriginPolicy(["*"]).allows(b"https://anything.example:1") and not OriginPolicy(["*"]).allows(b"")
    assert not OriginPolicy([]).allows(b"http://localhost")


@given(LABEL, st.one_of(st.none(), PORT), st.sampled_from(["http", "https"]))
def test_any_port_on_the_default_hosts_and_no_lookalike_host(
    label: str, port: int | None, scheme: str
) -> None:
    suffix = "" if port is None else f":{port}"
    for host in ("localhost", "127.0.0.1", "0.0.0.0"):
        assert allows(DEFAULTS, f"{scheme}://{host}{suffix}")
        assert not allows(DEFAULTS, f"{scheme}://{host}.{label}{suffix}")
        assert not allows(DEFAULTS, f"{scheme}://{label}.{host}x{suffix}")
    assert allows(DEFAULTS, f"app://{label}") and allows(DEFAULTS, f"vscode-webview://{label}")


@given(st.lists(LABEL, min_size=1, max_size=4), LABEL)
def test_a_subdomain_pattern_matches_every_subdomain_and_nothing_else(labels: list[str], other: str) -> None:
    policy = OriginPolicy(["https://*.corp.example"])
    sub = ".".join(labels)
    assert allows(policy, f"https://{sub}.corp.example")
    assert not allows(policy, f"http://{sub}.corp.example")
    assert not allows(policy, f"https://{sub}.corp.example.{other}")
    assert not allows(policy, f"https://{sub}/.corp.example")
    assert not allows(policy, f"https://{sub}@x.corp.example")


@given(st.text(max_size=60))
def test_an_exact_entry_matches_only_itself(text: str) -> None:
    policy = OriginPolicy(["https://app.example.com:8443"])
    candidate = text.strip()
    expected = candidate.lower() == "https://app.example.com:8443"
    try:
        raw = candidate.encode("ascii")
    except UnicodeEncodeError:
        raw, expected = text.encode("utf-8"), False
    assert policy.allows(raw) is expected


def test_the_verdict_cache_stays_bounded() -> None:
    policy = OriginPolicy(DEFAULT_ORIGINS)
    for port in range(3000):
        assert policy.allows(f"http://localhost:{port}".encode())
    assert len(policy._verdicts) <= 1024


def test_preflight_echoes_a_header_list_and_refuses_anything_else() -> None:
    headers = dict(preflight_headers(b"http://localhost:1", b"authorization, content-type, x-stainless-os"))
    assert headers[b"access-control-allow-headers"] == b"authorization, content-type, x-stainless-os"
    assert headers[b"access-control-allow-origin"] == b"http://localhost:1"
    for bad in (None, b"", b"   ", b"x-a\r\nset-cookie: 1", b"x" * 3000, b"x-\xff"):
        headers = dict(preflight_headers(b"http://localhost:1", bad))
        assert b"Authorization" in headers[b"access-control-allow-headers"], bad


def test_same_origin_compares_the_authority_with_the_host_header() -> None:
    assert same_origin(b"http://router.internal:8080", b"Router.Internal:8080")
    assert not same_origin(b"http://router.internal:8080", b"router.internal")
    assert not same_origin(b"router.internal:8080", b"router.internal:8080")
    assert not same_origin(b"http://router.internal", None)


def test_entries_that_can_never_match_are_reported_by_the_system_check(settings) -> None:
    from routing.checks import router_origins

    settings.ROUTER_ORIGINS = [
        "https://ok.example",
        "https://*.ok.example:*",
        "*",
        "null",
        "https://x.example/app",
        "x",
    ]
    warned = [w.msg for w in router_origins(None)]
    assert len(warned) == 2 and "'https://x.example/app'" in warned[0] and "'x'" in warned[1]
