"""Prompt-cache affinity (issue 15): the turns of one conversation go back to the server that
already holds the conversation's prefix in its KV cache, so it skips that part of the prefill.

`Affinity(base)` is a selection strategy (routing/engine/selection.py) wrapped around any
other: for an `Ask` with an affinity key (computed by the protocol views,
routing/protocols/common/affinity.py) it looks up the endpoint it chose last for
(model, key); when that endpoint is among the candidates and has a free slot it is the choice,
otherwise the base strategy chooses and the memory moves to its choice. Asks without a key,
and unmetered choices, go straight to the base.

Invariants:
- Never over the cap: metered, it returns only a candidate with a free slot (as the base does).
- The wait: while the remembered endpoint is full (and enabled), a metered pick declines the
  other free candidates (returns None) for `hold` seconds after the request first asked
  (`Ask.since`). The board serves later waiters past such a waiter and asks again when its
  hold ends (routing/engine/board.py); from then on it is placed like any other request.
  Only a key with no request of its own holding a slot, and only one request per key at a
  time, waits: the turns of one conversation come one after the other, so requests of the
  same key at the same time are several conversations with one prefix (a shared few-shot
  prompt, a batch job), and they are spread as the base spreads them instead of queueing
  for one server. The board tells the strategy when a slot it placed is given back
  (`released`), which keeps the count per key.
- The memory is remembered at the moment of choice: every pick that returns a candidate is
  followed, in the same lock acquisition, by the reservation of its slot, so the entry always
  names the endpoint the request went to last (after a failover, the one that took over).
- One owner, one lock: `AffinityMap` is read and written only inside `pick`, which the board
  calls with its lock held (so it needs no lock of its own). What crosses that boundary (an
  entry read from Redis by routing/engine/affinity_shared.py, an entry to write there) passes
  through two bounded `collections.deque`s, whose append and popleft are thread-safe.
- Within the tier: the remembered endpoint is kept (or waited for) only when no candidate of
  a lower tier has a free slot. A conversation that spilled to tier 1 while tier 0 was full
  comes back to tier 0 as soon as it has room, as any request does (the operator's tiers say
  where work should go: a local GPU box before a paid API), and the memory follows it.
- Bounded: at most `max_entries` entries, the least recently used dropped first; an entry not
  used for `ttl` seconds is forgotten.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from time import monotonic

from routing.engine.selection import Ask, Load, SelectionStrategy
from routing.fleet.candidates import Candidate

OUTCOMES = ("kept", "moved", "new", "waited")
INBOX = 1024  # entries read from Redis waiting to be applied (older ones are dropped)
OUTBOX = 4096  # entries waiting to be written to Redis (older ones are dropped)


def memory_key(model: str, affinity: str) -> str:
    """The map's key: per model (the same conversation on another model is another prefix)."""
    return f"{model}\x00{affinity}"


@dataclass(slots=True)
class Entry:
    endpoint: int  # endpoint id
    expires: float  # monotonic seconds
    share_after: float  # monotonic seconds after which the shared copy (Redis) is refreshed
    busy: int = 0  # requests of this key holding a slot
    holder: Ask | None = None  # the request of this key allowed to wait for `endpoint`


