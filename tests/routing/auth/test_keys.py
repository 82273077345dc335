"""Who is calling (routing/auth/keys.py): any header a client may send gives a principal or a
401/403, never anything else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing.auth import client_keys, keys
from routing.auth.client_keys import KeyRecord, hash_key, key_store, new_key
from routing.auth.principal import ANONYMOUS, OPERATOR, Principal
from routing.core.errors import ApiError

GOOD = new_key()
OFF = new_key()
OLD = new_key()
TEAM = Principal("team", "key", key_id=1)


@pytest.fixture
def keys_loaded(settings) -> Iterator[None]:
    settings.ROUTER_API_KEY = "operator-secret"
    settings.ROUTER_REGISTRY_RELOAD = 10**9
    key_store._by_hash = {
        hash_key(GOOD): KeyRecord(TEAM, True, None),
        hash_key(OFF): KeyRecord(Principal("off", "key", key_id=2), False, None),
        hash_key(OLD): KeyRecord(Principal("old", "key", key_id=3), True, time.time() - 1),
    }
    key_store._loaded_generation = key_store._generation
    key_store._loaded_at = time.monotonic()
    yield
    key_store.clear()


def run(authorization: str | None, api_key: str | None) -> Principal:
    return asyncio.run(keys.authenticate(authorization, api_key))


def test_each_outcome(keys_loaded):
    assert run(f"Bearer {GOOD}", None) is TEAM
    assert run(None, GOOD) is TEAM
    assert run(f"bearer   {GOOD}  ", None) is TEAM
    assert run("Bearer operator-secret", None) is OPERATOR
    assert run(None, "operator-secret") is OPERATOR
    for auth, api_key, status, words in [
        (None, None, 401, "missing key"),
        ("Basic abc", None, 401, "Authorization must be 'Bearer <key>', not the 'Basic' scheme"),
        ("Bearer nr-wrong", None, 401, "unknown key"),
        (f"Bearer {OFF}", None, 403, "disabled"),
        (None, OLD, 403, "expired"),
    ]:
        with pytest.raises(ApiError) as refused:
            run(auth, api_key)
        assert refused.value.status == status and words in refused.value.message


@pytest.mark.parametrize(
    "authorization,words",
    [
        ("Basic dXNlcjpwYXNz", "Authorization must be 'Bearer <key>', not the 'Basic' scheme"),
        ("Token abc", "not the 'Token' scheme"),
        (GOOD, "Authorization must be 'Bearer <key>': the word Bearer, a space, then the key"),
        ("Bearer", "Bearer without a key"),
        ("Bearer    ", "Bearer without a key"),
        (f"{GOOD} extra", "Authorization must be 'Bearer <key>': the word Bearer"),  # no scheme word
    ],
)
def test_a_header_in_the_wrong_shape_gets_a_401_that_says_what_is_wrong(keys_loaded, authorization, words):
    with pytest.raises(ApiError) as refused:
        run(authorization, None)
    assert refused.value.status == 401 and words in refused.value.message
    assert "missing key" not in refused.value.message
    assert GOOD not in refused.value.message and "dXNlcjpwYXNz" not in refused.value.message  # never echoed
    # a blank header is no header: still "missing key"
    with pytest.raises(ApiError, match="missing key"):
        run("   ", None)


def test_an_open_router_ignores_any_token(settings):
    settings.ROUTER_API_KEY = ""
    settings.ROUTER_REGISTRY_RELOAD = 10**9
    stored, keys.router_key._stored = keys.router_key._stored, ""  # no router key from an earlier test either
    key_store._by_hash = {}
    key_store._loaded_generation = key_store._generation
    key_store._loaded_at = time.monotonic()
    try:
        assert run("Bearer sk-anything", None) is ANONYMOUS
        assert run(None, None) is ANONYMOUS
    finally:
        key_store.clear()
        keys.router_key._stored = stored


headers = st.one_of(st.none(), st.text(max_size=80), st.sampled_from([f"Bearer {GOOD}", "Bearer ", "Bearer"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers, headers)  # the fixture's state is the same for every example
def test_any_header_gives_a_principal_or_a_401_or_403(keys_loaded, authorization, api_key):
    try:
        principal = run(authorization, api_key)
    except ApiError as refused:
        assert refused.status in (401, 403)
        return
    assert principal in (TEAM, OPERATOR)


def test_a_key_the_copy_does_not_know_is_looked_up_with_reloads_at_most_every_unknown_reload(
    keys_loaded, monkeypatch
):
    table: dict[str, KeyRecord] = {}
    loads: list[float] = []

    def load_keys() -> tuple[dict[str, KeyRecord], None]:
        loads.append(time.monotonic())
        return dict(table), None

    def create(name: str) -> str:
        key = new_key()
        table[hash_key(key)] = KeyRecord(Principal(name, "key", key_id=len(table) + 10), True, None)
        return key

    monkeypatch.setattr(client_keys, "load_keys", load_keys)
    monkeypatch.setattr(client_keys, "UNKNOWN_RELOAD", 0.3)
    client_keys.key_store._unknown_reload_at = -1.0

    async def refused(token: str) -> int:
        with pytest.raises(ApiError) as caught:
            await keys.authenticate(f"Bearer {token}", None)
        return caught.value.status

    async def main() -> None:
        # made by `client_key_create` in another process: known on its first request
        assert (await keys.authenticate(f"Bearer {create('first')}", None)).name == "first"
        # 50 made-up keys at once: all refused, with two reloads at most (one per 0.3 s)
        before = len(loads)
        assert await asyncio.gather(*(refused(new_key()) for _ in range(50))) == [401] * 50
        assert len(loads) - before <= 2
        # a made-up key has just reloaded the copy; a key made now still works at once
        assert await refused(new_key()) == 401
        assert (await keys.authenticate(f"Bearer {create('second')}", None)).name == "second"
        reloads = len(loads)
        assert await refused("sk-other-format") == 401
        assert len(loads) == reloads  # other formats never reload

    asyncio.run(main())
    assert len(loads) <= 5
