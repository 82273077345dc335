"""Whether this process still takes new requests: `serving.draining`.

Owned by the lifecycle (routing/server/lifecycle.py), which sets it once when the drain starts;
read by the lean handler (503 for new proxied requests) and by /health ("draining"). A single
bool written once by the event loop: no lock.
"""

from __future__ import annotations


class Serving:
    __slots__ = ("draining",)

    def __init__(self) -> None:
        self.draining = False


serving = Serving()
