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

The base strategy is `TieredLeastBusy` (tier, loaded, weighted least busy, first-byte
latency, random: its docstring and the README's "How a server is chosen"). Prompt-cache
affinity (routing/engine/affinity.py) wraps whichever base strategy the board has.
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


# Two first-byte averages count as equally fast when the slower is within this factor of the
# faster, plus LATENCY_SLACK: the averages move with prompt length and network noise, and a
# server must not lose every tie to another that is only noise-faster.
LATENCY_TOLERANCE = 1.2
LATENCY_SLACK = 0.01  # seconds


class TieredLeastBusy:
    """The base rule (issue 15, tiers and weights, latency-aware ties). For each candidate (with
    a free slot when metered), in order of importance:

    1. its endpoint's tier, lowest first: requests fill tier 0 and spill to tier 1 only when
       every tier-0 candidate is full (metered) or failing (a failing endpoint is no candidate:
       its breaker is open, routing/fleet/candidates.py);
    2. the model loaded there first;
    3. the weighted share after taking the slot, lowest first: (slots held for the model + 1) /
       weight, then (slots held on the endpoint, all models, + 1) / weight, so concurrent
       requests spread over a tier in proportion to the weights (3:1 weights hold 3:1 slots);
       with every weight 1 this is plain least busy;
    4. the time to first byte (Load.first_byte, moving average per endpoint and model) among
       the candidates equal on 1-3: any within LATENCY_TOLERANCE (and LATENCY_SLACK) of the
       fastest is as good as it; one with no average yet counts as the fastest, so a new
       server is tried and measured;
    5. at random among what is left, so equal servers share the load.

    Tier before loaded: the tier is the operator's statement of where work should go (a GPU
    box before a CPU box, a local server before a paid API). A CPU box that happens to have the
    model loaded still serves every request slower, or at a cost, while loading it on the free
    GPU box costs a few seconds once; an operator who wants "loaded" to win puts both servers in
    one tier. Unmetered picks (no slot taken, /api/show) follow the same order without the cap.

    A queued request keeps the candidates (and so the tiers and weights) of its lookup; limits
    are the board's current ones. O(len(candidates)): one pass, a key tuple per candidate, and
    a list of the candidates tied on 1-3 only when there are several."""

    name = "tiered-least-busy"

    def pick(
        self, ask: Ask, candidates: Sequence[Candidate], load: Load, *, metered: bool
    ) -> Candidate | None:
        # `rank` below, inlined (this runs under the board's lock on every request); the
        # property test in tests/routing/engine/test_selection_tiers.py holds the two together.
        model = ask.model
        active, per_endpoint, limits = load.active, load.per_endpoint, load.limits
        best: Rank | None = None
        first: Candidate | None = None  # the first holder of `best`
        ties: list[Candidate] | None = None  # every holder of `best`, once there are two
        for cand in candidates:
            ep = cand.endpoint
            held = active.get((ep.id, model), 0)
            if metered and held >= limits.get(ep.id, ep.limit):
                continue
            weight = ep.weight
            key = (
                ep.tier,
                0 if cand.loaded else 1,
                (held + 1) / weight,
                (per_endpoint.get(ep.id, 0) + 1) / weight,
            )
            if best is None or key < best:
                best, first, ties = key, cand, None
            elif key == best:
                if ties is None:
                    ties = [first] if first is not None else []
                ties.append(cand)
        if ties is None:
            return first
        return _fastest_at_random(ties, model, load.first_byte)


def _fastest_at_random(ties: list[Candidate], model: str, first_byte: Mapping[Slot, float]) -> Candidate:
    """At random among `ties` (not empty) whose first-byte average is within the tolerance of
    the fastest known one, or unknown."""
    fastest: float | None = None
    for cand in ties:
        seconds = first_byte.get((cand.endpoint.id, model))
        if seconds is not None and (fastest is None or seconds < fastest):
            fastest = seconds
    if fastest is not None:
        bound = fastest * LATENCY_TOLERANCE + LATENCY_SLACK
        ties = [c for c in ties if (s := first_byte.get((c.endpoint.id, model))) is None or s <= bound]
    return ties[int(random.random() * len(ties))]


# (tier, 0 if loaded else 1, weighted share for the model, weighted share of the endpoint)
Rank = tuple[int, int, float, float]


def rank(cand: Candidate, model: str, load: Load, metered: bool) -> Rank | None:
    """`cand`'s place in TieredLeastBusy's order (1-3), lowest best; None when metered and full.
    The shares are after taking the slot: (held + 1) / weight. Equal ratios are equal floats
    (IEEE division is correctly rounded), so 2/2 ties with 1/1."""
    ep = cand.endpoint
    held = load.active.get((ep.id, model), 0)
    if metered and held >= load.limits.get(ep.id, ep.limit):
        return None
    weight = ep.weight
    return (
        ep.tier,
        0 if cand.loaded else 1,
        (held + 1) / weight,
        (load.per_endpoint.get(ep.id, 0) + 1) / weight,
    )