class AffinityMap:
    """key -> endpoint id, LRU-bounded, with a time to live. Not thread-safe: its owner (the
    Affinity strategy) touches it only under the board's lock."""

    def __init__(self, *, ttl: float, max_entries: int) -> None:
        """ttl: seconds an entry lives after its last use; max_entries: at least 1."""
        self.ttl = ttl
        self.max_entries = max(1, max_entries)
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def knows(self, key: str) -> bool:
        """Whether `key` has an entry (possibly expired). A single dict lookup, atomic in
        CPython, so it may be read without the board's lock: a stale answer only costs (or
        saves) one Redis read."""
        return key in self._entries

    def entry(self, key: str, now: float) -> Entry | None:
        """The entry of `key`, or None (never, or expired: then dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now and not entry.busy:
            del self._entries[key]
            return None
        return entry

    def get(self, key: str, now: float) -> int | None:
        """The endpoint id remembered for `key`, or None (never, or expired: then dropped)."""
        entry = self.entry(key, now)
        return None if entry is None else entry.endpoint

    def put(self, key: str, endpoint: int, now: float, *, placed: bool = False) -> bool:
        """Remember (or refresh) `key` -> `endpoint` as most recently used; placed: a request of
        the key took a slot there (counted in `busy` until `done`). True when the shared copy
        should be written: a new key, another endpoint, or half the ttl since the last write."""
        entries = self._entries
        entry = entries.get(key)
        expires = now + self.ttl
        if entry is None:
            entries[key] = Entry(endpoint, expires, now + self.ttl / 2, busy=int(placed))
            if len(entries) > self.max_entries:
                entries.popitem(last=False)
            return True
        entries.move_to_end(key)
        entry.expires = expires
        entry.busy += placed
        if entry.endpoint != endpoint or now >= entry.share_after:
            entry.endpoint = endpoint
            entry.share_after = now + self.ttl / 2
            return True
        return False

    def done(self, key: str) -> None:
        """A request of `key` gave its slot back."""
        entry = self._entries.get(key)
        if entry is not None and entry.busy > 0:
            entry.busy -= 1

    def learn(self, key: str, endpoint: int, now: float) -> None:
        """An entry from elsewhere (another process): kept only if this map has none."""
        if key not in self._entries:
            self._entries[key] = Entry(endpoint, now + self.ttl, now + self.ttl / 2)
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


def _free_tier(candidates: Sequence[Candidate], load: Load, model: str) -> int | None:
    """The lowest tier among the candidates with a free slot for `model`; None: all full."""
    tiers = [c.endpoint.tier for c in candidates if load.has_free_slot(c, model)]
    return min(tiers) if tiers else None


class Affinity:
    """The affinity wrapper around `base` (see the module docstring)."""

    def __init__(
        self,
        base: SelectionStrategy,
        *,
        ttl: float = 1800.0,
        max_entries: int = 100_000,
        wait: float = 1.0,
        share: bool = False,
    ) -> None:
        """ttl, wait: seconds; share: queue remembered entries for Redis (`outbox`)."""
        self.base = base
        self.name = f"affinity+{base.name}"
        self.hold = max(0.0, wait)  # read by the board: how long a pick may decline free slots
        self.memory = AffinityMap(ttl=ttl, max_entries=max_entries)
        # (memory key, endpoint id) read from Redis, applied at the next pick
        self.inbox: deque[tuple[str, int]] = deque(maxlen=INBOX)
        # (memory key, endpoint id) to write to Redis; None: not shared
        self.outbox: deque[tuple[str, int]] | None = deque(maxlen=OUTBOX) if share else None
        # Choices of keyed, metered requests, for /metrics (routing/status/gauges.py): "kept" the
        # remembered server, "moved" elsewhere, "new" (no memory yet); "waited": waits begun.
        # Fixed keys, ints changed under the board's lock: a scrape may read them without it.
        self.counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)

    def pick(
        self, ask: Ask, candidates: Sequence[Candidate], load: Load, *, metered: bool
    ) -> Candidate | None:
        if ask.affinity is None or not metered:
            return self.base.pick(ask, candidates, load, metered=metered)
        now = monotonic()
        memory = self.memory
        inbox = self.inbox
        while inbox:
            memory.learn(*inbox.popleft(), now)
        key = memory_key(ask.model, ask.affinity)
        entry = memory.entry(key, now)
        if entry is not None:
            remembered = entry.endpoint
            top = _free_tier(candidates, load, ask.model)
            for cand in candidates:
                if cand.endpoint.id != remembered:
                    continue
                if top is not None and cand.endpoint.tier > top:
                    break  # a lower tier has room: the tier comes first (it spilled here)
                if load.has_free_slot(cand, ask.model):
                    if entry.holder is ask:
                        entry.holder = None
                    self._remember(key, remembered, now)
                    self.counts["kept"] += 1
                    return cand
                if load.limit(cand) > 0 and now - ask.since < self.hold and not entry.busy:
                    holder = entry.holder
                    if holder is ask:
                        return None  # still waiting
                    if holder is None or now - holder.since >= self.hold:
                        entry.holder = ask
                        self.counts["waited"] += 1
                        return None  # full: wait for it a little (the board serves others meanwhile)
                break
            if entry.holder is ask:
                entry.holder = None
        before = None if entry is None else entry.endpoint
        chosen = self.base.pick(ask, candidates, load, metered=True)
        if chosen is not None:
            after = chosen.endpoint.id
            self._remember(key, after, now)
            self.counts["new" if before is None else "kept" if after == before else "moved"] += 1
        return chosen

    def released(self, ask: Ask, candidate: Candidate) -> None:
        """The board gave back a slot placed for `ask` (under its lock)."""
        if ask.affinity is not None:
            self.memory.done(memory_key(ask.model, ask.affinity))

    def _remember(self, key: str, endpoint: int, now: float) -> None:
        if self.memory.put(key, endpoint, now, placed=True) and self.outbox is not None:
            self.outbox.append((key, endpoint))

    def clear(self) -> None:
        """Forget everything (tests)."""
        self.memory.clear()
        self.inbox.clear()
        if self.outbox is not None:
            self.outbox.clear()
