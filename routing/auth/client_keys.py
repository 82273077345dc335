"""Client keys as the hot path sees them: an in-memory map from a key's SHA-256 to its principal.

Format: `nr-` followed by 43 URL-safe characters (32 random bytes, 256 bits, from `secrets`).
The first 11 characters (`nr-` and 8 more) are the key's visible prefix. Only the SHA-256 hex
digest is stored (routing.models.ClientKey.key_hash); a key this random needs no slow hash.

Authentication per request is one digest and one dict lookup (`KeyStore.get`). The map is a
copy of the ClientKey table, swapped whole on reload (readers take no lock). A change (admin,
`client_key_create`/`client_key_revoke`) calls `keys_changed()` in routing/fleet/control.py:
this process reloads before its next request, the other processes hear of it over the control
channel ("keys.changed"), and with REDIS_URL a generation counter in Redis,
read in the same round trip as the quota check (routing/auth/quotas.py), makes every process
reload before it admits another request with a stale copy. A reload at most
ROUTER_REGISTRY_RELOAD seconds old is the safety net. A key this copy does not know (made by
`client_key_create` in another process a moment ago) reloads the copy before it is answered
(`reload_for_unknown`: reloads start at most every UNKNOWN_RELOAD seconds, so a flood of made-up
keys costs at most that many reads of the table and waits for them), so a new key works on its
first request, Redis or not.

Statuses (routing/auth/keys.py decides between them): no key presented or an unknown key 401;
a disabled or expired key 403.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings

from routing.auth.principal import Principal
from routing.core import redis
from routing.core.outage import Outage

log = logging.getLogger("routing.auth")
_generation_reads = Outage(log, "could not read the key generation from Redis", redis.suspension)

KEY_PREFIX = "nr-"
PREFIX_LENGTH = len(KEY_PREFIX) + 8
LEVELS = {"high": 0, "normal": 1, "low": 2}
LIMIT_FIELDS = ("rpm", "tpm", "concurrency", "daily_tokens", "monthly_tokens")
REDIS_GENERATION = "nomyo:keys:generation"
UNKNOWN_RELOAD = 0.5  # seconds between reloads for keys the copy does not know, at least


def new_key() -> str:
    """A fresh key: `nr-` + 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def prefix_of(key: str) -> str:
    return key[:PREFIX_LENGTH]


def hash_key(key: str) -> str:
    """The stored form of a key: its SHA-256, hex (64 characters)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def split_models(text: str) -> tuple[str, ...]:
    """Allowed models as typed in the admin or `--models`: separated by commas or lines."""
    return tuple(p.strip() for p in text.replace("\n", ",").split(",") if p.strip())


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One ClientKey row as the hot path needs it. expires: UNIX seconds, or None."""

    principal: Principal
    enabled: bool
    expires: float | None

    def refusal(self, now: float) -> str | None:
        """Why this key may not be used now (a 403's message), or None."""
        if not self.enabled:
            return f"the key '{self.principal.name}' is disabled"
        if self.expires is not None and now >= self.expires:
            return f"the key '{self.principal.name}' has expired"
        return None


