"""Limits of client keys in Redis, shared by every router process, with leases.

Counters per key id, under PREFIX (windows of routing/auth/quota_base.py):
- `req:<minute>`: requests of this minute, admitted or leased (below);
- `tok:<minute>`, `day:<day>`, `month:<month>`: tokens charged;
- `inflight`: concurrency places, a sorted set of members scored by their expiry (LEASE s
  ahead). A process renews every place it holds every RENEW_EVERY s (its requests in flight,
  however long, and its leases), so the places of a process that dies expire within LEASE s
  instead of blocking its keys, as the cluster slots do (routing/engine/cluster.py).

Slow path, one round trip. The admissions asked for in one turn of the event loop go to Redis as
one EVALSHA of `_ADMIT`, with the places given back since the last one. The script removes those
places, checks the key generation (routing/auth/client_keys.py) and every limit, and counts the
request and takes its place, atomically. Each admission carries the tokens this process charged
the key and has not written yet (pending, or being written by the running tick): the script
adds them to the key's token counts, which it checks and returns (the reply's headers). While
this process's fast path is open (below) it also asks for a lease: when at least LEASE_SHARE
requests per minute (or places) are left, the script counts 1/LEASE_SHARE of what is left (at
most LEASE_MAX) as this process's, in the same step.

Fast path, no round trip. A request of a key this process holds a lease for is admitted from it
when the lease has a request left (rpm) and a free place (concurrency), the token totals this
process knows (Redis's as last read, with every charge of this process since) are under their
limits ("is anything left?"), and the fast path is open: the key copy the caller was
authenticated with has the key generation that this process read from Redis less than FENCE
seconds ago (monotonic time, from when the read was sent).

The sync tick, every SYNC_EVERY seconds while this process has leases, charges or keyed requests
(until LEASE_IDLE seconds after the latest), is one pipeline. It reads the generation and writes
this process's confirmation (CONFIRMED: owner -> "<generation> <UNIX time the fast path stays
open until>"). It writes the token charges and the requests counted from leases; INCRBY returns
the totals, which the fast path checks next. It reads the totals of the other leased keys, and
gives back what leases did not need. When the ticks stop (idle), the fast path closes here
first, then the confirmation says so (open until a time in the past), so `confirm_generation`
does not wait for an idle process; the next request goes through the slow path and starts the
ticks, which re-open it.

Invariants:
- No limit is passed. A lease is counted in Redis when granted, and a process admits from a
  lease only what it was granted.
- A lease costs other processes at most what it holds unused. Each tick gives back the part not
  touched since the last one (the low-water mark). Everything goes back after LEASE_IDLE seconds
  without a request of the key, or on a new key generation. A lease is at most 1/LEASE_SHARE of
  what was left when granted, so near a limit every admission is exact, one round trip each.
- A key change takes effect on the next request in every process. `confirm_generation`
  (routing/fleet/control.py calls it after bumping the generation) returns when every process
  whose fast path may be open has confirmed the new generation, or after FENCE seconds, when
  every such fast path has closed. A request after that goes through the slow path, whose
  script refuses a stale key copy (StaleKeys: the caller reloads and authenticates again).
- A request cancelled while its admission is asked keeps nothing but its count: what the
  script granted it (its place, a lease) goes back, whether the reply came before or after.
- A place given back is removed from Redis: a call that fails keeps it for the next one (the
  sync ticks run while places wait), so a place does not outlive an outage of Redis by LEASE s.
  So are the places an admission call that failed may have taken (its reply lost; while fewer
  than DOUBT_MAX places wait); the requests it may have counted stay counted for their minute.
- A tick that fails may have run in Redis (a reply lost): what it sends again is only what
  cannot pass a limit if counted twice (token charges, requests added, places removed). The
  requests it gave back are not given back again: they stay counted until their minute ends.
- Nothing is given back to a Redis whose key generation went back (restarted without its data):
  what leases held was counted in what it lost, and would uncount requests admitted since.
- A process's own token charges count in its admissions at once: sent with each admission
  while unwritten, and added to its leases' totals. An admission of a key whose charges a tick
  is writing waits for that tick's answer (one round trip) before it is sent, so a charge is
  counted once, in Redis or as unwritten (counted twice, it refused a request under the limit,
  and the next one was admitted). So one process refuses as the in-process counters do: the
  request that crosses a token limit completes, the next one is refused.
- Another process's charges are written within SYNC_EVERY seconds (its tick) and seen here after
  that. So processes together may pass a token limit by what the others charged in that moment,
  as one may by the request that crosses it (the known window).
- Only the event loop's thread touches the leases, asks and pending writes, so they need no
  lock. `close_fast_path` may be called from any thread: it sets one float.

If Redis is unreachable, the slow path returns None and the front (routing/auth/quotas.py)
admits on this process's own counters instead of refusing.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from routing.auth.principal import Principal
from routing.auth.quota_base import Admission, QuotaExceeded, StaleKeys, Usage, Windows, refusal
from routing.core import redis
from routing.core.outage import Outage
from routing.observability import metrics

log = logging.getLogger("routing.quotas")
_BY_LEASE = metrics.quota_admissions.labels("lease")
_BY_REDIS = metrics.quota_admissions.labels("redis")

PREFIX = "nomyo:quota"
CONFIRMED = "nomyo:keys:confirmed"  # hash: owner -> "<generation> <fast path open until, UNIX s>"
# (an idle process's: "<generation> -<UNIX s it closed>")
LEASE = 30.0  # seconds a concurrency place lives in Redis unless renewed
RENEW_EVERY = 10.0  # seconds between renewals of the places this process holds
RELEASE_EVERY = 0.02  # seconds an exact place given back waits for an admission to ride on, at most
SYNC_EVERY = 0.1  # seconds between sync ticks (token charges, confirmations, leases given back)
FENCE = 2.0  # seconds the fast path stays open after a read of the key generation was sent
LEASE_SHARE = 16  # a lease is at most 1/LEASE_SHARE of what is left of a limit
LEASE_MAX = 64  # requests or places in one lease, at most
LEASE_IDLE = 1.0  # seconds without a request before a key's lease goes back whole
PLENTY = LEASE_SHARE * LEASE_MAX  # this much left of a limit: a lease keeps what it did not use
DOUBT_MAX = 10_000  # places waiting to be given back, beyond which those in doubt are left to expire
CLOCK_SKEW = 1.0  # seconds of clock difference between hosts `confirm_generation` allows for
LIMITS_SENT = ("rpm", "tpm", "daily_tokens", "monthly_tokens", "concurrency")  # script, _Lease.limits

# KEYS: the generation; then 5 per admission: requests/minute, tokens/minute, tokens/day,
#       tokens/month, concurrency set; then the concurrency set of each place given back
# ARGV: number of admissions, now, lease, minute ttl, lease share; then 9 per admission: known
#       generation ('' skips the check), rpm, tpm, daily, monthly, concurrency (0: none), member,
#       lease wanted (0: none), tokens this process charged the key and has not written yet
#       (added to the tokens of the minute, day and month); then the member of each place given
#       back
# Returns 8 numbers per admission: status; requests, tokens this minute, day, month (this
# process's unwritten tokens included) and places in flight before it; requests and places
# leased (0: none, the request counted alone; else n, the request's own included, its place
# being <member>:1 and the others <member>:2..n).
# Status 0 admitted, 1 refused (nothing counted), -1 stale keys (nothing counted).
_ADMIT = """
local n = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local share = tonumber(ARGV[5])
for j = 1, #KEYS - 1 - 5 * n do redis.call('ZREM', KEYS[1 + 5 * n + j], ARGV[5 + 9 * n + j]) end
local generation = tonumber(redis.call('GET', KEYS[1]) or '0')
local out = {}
for a = 0, n - 1 do
  local k = 1 + 5 * a
  local v = 5 + 9 * a
  if ARGV[v + 1] ~= '' and generation ~= tonumber(ARGV[v + 1]) then
    for _, x in ipairs({-1, 0, 0, 0, 0, 0, 0, 0}) do out[#out + 1] = x end
  else
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 5], '-inf', now)
    local unwritten = tonumber(ARGV[v + 9])
    local used = {
      tonumber(redis.call('GET', KEYS[k + 1]) or '0'),
      tonumber(redis.call('GET', KEYS[k + 2]) or '0') + unwritten,
      tonumber(redis.call('GET', KEYS[k + 3]) or '0') + unwritten,
      tonumber(redis.call('GET', KEYS[k + 4]) or '0') + unwritten,
      redis.call('ZCARD', KEYS[k + 5])}
    local status = 0
    for i = 1, 5 do
      local limit = tonumber(ARGV[v + 1 + i])
      if limit > 0 and used[i] >= limit then status = 1 end
    end
    local want = tonumber(ARGV[v + 8])
    local leased = {0, 0}
    if status == 0 then
      local rpm = tonumber(ARGV[v + 2])
      local requests = 1
      if want > 0 and rpm > 0 and rpm - used[1] >= share then
        requests = math.min(want, math.floor((rpm - used[1]) / share))
        leased[1] = requests
      end
      redis.call('INCRBY', KEYS[k + 1], requests)
      redis.call('EXPIRE', KEYS[k + 1], ttl)
      local places = tonumber(ARGV[v + 6])
      if places > 0 then
        local take = 1
        if want > 0 and places - used[5] >= share then
          take = math.min(want, math.floor((places - used[5]) / share))
          leased[2] = take
        end
        for i = 1, take do redis.call('ZADD', KEYS[k + 5], now + lease, ARGV[v + 7] .. ':' .. i) end
        redis.call('EXPIRE', KEYS[k + 5], math.ceil(lease) + 60)
      end
    end
    out[#out + 1] = status
    for i = 1, 5 do out[#out + 1] = used[i] end
    out[#out + 1] = leased[1]
    out[#out + 1] = leased[2]
  end
end
return out
"""
_ADMIT_SHA = hashlib.sha1(_ADMIT.encode()).hexdigest()  # Redis names a script by its SHA-1
REPLY = 8  # numbers per admission in the script's reply


@dataclass(slots=True)
class _Ask:
    """One admission of key `key_id` waiting for the next call to Redis: its 5 keys and first 8
    arguments as sent (the 9th, the key's unwritten tokens, is read when sent), the set its
    places go to (None: the key has no concurrency limit), its reply (REPLY numbers, or the error
    of the call), whether it asked for a lease, and `charged`: the tokens this process had
    charged the key (`RedisCounters._charged`) when it was sent."""

    key_id: int
    keys: tuple[bytes, ...]
    args: tuple[bytes, ...]
    place_set: bytes | None
    member: bytes
    reply: asyncio.Future[list[int]]
    wanted: bool
    charged: int = 0


@dataclass(slots=True)
class _Lease:
    """What this process holds of one key's limits, granted under key generation `generation`
    in the minute `minute`. `limits`: the key's (rpm, tpm, daily, monthly, concurrency), None for
    none. `requests`: requests of `minute` left to admit (rpm keys); `counted`: requests admitted
    from the lease of a key without rpm, not yet written. `free`: places held and not in use;
    `held`: every place held (free or in use). `totals`: the latest known requests of the minute
    and tokens of the minute, day and month in Redis, this process's unwritten charges added.
    `low_requests`, `low_free`: the fewest left since the last tick (what was not needed)."""

    principal: Principal
    generation: int
    minute: int
    day: int
    month: int
    limits: tuple[int | None, ...]
    place_set: bytes
    requests: int = 0
    counted: int = 0
    free: list[bytes] = field(default_factory=list)
    held: set[bytes] = field(default_factory=set)
    totals: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    low_requests: int = 0
    low_free: int = 0
    in_flight: int = 0  # the latest known places taken in Redis (every process's, leased ones too)
    used_at: float = 0.0  # monotonic


class RedisCounters:
    """The counters in Redis with this process's leases (see the module docstring)."""

    def __init__(self) -> None:
        self._background: set[asyncio.Task[None]] = set()
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._serial = itertools.count()
        self._charges: dict[int, int] = {}  # key id -> tokens not written yet
        self._writing: dict[int, int] = {}  # key id -> tokens the running tick is writing
        self._written: asyncio.Future[None] | None = None  # done when the running tick's writes are
        self._charged: dict[int, int] = {}  # key id -> tokens charged since this process started
        self._asks: list[_Ask] = []  # admissions of this turn of the loop, not sent yet
        self._freed: list[tuple[bytes, bytes]] = []  # places given back, not sent yet
        self._leases: dict[int, _Lease] = {}  # key id -> its lease
        self._returns: list[tuple[bytes, int]] = []  # (requests key, n) leased requests to give back
        # key id -> (principal, minute, its key names, its limits), encoded as sent: encoding
        # about 16 arguments per request was a third of the Redis path's CPU
        self._encoded: dict[int, tuple[Principal, int, tuple[bytes, ...], tuple[bytes, ...]]] = {}
        self._freeing: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._generation: int | None = None  # the key generation the latest tick read
        self._open_until = 0.0  # monotonic: the fast path is open before this
        self._asked_at = 0.0  # monotonic: the latest keyed admission (keeps the ticker running)
        self._places: dict[bytes, bytes] = {}  # member -> its set: every place held in Redis
        self._renewer: asyncio.Task[None] | None = None
        self._closing = False
        self._again = False  # the next tick comes at once (a new generation to confirm)
        self._failing = False  # the latest tick failed (logged once until one succeeds)
        # admission calls that fail: logged once; one that timed out suspends them (RETRY_AFTER)
        self._calls = Outage(
            log, "could not check quotas in Redis; using this process's counters", redis.suspension
        )
        self._renewals = Outage(log, "could not renew the quota places this process holds", redis.suspension)

    @staticmethod
    def keys(key_id: int, w: Windows) -> list[str]:
        base = f"{PREFIX}:{key_id}"
        return [
            f"{base}:req:{w.minute}",
            f"{base}:tok:{w.minute}",
            f"{base}:day:{w.day}",
            f"{base}:month:{w.month}",
            f"{base}:inflight",
        ]

    def close_fast_path(self) -> None:
        """Any thread: admit nothing from leases until a tick reads the key generation again."""
        self._open_until = 0.0

    def fast_path_open(self, generation: int | None) -> bool:
        if generation is None or generation != self._generation:
            return False
        return time.monotonic() < self._open_until

    async def admit(self, principal: Principal, now: float, generation: int | None) -> Admission | None:
        """The admission, or None when Redis could not be asked (the caller falls back). Raises
        QuotaExceeded (429) or StaleKeys. From this process's lease when it can (no round trip),
        else in the next call to Redis, with the other admissions of this turn of the loop."""
        w = Windows.at(now)
        mono = time.monotonic()
        self._asked_at = mono
        self._tick_soon()
        lease = self._leases.get(principal.key_id)
        if lease is not None and lease.principal is principal and lease.minute == w.minute:
            if generation == self._generation == lease.generation and mono < self._open_until:
                admitted = self._from_lease(lease, w, mono)
                if admitted is not None:
                    _BY_LEASE.inc()
                    return admitted
        if self._calls.suspended():  # a call timed out a moment ago: the caller falls back at once
            return None
        keys, limits = self._encode(principal, w)
        member = f"{self.owner}:{next(self._serial)}".encode()
        loop = asyncio.get_running_loop()
        wanted = self.fast_path_open(generation)
        known = b"" if generation is None else str(generation).encode()
        ask = _Ask(
            principal.key_id,
            keys,
            (known, *limits, member, b"%d" % LEASE_MAX if wanted else b"0"),
            keys[4] if limits[4] != b"0" else None,
            member,
            loop.create_future(),
            wanted,
        )
        self._asks.append(ask)
        if len(self._asks) == 1:
            loop.call_soon(self._send_asks)
        try:
            status, *values = await ask.reply  # cancelled before the reply: `_send` gives back
        except asyncio.CancelledError:  # cancelled once the reply was in: give it back here
            if ask.reply.done() and not ask.reply.cancelled() and ask.reply.exception() is None:
                self._give_back_reply(ask, ask.reply.result())
            raise
        except Exception:  # logged by `_send`, once until a call succeeds
            return None
        if status == -1:
            raise StaleKeys()
        used = Usage(*values[:5])
        if status == 1:
            refused = refusal(principal, used, w)
            if refused is None:  # the counts moved between the script and now: say which was hit
                refused = QuotaExceeded(
                    principal,
                    "concurrency",
                    "over a limit; retry",
                    code="rate_limit_exceeded",
                    retry_after=1,
                    headers={},
                )
            raise refused
        _BY_REDIS.inc()
        after = Usage(used.requests_minute + 1, used.tokens_minute, used.tokens_day, used.tokens_month)
        release = self._granted(principal, w, generation, ask, values)
        return Admission((principal, after, w), release)

    def _from_lease(self, lease: _Lease, w: Windows, mono: float) -> Admission | None:
        """Admit from `lease` (no round trip), or None when it has nothing for this request.
        Raises QuotaExceeded when the token totals it knows are over a limit."""
        rpm, tpm, daily, monthly, concurrency = lease.limits
        totals = lease.totals
        if rpm is not None and lease.requests <= 0:
            return None
        if concurrency is not None and not lease.free:
            return None
        if (
            (tpm is not None and totals[1] >= tpm)
            or (daily is not None and totals[2] >= daily)
            or (monthly is not None and totals[3] >= monthly)
        ):  # over for certain: tokens only grow within a window, and these are at most that
            used = Usage(totals[0] - lease.requests, totals[1], totals[2], totals[3])
            refused = refusal(lease.principal, used, w)
            if refused is not None:
                raise refused
            return None
        lease.used_at = mono
        if rpm is not None:
            lease.requests -= 1
            if lease.requests < lease.low_requests:
                lease.low_requests = lease.requests
        else:
            lease.counted += 1
            totals[0] += 1
        after = Usage(totals[0] - lease.requests, totals[1], totals[2], totals[3])
        if concurrency is None:
            return Admission((lease.principal, after, w))
        member = lease.free.pop()
        if len(lease.free) < lease.low_free:
            lease.low_free = len(lease.free)
        return Admission((lease.principal, after, w), lambda: self._give_back(lease, member))

    def _granted(
        self, principal: Principal, w: Windows, generation: int | None, ask: _Ask, values: list[int]
    ) -> Callable[[], None] | None:
        """Take in what the script granted `ask` (values: its reply after the status): a lease is
        kept when the fast path is still open for `generation`, else given back at once. Returns
        the release of the request's own place (None: no place)."""
        requests, places = values[5], values[6]
        members = [ask.member + b":%d" % i for i in range(1, places + 1)]
        own = members[0] if members else ask.member + b":1"
        if ask.place_set is not None:
            self._hold(ask.place_set, members or [own])
        lease: _Lease | None = None
        if ask.wanted:
            lease = self._lease_for(principal, w, generation, ask.keys[4])
            if lease is None:  # the fast path closed meanwhile: nothing is kept
                self._give_back_grant(ask, requests, places, own_too=False)
            else:
                if requests:
                    lease.requests += requests - 1
                lease.totals[0] = max(lease.totals[0], values[0] + max(1, requests))
                lease.in_flight = values[4] + max(1, places)
                # the tokens charged while the call was on its way: not in `values`, and not
                # added to this lease's totals by `charge` if the lease is new
                since = self._charged.get(principal.key_id, 0) - ask.charged
                for i in (1, 2, 3):
                    lease.totals[i] = max(lease.totals[i], values[i] + since)
                lease.held.update(members)
                lease.free.extend(members[1:])
                lease.used_at = time.monotonic()
        if ask.place_set is None:
            return None
        if lease is not None and places:
            kept = lease
            return lambda: self._give_back(kept, own)
        place = (ask.place_set, own)
        return lambda: self._free(*place)

    def _lease_for(
        self, principal: Principal, w: Windows, generation: int | None, place_set: bytes
    ) -> _Lease | None:
        """The lease of `principal` to add a grant to (made when needed), or None when the fast
        path is closed for `generation`."""
        if not self.fast_path_open(generation):
            return None
        assert generation is not None
        lease = self._leases.get(principal.key_id)
        if lease is not None and lease.principal is principal and lease.minute == w.minute:
            return lease
        if lease is not None:
            self._drop(lease)
        limits = tuple(principal.limit(name) for name in LIMITS_SENT)
        lease = _Lease(principal, generation, w.minute, w.day, w.month, limits, place_set)
        self._leases[principal.key_id] = lease
        return lease

    def _hold(self, place_set: bytes, members: list[bytes]) -> None:
        """Places now in Redis for this process: renewed until given back (`_free`)."""
        for member in members:
            self._places[member] = place_set
        if self._renewer is None or self._renewer.done():  # every RENEW_EVERY s, LEASE s ahead
            self._renewer = self._spawn(redis.keep_renewed(self._places, RENEW_EVERY, LEASE, self._renewals))

    def _give_back(self, lease: _Lease, member: bytes) -> None:
        """A request admitted with a leased place ended: the place goes back to the lease, or to
        Redis when the lease was dropped meanwhile."""
        if self._leases.get(lease.principal.key_id) is lease and member in lease.held:
            lease.free.append(member)
        else:
            lease.held.discard(member)
            self._free(lease.place_set, member)

    def _drop(self, lease: _Lease) -> None:
        """Give back what `lease` holds unused; its places in use go back when their requests end."""
        if self._leases.get(lease.principal.key_id) is lease:
            del self._leases[lease.principal.key_id]
        self._return_requests(lease, lease.requests)
        self._return_places(lease, len(lease.free))
        if lease.counted and lease.minute == Windows.at(time.time()).minute:
            self._returns.append((self._request_key(lease), -lease.counted))  # counted: added
        lease.counted = 0

    def _request_key(self, lease: _Lease) -> bytes:
        return f"{PREFIX}:{lease.principal.key_id}:req:{lease.minute}".encode()

    def _return_requests(self, lease: _Lease, n: int) -> None:
        n = min(n, lease.requests)
        if n > 0:
            lease.requests -= n
            if lease.minute == Windows.at(time.time()).minute:  # a past minute's count expires alone
                self._returns.append((self._request_key(lease), n))

    def _return_places(self, lease: _Lease, n: int) -> None:
        for _ in range(min(n, len(lease.free))):
            member = lease.free.pop()
            lease.held.discard(member)
            self._places.pop(member, None)
            self._freed.append((lease.place_set, member))

    def _encode(self, principal: Principal, w: Windows) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """The key's 5 key names in the windows `w` and its limits in LIMITS_SENT order (0: none),
        as bytes; the same until the minute or the principal (reloaded keys) changes."""
        cached = self._encoded.get(principal.key_id)
        if cached is not None and cached[0] is principal and cached[1] == w.minute:
            return cached[2], cached[3]
        names = tuple(name.encode() for name in self.keys(principal.key_id, w))
        limits = tuple(str(principal.limit(name) or 0).encode() for name in LIMITS_SENT)
        self._encoded[principal.key_id] = (principal, w.minute, names, limits)
        return names, limits

    def _send_asks(self) -> None:
        asks, self._asks = self._asks, []
        freed, self._freed = self._freed, []
        self._spawn(self._send(asks, freed))

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _send(self, asks: list[_Ask], freed: list[tuple[bytes, bytes]]) -> None:
        """One call for `asks` and the places `freed`; each ask gets its REPLY numbers or the
        error. An ask whose request went away meanwhile gives back what it was given."""
        from routing.auth.client_keys import REDIS_GENERATION

        written = self._written
        if (
            written is not None
            and not written.done()
            and written.get_loop() is asyncio.get_running_loop()
            and any(self._writing.get(ask.key_id) for ask in asks)
        ):
            # A tick is writing these keys' charges: wait for its answer (one round trip), so
            # they are counted once, in Redis or as unwritten, never twice (a false 429).
            await asyncio.wait((written,))
        keys: list[bytes | str] = [REDIS_GENERATION]
        args: list[object] = [len(asks), time.time(), LEASE, 120, LEASE_SHARE]
        for ask in asks:  # this process's tokens not in Redis yet count (see `_unwritten`)
            keys += ask.keys
            args += ask.args
            args.append(self._unwritten(ask.key_id))
            ask.charged = self._charged.get(ask.key_id, 0)
        keys += (key for key, _ in freed)
        args += (member for _, member in freed)
        try:
            got = [int(v) for v in await _evalsha(redis.async_client(), keys, args)]
        except Exception as exc:
            self._calls.failed(exc)
            # perhaps not removed: sent again (removing twice is harmless); and the places the
            # script may have taken for the asks (its reply lost), while not too many wait
            self._freed[:0] = freed
            for ask in asks:
                if ask.place_set is not None and len(self._freed) < DOUBT_MAX:
                    for j in range(1, (LEASE_MAX if ask.wanted else 1) + 1):
                        self._freed.append((ask.place_set, ask.member + b":%d" % j))
            if self._freed:
                self._free_later()
            for ask in asks:
                if not ask.reply.done():
                    ask.reply.set_exception(exc)
            return
        self._calls.ok()
        for i, ask in enumerate(asks):
            reply = got[REPLY * i : REPLY * i + REPLY]
            if not ask.reply.done():
                ask.reply.set_result(reply)
            else:
                self._give_back_reply(ask, reply)

    def _give_back_reply(self, ask: _Ask, reply: list[int]) -> None:
        """The request of `ask` went away: give back all the script granted it (its own request
        stays counted, as one cut short)."""
        if reply[0] == 0:
            self._give_back_grant(ask, reply[6], reply[7], own_too=True)

    def _give_back_grant(self, ask: _Ask, requests: int, places: int, *, own_too: bool) -> None:
        """Give back what the script granted `ask` beyond its own request: the leased requests
        (`requests` - 1) and places (<member>:2..n), and its own place too when `own_too`."""
        if requests > 1:
            self._returns.append((ask.keys[0], requests - 1))
            self._tick_soon()
        if ask.place_set is not None:
            for j in range(1 if own_too else 2, max(1, places) + 1):
                self._free(ask.place_set, ask.member + b":%d" % j)

    def _free(self, key: bytes, member: bytes) -> None:
        """Give a place back: it goes to Redis with the next admission, or with the others given
        back within RELEASE_EVERY seconds, in one pipeline."""
        self._places.pop(member, None)
        self._freed.append((key, member))
        self._free_later()

    def _free_later(self) -> None:
        if self._freeing is None or self._freeing.done():
            try:
                self._freeing = self._spawn(self._free_soon())
            except RuntimeError:
                self._freed.clear()  # no loop: the places expire by themselves
                return

    async def _free_soon(self) -> None:
        await asyncio.sleep(RELEASE_EVERY)
        freed, self._freed = self._freed, []
        if not freed:  # every one went with an admission
            return
        try:
            pipe = redis.async_client().pipeline(transaction=False)
            _zrem_grouped(pipe, freed)
            await pipe.execute()
        except Exception:  # kept: the sync ticks send them again until Redis answers
            self._freed[:0] = freed
            self._tick_soon()

    def charge(self, key_id: int, tokens: int, now: float) -> None:
        """Add `tokens` to the key's windows in Redis: written by the next sync tick, for every
        key in one pipeline (one round trip per tick, not per request). Until then this process's
        admissions of the key count them (`_unwritten`, the lease's totals)."""
        self._charges[key_id] = self._charges.get(key_id, 0) + tokens
        self._charged[key_id] = self._charged.get(key_id, 0) + tokens
        lease = self._leases.get(key_id)
        if lease is not None:
            for i in (1, 2, 3):
                lease.totals[i] += tokens
        self._tick_soon()

    def _unwritten(self, key_id: int) -> int:
        """Tokens this process charged the key that may not be in Redis yet: pending, and those
        the running tick is writing. `_send` waits for that tick's answer first, so the second
        part is normally 0; were it not, they may be in Redis already and counted twice, which can
        only refuse early, never admit over a limit."""
        return self._charges.get(key_id, 0) + self._writing.get(key_id, 0)

    def _tick_soon(self) -> None:
        """Make sure the sync ticks run (started on the running loop; none without one)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if self._ticker is None:
                self._charges.clear()  # no loop (a test's thread): nothing can be sent
            return
        ticker = self._ticker
        if ticker is None or ticker.done() or ticker.get_loop() is not loop:
            self._ticker = self._spawn(self._tick_loop())

    def _busy(self) -> bool:
        recent = not self._closing and time.monotonic() - self._asked_at < LEASE_IDLE
        return bool(self._leases or self._charges or self._returns or self._freed or recent)

    async def _tick_loop(self) -> None:
        while True:
            again, self._again = self._again, False
            await asyncio.sleep(0 if self._closing or again else SYNC_EVERY)
            try:
                await self._tick()
                failed: Exception | None = None
            except Exception as exc:
                failed = exc
            if failed is not None:
                if not self._failing:
                    self._failing = True
                    log.warning("the quota sync with Redis failed; retrying", exc_info=failed)
                if self._closing:  # shutting down without Redis: what is pending is lost
                    self._leases.clear()
                    self._charges.clear()
                    self._returns.clear()
                    self._freed.clear()  # they expire after LEASE seconds
                    return
                await asyncio.sleep(SYNC_EVERY)
            else:
                self._failing = False
            if not self._busy():
                await self._close_claim()
                if not self._busy():  # else a request came meanwhile: ticking again re-opens
                    return

    async def _close_claim(self) -> None:
        """Going idle: no tick will confirm a new key generation, so close the fast path here
        first, then say so in CONFIRMED (open until minus the UNIX time it closed: in the past, so
        `confirm_generation` does not wait for this process, and its entry is removed an hour
        later as a gone process's). A request meanwhile goes through the slow path and starts the
        ticks again, which re-open it. If the write fails, the claim runs out within FENCE."""
        self._open_until = 0.0
        closed = f"{self._generation or 0} -{time.time():.3f}"
        try:
            await redis.async_client().hset(CONFIRMED, self.owner, closed)
        except Exception:
            log.debug("could not close this process's claim in %s", CONFIRMED, exc_info=True)

    async def _tick(self) -> None:
        """One sync tick: one pipeline (see the module docstring). Raises what Redis raised; what
        was to be written then waits for the next tick."""
        from routing.auth.client_keys import REDIS_GENERATION

        pipe = redis.async_client().pipeline(transaction=False)  # raises before anything is taken
        mono = time.monotonic()
        idle_before = mono - LEASE_IDLE
        for lease in list(self._leases.values()):
            if self._closing or lease.used_at < idle_before or self._generation != lease.generation:
                self._drop(lease)
            else:  # what was not needed since the last tick goes back, unless nobody could miss it
                rpm, _, _, _, concurrency = lease.limits
                if rpm is not None and rpm - lease.totals[0] < PLENTY:
                    self._return_requests(lease, lease.low_requests)
                if concurrency is not None and concurrency - lease.in_flight < PLENTY:
                    self._return_places(lease, lease.low_free)
                lease.low_requests, lease.low_free = lease.requests, len(lease.free)
        w = Windows.at(time.time())
        charges, self._charges = self._charges, {}
        self._writing = charges  # until the INCRBYs are answered: `_unwritten`
        written = self._written = asyncio.get_running_loop().create_future()  # `_send` waits on it
        returns, self._returns = self._returns, []
        freed, self._freed = self._freed, []
        sent = time.monotonic()
        open_until = time.time() + FENCE  # read after `sent`: never earlier than the real close
        # The claim goes before the read: a change counted after the read finds the claim there
        # and waits for it (a change counted before it is what the read returns).
        pipe.hset(CONFIRMED, self.owner, f"{self._generation or 0} {open_until:.3f}")
        pipe.expire(CONFIRMED, 3600)
        pipe.get(REDIS_GENERATION)
        for key, n in returns:
            pipe.decrby(key, n)
            pipe.expire(key, 120)
        _zrem_grouped(pipe, freed)
        ttls = (120, int(w.day_left) + 3600, int(w.month_left) + 3600)
        read: list[tuple[_Lease, int, int]] = []  # (lease, key id, first reply index)
        counted = []
        for lease in self._leases.values():
            if lease.counted and lease.minute == w.minute:
                counted.append((lease, lease.counted))
                pipe.incrby(self._request_key(lease), lease.counted)
                pipe.expire(self._request_key(lease), 120)
                lease.counted = 0
        for key_id, tokens in charges.items():
            names = self.keys(key_id, w)
            charged = self._leases.get(key_id)
            if charged is not None:
                read.append((charged, key_id, len(pipe.command_stack)))
                pipe.get(names[0])
            for name, ttl in zip(names[1:4], ttls, strict=True):
                pipe.incrby(name, tokens)
                pipe.expire(name, ttl)
        for key_id, lease in self._leases.items():
            if key_id not in charges and lease.minute == w.minute:
                read.append((lease, key_id, len(pipe.command_stack)))
                pipe.mget(self.keys(key_id, w)[:4])
        places_read = [(lease, len(pipe.command_stack)) for lease in self._leases.values() if lease.held]
        for lease, _ in places_read:
            pipe.zcard(lease.place_set)
        try:
            got = await pipe.execute()
        except BaseException:  # the commands may have run: only what is safe twice is sent again
            self._writing = {}
            written.set_result(None)
            self._returns[:0] = [(key, n) for key, n in returns if n < 0]  # additions, not give-backs
            self._freed[:0] = freed
            for key_id, tokens in charges.items():
                self._charges[key_id] = self._charges.get(key_id, 0) + tokens
            for lease, n in counted:
                lease.counted += n
            raise
        self._writing = {}
        written.set_result(None)
        generation = int(got[2] or 0)
        if generation < (self._generation or 0):  # Redis lost its data: nothing leased is counted
            self._returns = [(key, n) for key, n in self._returns if n < 0]
            for lease in self._leases.values():
                lease.requests = 0
        if generation != self._generation:
            self._generation = generation  # leases of another generation go back next tick,
            self._again = True  # which comes at once and confirms the new generation
        else:
            self._open_until = sent + FENCE
        for lease, key_id, at in read:
            if self._leases.get(key_id) is not lease:
                continue
            if key_id in charges:
                values = [got[at], got[at + 1], got[at + 3], got[at + 5]]
            else:
                values = got[at]
            pending = self._charges.get(key_id, 0)  # charged during the round trip
            totals = [int(v or 0) for v in values]
            lease.totals[0] = totals[0] + lease.counted
            for i in (1, 2, 3):
                lease.totals[i] = totals[i] + pending
        for lease, at in places_read:
            lease.in_flight = int(got[at])

    async def usage(self, key_id: int, now: float) -> Usage:
        """The key's usage in Redis, after the places this process gave back (sent first), with the
        tokens this process charged and has not written yet; the requests this process holds
        leased and unused are not counted as used."""
        w = Windows.at(now)
        keys = self.keys(key_id, w)
        freed, self._freed = self._freed, []
        pipe = redis.async_client().pipeline(transaction=False)
        _zrem_grouped(pipe, freed)
        for key in keys[:4]:
            pipe.get(key)
        pipe.zcount(keys[4], now, "+inf")
        try:
            got = await pipe.execute()
        except Exception:
            self._freed[:0] = freed
            self._free_later()
            raise
        values = [int(v or 0) for v in got[-5:]]
        pending = self._charges.get(key_id, 0)  # charged here, not written yet (next tick)
        for i in (1, 2, 3):
            values[i] += pending
        lease = self._leases.get(key_id)
        if lease is not None and lease.minute == w.minute:
            returning = sum(n for k, n in self._returns if k == keys[0].encode())  # leased, not yet back
            values[0] += lease.counted - lease.requests - returning
            values[4] -= len(lease.free)
        return Usage(*values)

    async def drained(self) -> None:
        """Give back every lease and write everything pending; wait for it (tests, shutdown).
        Cancelled (a shutdown's timeout), it cancels none of the calls requests wait on."""
        self._closing = True
        if self._leases or self._charges or self._returns:
            self._tick_soon()
        try:  # not the renewer: it runs while requests hold places, and they may outlive this
            while waiting := [task for task in self._background if task is not self._renewer]:
                await asyncio.wait(waiting)
        finally:
            self._closing = False


def _zrem_grouped(pipe: Any, places: list[tuple[bytes, bytes]]) -> None:
    """Queue on `pipe` one ZREM per set for `places` ((set, member) pairs)."""
    by_set: dict[bytes, list[bytes]] = {}
    for key, member in places:
        by_set.setdefault(key, []).append(member)
    for key, members in by_set.items():
        pipe.zrem(key, *members)


def confirm_generation(generation: int, timeout: float = FENCE) -> bool:
    """Blocking: wait until no router process can admit from a lease under a key generation older
    than `generation` (just bumped in Redis): each process in CONFIRMED has confirmed it, or
    the time its fast path stays open has passed. Returns False when that took `timeout`
    seconds (FENCE: by then every such fast path has closed, whatever the hash says)."""
    client = redis.sync_client()
    deadline = time.monotonic() + timeout
    while True:
        now = time.time()
        waiting = []
        for owner, value in client.hgetall(CONFIRMED).items():
            seen, _, until = value.decode().partition(" ")
            if float(until or 0) + CLOCK_SKEW < now:  # closed: ran out, or idle (negative)
                if abs(float(until or 0)) + 3600 < now:
                    client.hdel(CONFIRMED, owner)  # a process gone (or idle) for an hour
                continue
            if int(seen or 0) < generation:
                waiting.append(owner)
        if not waiting:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


async def _evalsha(client: Any, keys: list[bytes | str], args: list[object]) -> Any:
    """The admission script by its SHA-1; loaded first when this Redis does not know it yet."""
    from redis.exceptions import NoScriptError

    try:
        return await client.evalsha(_ADMIT_SHA, len(keys), *keys, *args)
    except NoScriptError:
        await client.script_load(_ADMIT)
        return await client.evalsha(_ADMIT_SHA, len(keys), *keys, *args)
