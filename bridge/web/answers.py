"""Answers to repeated identical requests, kept while the store is unchanged (used by OPP web).

A browser-based PMS asks VIEW and VIEW_DATA for the same patient again on every page it shows. The answer
to an identical request (same method, message, media type and address) is the same answer as long as the
store has not changed (the generation of bridge/store/changes.py) and the service marked it `repeatable`
(a pure read: nothing was created or updated). Such an answer is kept and given again without parsing,
asking the store or rendering; `BridgeService.repeat` still writes its audit entry and tells viewers, with
the new request's origin, so a repeated answer is recorded like any other.

Entries are also dropped after `max_age` seconds, because answers carry signed thumbnail URLs that expire,
and only small requests are kept (an OPP message is a few hundred bytes).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from bridge.model import Outcome
from bridge.store.changes import Generation, GenerationMemo

M = TypeVar("M")

MAX_KEPT = 4096
MAX_REQUEST_BYTES = 4096


@dataclass(frozen=True)
class Kept(Generic[M]):
    """One answer as it was given: the parsed message, the service's outcome and the rendered body."""

    message: M
    outcome: Outcome
    body: bytes
    content_type: str


class RepeatedAnswers(Generic[M]):
    """Kept answers for the current store generation (a GenerationMemo), and which answers may be kept."""

    def __init__(self, generation: Generation, *, max_age: float) -> None:
        self._memo: GenerationMemo[Kept[M]] = GenerationMemo(
            generation, max_entries=MAX_KEPT, max_age=max_age
        )

    def get(self, key: Hashable) -> tuple[Kept[M] | None, int | None]:
        """The kept answer for `key` (or None) and the store generation now, which `keep` needs."""
        return self._memo.get(key)

    def keep(self, key: Hashable, size: int, generation: int | None, kept: Kept[M]) -> None:
        """Keep a repeatable answer computed under `generation` (from `get`), unless the store changed
        meanwhile (the answer may then describe the old state) or the request is too big to key on."""
        if kept.outcome.repeatable and size <= MAX_REQUEST_BYTES:
            self._memo.keep(key, generation, kept)
