"""Token accounting of finished requests: the counts a reply reported."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Counts:
    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion
