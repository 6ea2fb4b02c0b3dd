"""Images another process stored, announced on this daemon's event bus.

A `pms-bridge import` run from the command line (a CD, a migration), or a second daemon on the same
PostgreSQL store, adds images this daemon's service never saw. Its viewers following the PMS (the event
stream) and its push workers should hear of them as of any other: the worker here looks for images added
since it last looked whenever the store's change generation moves (bridge.store.changes; every poll where
the generation is unknown), and publishes `images-added` for those this process did not add itself, with
`origin_protocol = "store"`, within about a second.

"Did not add itself" is exact, not a guess by time: the service registers the ids of the images it adds
inside the adding transaction, before it commits (`OwnAdditions`), so the watcher, which can only see them
after the commit, always knows them as ours. Registration is off until the watcher runs, so a command-line
import keeps nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row
from sqlalchemy.orm import Session

from bridge.events import ImagesAdded
from bridge.store import queries as q

if TYPE_CHECKING:
    from bridge.runtime import Runtime

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
BATCH = 1000  # new images read per query; a large import elsewhere is announced in several queries
GAP_SECONDS = 60.0  # how long an id skipped over is looked for (an insert's transaction still open)
MAX_GAPS = 1000  # ids skipped over that are kept at most (a sequence moved on by thousands leaves no more)
ORIGIN_PROTOCOL = "store"


class OwnAdditions:
    """The ids of images this process is adding or has added and the watcher has not passed yet.

    `adding` runs in a database thread inside the transaction, `others` and `passed` on the event loop;
    each is one set operation, atomic under the GIL.
    """

    def __init__(self) -> None:
        self.active = False
        self._ids: set[int] = set()

    def adding(self, image_ids: Iterable[int]) -> None:
        """Images this process is inserting (called before the commit)."""
        if self.active:
            self._ids.update(image_ids)

    def not_added(self, image_ids: Iterable[int]) -> None:
        """Images whose transaction rolled back: their ids may be given again (SQLite reuses them)."""
        self._ids.difference_update(image_ids)

    def others(self, image_ids: Iterable[int]) -> list[int]:
        """Of these newly seen ids, those another process added; ours are forgotten as they are passed."""
        found = []
        for image_id in image_ids:
            if image_id in self._ids:
                self._ids.discard(image_id)
            else:
                found.append(image_id)
        return found

    def passed(self, high: int) -> None:
        """The watcher has seen every id up to `high`: ours among them need no keeping."""
        self._ids.difference_update([image_id for image_id in self._ids if image_id <= high])


class Watcher:
    """What the announcing worker knows: the highest image id seen, and the ids below it not seen yet.

    Ids are handed out when a row is inserted, not when its transaction commits, so on PostgreSQL two
    writers can commit 101 before 100. An id skipped over is kept as a gap for `GAP_SECONDS` and looked
    for again on every pass; a gap that never fills was a rolled-back insert (PostgreSQL's sequences
    leave those).
    """

    def __init__(self, rt: Runtime, high: int) -> None:
        self.rt = rt
        self.high = high
        self.gaps: dict[int, float] = {}  # id -> monotonic time first skipped

    async def look(self) -> bool:
        """Announce what others added since the last look; whether a full batch came back (look again)."""
        now = time.monotonic()
        self.gaps = {image_id: t for image_id, t in self.gaps.items() if now - t < GAP_SECONDS}
        gaps = sorted(self.gaps)
        high = self.high

        def work(session: Session) -> tuple[list[Row[Any]], list[Row[Any]]]:
            late: list[Row[Any]] = list(session.execute(q.image_patients_by_ids(gaps))) if gaps else []
            fresh: list[Row[Any]] = list(session.execute(q.image_patients_after(high, BATCH)))
            return late, fresh

        late, fresh = await self.rt.db.read(work)
        previous = self.high
        for row in fresh:
            self.gaps.update(
                (skipped, now) for skipped in range(max(previous + 1, row.id - MAX_GAPS), row.id)
            )
            previous = row.id
        for row in late:
            self.gaps.pop(row.id, None)
        if len(self.gaps) > MAX_GAPS:  # the highest ids are the likeliest to be open transactions
            self.gaps = dict(sorted(self.gaps.items())[-MAX_GAPS:])
        if fresh:
            self.high = fresh[-1].id
        own = self.rt.service.own_additions
        rows = late + fresh
        others = set(own.others(row.id for row in rows))
        by_patient: dict[int, list[int]] = defaultdict(list)
        for row in rows:
            if row.id in others:
                by_patient[row.patient_id].append(row.id)
        for patient_id, image_ids in by_patient.items():
            self.rt.bus.publish(
                ImagesAdded(
                    patient_id=patient_id, image_ids=tuple(image_ids), origin_protocol=ORIGIN_PROTOCOL
                )
            )
        # ours below every open gap and the high-water mark are done with; a gap may still be ours
        own.passed(min(self.gaps, default=self.high + 1) - 1)
        return len(fresh) == BATCH


async def announce_stored_elsewhere(rt: Runtime) -> None:
    """Publish `images-added` for images other processes add to the store, until cancelled (a daemon
    worker, always on: bridge.daemon.WORKER_FACTORIES)."""
    own = rt.service.own_additions
    own.active = True  # before the high-water mark is read: an image added in between is known as ours
    try:
        watcher = await _start(rt)
        own.passed(watcher.high)
        seen = rt.db.generation.current()
        while True:
            await asyncio.sleep(POLL_SECONDS)
            generation = rt.db.generation.current()
            if generation is not None and generation == seen and not watcher.gaps:
                continue
            try:
                more = await watcher.look()
            except Exception:  # the store is away: look again next time
                log.warning("cannot look for images stored elsewhere", exc_info=True)
                continue
            if not more:
                seen = generation
    finally:
        own.active = False


async def _start(rt: Runtime) -> Watcher:
    """A watcher from the store's highest image id, asked until the store answers."""
    while True:
        try:
            high = await rt.db.read(lambda session: session.scalar(q.highest_image_id()) or 0)
        except Exception:  # the store is away: ask again
            log.warning("cannot read the store's highest image id", exc_info=True)
            await asyncio.sleep(POLL_SECONDS)
            continue
        log.info("watching for images stored elsewhere", extra={"after_image_id": high})
        return Watcher(rt, high)