class KeyStore:
    """The in-memory copy of the ClientKey table. One lock guards the generation counters and the
    reload task; the map itself is replaced whole, so `get` reads it without the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_hash: dict[str, KeyRecord] = {}
        self._generation = 1
        self._loaded_generation = 0
        self._loaded_at = 0.0
        self._reload: asyncio.Task[None] | None = None
        self._reload_for = 0  # the generation the reload in flight loads for
        self.redis_generation: int | None = None  # the Redis counter the copy was loaded under
        self._used: dict[int, float] = {}  # key id -> UNIX time last used, not yet written
        self._unknown_reload_at = -UNKNOWN_RELOAD  # monotonic: the latest reload for an unknown key

    def invalidate(self) -> None:
        """Thread-safe: the next `ensure_fresh` reloads."""
        with self._lock:
            self._generation += 1

    def fresh(self) -> bool:
        return self._loaded_generation == self._generation and (
            time.monotonic() - self._loaded_at < settings.ROUTER_REGISTRY_RELOAD
        )

    async def ensure_fresh(self) -> None:
        """Reload the copy if a change was announced or it is older than ROUTER_REGISTRY_RELOAD.
        One reload in flight per process and change: a reload started before the latest change
        (it may have read the table before it) is not joined, a new one is started. A database
        outage keeps the last copy."""
        if self.fresh():
            return
        with self._lock:
            task = self._reload
            if (
                task is None
                or task.done()
                or self._reload_for != self._generation
                or task.get_loop() is not asyncio.get_running_loop()
            ):
                task = asyncio.get_running_loop().create_task(self._load(self._generation))
                self._reload = task
                self._reload_for = self._generation
        await asyncio.shield(task)

    async def _load(self, generation: int) -> None:
        try:
            by_hash, redis_generation = await sync_to_async(load_keys, thread_sensitive=False)()
        except Exception:
            with self._lock:
                first = self._loaded_generation == 0
                if generation > self._loaded_generation:
                    self._loaded_generation = generation
                    self._loaded_at = time.monotonic()
            if first:
                log.exception("could not load the client keys; retrying on the next request")
                with self._lock:
                    self._loaded_generation = 0
                raise
            log.warning("could not reload the client keys; keeping the last copy", exc_info=True)
            return
        with self._lock:
            if generation < self._loaded_generation:
                return  # a reload started later, for a later change, already put its copy in
            self._by_hash = by_hash
            self.redis_generation = redis_generation
            self._loaded_generation = generation
            self._loaded_at = time.monotonic()
            if redis_generation is None and settings.REDIS_URL:
                # Redis did not say which generation this copy is of: nothing can tell it is
                # stale, so it is read again within a second instead of ROUTER_REGISTRY_RELOAD.
                self._loaded_at -= max(0.0, settings.ROUTER_REGISTRY_RELOAD - 1.0)

    async def reload_for_unknown(self) -> None:
        """A caller presented a key in the client key format that this copy does not know: return
        once a reload started after it arrived has finished (joining one in flight). Reloads for
        unknown keys start at most every UNKNOWN_RELOAD seconds, so a caller may wait up to that
        long (a flood of made-up keys is answered slowly, a key made a moment ago still works).
        Raises what `ensure_fresh` raises."""
        arrived = time.monotonic()
        while True:
            with self._lock:
                now = time.monotonic()
                started = self._unknown_reload_at >= arrived  # by another caller, since we came
                wait = self._unknown_reload_at + UNKNOWN_RELOAD - now
                if not started and wait <= 0:
                    self._unknown_reload_at = now
                    self._generation += 1
                    started = True
            if started:
                await self.ensure_fresh()
                return
            await asyncio.sleep(wait)

    def defined(self) -> bool:
        """Whether any client key exists (enabled or not): then a request without a key is refused."""
        return bool(self._by_hash)

    def get(self, key: str) -> KeyRecord | None:
        return self._by_hash.get(hash_key(key))

    def touch(self, principal: Principal) -> None:
        """Note a use of the key (written to `last_used` by `flush_last_used`, not per request)."""
        self._used[principal.key_id] = time.time()

    def flush_last_used(self) -> int:
        """Write the noted uses to the database (blocking: call from a thread); returns rows written."""
        if not self._used:
            return 0
        used, self._used = self._used, {}
        from datetime import UTC, datetime

        from routing.models import ClientKey  # the ORM stays off the import path of the proxy

        for key_id, at in used.items():
            ClientKey.objects.filter(pk=key_id).update(last_used=datetime.fromtimestamp(at, UTC))
        return len(used)

    def clear(self) -> None:
        with self._lock:
            self._by_hash = {}
            self._generation += 1
            self._reload = None


def record_of(row: object) -> KeyRecord:
    """The KeyRecord of a routing.models.ClientKey."""
    from routing.models import ClientKey

    assert isinstance(row, ClientKey)
    limits = tuple((name, int(value)) for name in LIMIT_FIELDS if (value := getattr(row, name)) is not None)
    expires = row.expires.timestamp() if row.expires else None
    principal = Principal(
        row.name,
        "key",
        limits=limits,
        priority=LEVELS.get(row.priority, 1),
        models=split_models(row.allowed_models),
        key_id=row.pk,
        expires=expires,
    )
    return KeyRecord(principal, row.enabled, expires)


def load_keys() -> tuple[dict[str, KeyRecord], int | None]:
    """The ClientKey table by hash, and the Redis generation read before it (None without Redis).
    Blocking: runs in a thread."""
    from django.db import close_old_connections

    from routing.models import ClientKey

    redis_generation = _read_redis_generation()
    close_old_connections()
    try:
        return {row.key_hash: record_of(row) for row in ClientKey.objects.all()}, redis_generation
    finally:
        close_old_connections()


def _read_redis_generation() -> int | None:
    if not settings.REDIS_URL or _generation_reads.suspended():
        return None
    try:
        value = redis.sync_client().get(REDIS_GENERATION)
    except Exception as exc:
        _generation_reads.failed(exc)
        return None
    _generation_reads.ok()
    return int(value or 0)


key_store = KeyStore()
