"""Selection: which candidate endpoint serves a request, as a pluggable strategy.

The board (routing/engine/board.py) owns the counters, the queue and the lock; a strategy owns
only the rule. The board calls `SelectionStrategy.pick` with its lock held, for a new request
(`try_acquire`, the re-check in `acquire`), for a waiter when a slot frees (`_serve_waiters`)
and for a choice without a slot (`unmetered`), so choosing and reserving stay one atomic step.

What a strategy may read: the request as the board was asked for it (`Ask`: model key, an
affinity key, when it first asked), the candidates (routing/fleet/candidates.py: endpoint with
its limit, backend model name, loaded flag) and the board's counters (`Load`: slots held per
(endpoint, model) and per endpoint, current limits, the moving average of time to first byte
per (endpoint, model)). What it must not do: I/O, await, take another lock, or keep `Load`
past the call (it is a view of the board's own dicts). It runs in O(len(candidates)).

Invariant every strategy keeps: with `metered=True` it returns only a candidate with a free
slot (`Load.has_free_slot`), else None (the request waits); with `metered=False` (no slot is
taken, e.g. /api/show) it returns any candidate, None only when there are none.
One exception, declared by the strategy: one with a `hold` attribute (seconds, optional) may
return None while a candidate is free, for at most `hold` seconds after `Ask.since` (prompt-
cache affinity waiting for its own server, routing/engine/affinity.py); the board then serves
the waiters behind it and asks again when the hold ends. A strategy may also define
`released(ask, candidate)`: the board calls it, under its lock, when a slot it chose for `ask`
is given back (the same rules as `pick`).

The first strategy is today's rule, `LoadedThenLeastBusy`. Prompt-cache affinity
(routing/engine/affinity.py) wraps whichever base strategy the board has; tiers and weights and
latency-aware ties (issue 15) are further strategies over the same inputs.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from time import monotonic
from typing import Protocol

from routing.fleet.candidates import Candidate

Slot = tuple[int, str]  # (endpoint id, model key)


@dataclass(frozen=True, slots=True)
class Ask:
    """The request being placed."""

    model: str  # model key ("llama3:latest")
    # A conversation's key for prompt-cache affinity (issue 15: a session header, the OpenAI
    # `user` field or a hash of the prompt's stable prefix); None: not known.
    affinity: str | None = None
    since: float = field(default_factory=monotonic)  # time.monotonic() when it first asked


@dataclass(frozen=True, slots=True)
class Load:
    """The board's counters, read-only. A view of the board's own dicts (no copies): valid only
    while the board's lock is held, i.e. during `pick`."""

    active: Mapping[Slot, int]  # slots held per (endpoint id, model key); absent: 0
    per_endpoint: Mapping[int, int]  # slots held per endpoint id, all models; absent: 0
    limits: Mapping[int, int]  # current limit per endpoint id (0: disabled); absent: the candidate's own
    first_byte: Mapping[Slot, float]  # moving average of time to first byte, seconds; absent: none yet

    def limit(self, cand: Candidate) -> int:
        ep = cand.endpoint
        return self.limits.get(ep.id, ep.limit)

    def has_free_slot(self, cand: Candidate, model: str) -> bool:
        """Whether `cand` can take one more request for `model` within its limit."""
        return self.active.get((cand.endpoint.id, model), 0) < self.limit(cand)


class SelectionStrategy(Protocol):
    name: str  # short, stable; for logs and the docs

    def pick(
        self, ask: Ask, candidates: Sequence[Candidate], load: Load, *, metered: bool
    ) -> Candidate | None:
        """The candidate to serve `ask`, or None. Called under the board's lock: no I/O, no
        await, no other lock, O(len(candidates)). metered: only a candidate with a free slot,
        else None; not metered (no slot is taken): any candidate, None only if there are none."""
        ...


class LoadedThenLeastBusy:
    """Today's rule: a candidate that has the model loaded first, then the least busy for the
    model, then the least busy overall; ties broken at random (so equal servers share the load).
    Metered, a candidate at its limit is skipped."""

    name = "loaded-then-least-busy"

    def pick(
        self, ask: Ask, candidates: Sequence[Candidate], load: Load, *, metered: bool
    ) -> Candidate | None:
        model = ask.model
        active, per_endpoint, limits = load.active, load.per_endpoint, load.limits
        best: Candidate | None = None
        best_key: tuple[int, int, int, float] | None = None
        for cand in candidates:
            ep = cand.endpoint
            held = active.get((ep.id, model), 0)
            if metered and held >= limits.get(ep.id, ep.limit):
                continue
            key = (0 if cand.loaded else 1, held, per_endpoint.get(ep.id, 0), random.random())
            if best_key is None or key < best_key:
                best, best_key = cand, key
        return best
