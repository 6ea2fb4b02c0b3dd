"""Delivering outbox messages (pushes of new images to PMSs) once, across restarts, with backoff.

The service writes a message in the same transaction as the images it announces. A worker per channel
claims due messages (state "sending", attempts + 1), calls the channel's sender and marks the message
done, or schedules a retry with exponential backoff.

Several daemons may share one store (scale-out on PostgreSQL), so a claim names its daemon (the
runtime's instance id, new with every start) and carries a lease (`[daemon] outbox_lease`) that the
worker renews while the send runs, however long the PMS takes. A message in "sending" whose lease is
alive is another daemon's business and is never touched; one whose lease ran out was cut off (its
daemon died, or this one before a restart): a worker takes it over, at start and every half lease, and
the channel's `recover` hook decides whether the PMS already has it (then it is done, not sent twice)
or it is sent again. A graceful stop hands its claims back (lease ended) so that the next start settles
them at once. Only the daemon holding a claim may settle the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy.orm import Session

from bridge.delivery import Undeliverable, failure_text
from bridge.handlers.vdds_push import push_channels
from bridge.store import queries as q
from bridge.store.models import OutboxMessage
from bridge.store.types import utcnow
from bridge.thumbfolders import folder_targets

if TYPE_CHECKING:
    from sqlalchemy.engine import CursorResult

    from bridge.config import Settings
    from bridge.runtime import Runtime

log = logging.getLogger(__name__)

BACKOFF_SECONDS = (2.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
T = TypeVar("T")


@dataclass(frozen=True)
class OutboxItem:
    id: int
    channel: str
    patient_id: int
    payload: dict[str, Any]
    attempts: int


# Raises to ask for a retry (bridge.delivery: what is logged and recorded of the exception).
Sender = Callable[["Runtime", OutboxItem], Awaitable[None]]
Recover = Callable[["Runtime", OutboxItem], Awaitable[bool]]  # True: the PMS already has it

# Rules deciding which channels announce new images to the PMS behind a link; each takes the settings,
# the link's protocol and its PMS system. Channels add theirs (see bridge.runtime.Runtime.build).
TargetRule = Callable[["Settings", str, str], Sequence[str]]
TARGET_RULES: list[TargetRule] = [
    folder_targets,
    push_channels,  # VDDS-media stage 6 (MMOINFIMPORT)
]


# The rules of channels that show an image's current state (files a PMS reads again): when a clinician
# changes an image (orientation, teeth, category), these get the image again. A VDDS stage-6 push is an
# announcement of a new object, not sent twice.
REFRESH_RULES: list[TargetRule] = [folder_targets]


def push_targets(
    settings: Settings, rules: Sequence[TargetRule] = TARGET_RULES
) -> Callable[[str, str], Sequence[str]]:
    """The service's push-target function for these settings, from every channel's rule."""

    def targets(protocol: str, pms_system: str) -> Sequence[str]:
        found: list[str] = []
        for rule in rules:
            found.extend(rule(settings, protocol, pms_system))
        return found

    return targets


def _item(msg: OutboxMessage) -> OutboxItem:
    return OutboxItem(msg.id, msg.channel, msg.patient_id, dict(msg.payload or {}), msg.attempts)


class OutboxWorker:
    """Sends one channel's messages; run() loops until cancelled."""

    def __init__(
        self,
        rt: Runtime,
        channel: str,
        sender: Sender,
        *,
        recover: Recover | None = None,
        poll_seconds: float = 1.0,
        max_attempts: int = 50,
        backoff: Sequence[float] = BACKOFF_SECONDS,
    ) -> None:
        self.rt = rt
        self.channel = channel
        self.sender = sender
        self.recover_hook = recover
        self.poll_seconds = poll_seconds
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.wake = asyncio.Event()
        self.instance = rt.instance_id
        self.lease = rt.settings.daemon.outbox_lease
        self._held: set[int] = set()  # claimed by this worker and not settled yet

    def _claim(self, msg: OutboxMessage, now: datetime) -> OutboxItem:
        """Make `msg` this daemon's, in the claiming transaction (the caller notes it in `_held` once
        that has committed)."""
        msg.state, msg.claimed_by, msg.claimed_at = "sending", self.instance, now
        msg.lease_until = now + timedelta(seconds=self.lease)
        return _item(msg)

    async def recover(self) -> int:
        """Take over the messages left in "sending" whose lease ran out and settle them: done if the PMS
        has them, else due again. Returns how many. Messages another daemon holds are left alone."""
        held = frozenset(self._held)

        def take_over(session: Session) -> list[tuple[OutboxItem, str]]:
            now = utcnow()
            taken = []
            for msg in session.scalars(q.expired_outbox(self.channel, now)):
                # one this worker is still sending (its renewal failed while the store was away) is
                # not taken over from itself
                if msg.id not in held:
                    previous = msg.claimed_by or ""
                    taken.append((self._claim(msg, now), previous))
            return taken

        taken = await self.rt.db.write(take_over, watched=False)
        self._held.update(item.id for item, _previous in taken)
        for n, (item, previous) in enumerate(taken):
            hook = self.recover_hook
            try:
                delivered = hook is not None and await self._leased(item, hook(self.rt, item))
            except Exception:  # not known whether the PMS has it: looked at again on a later pass
                await self._release([other.id for other, _previous in taken[n:]])
                raise
            await self._finish(item, delivered=delivered, error="interrupted: its daemon stopped or died")
            log.info(
                "outbox recovered",
                extra={"channel": self.channel, "id": item.id, "delivered": delivered, "from": previous},
            )
        return len(taken)

    async def run(self) -> None:
        log.info("outbox worker started", extra={"channel": self.channel, "instance": self.instance})
        next_recover = 0.0
        while True:
            try:
                if time.monotonic() >= next_recover:  # at start, then every half lease
                    next_recover = time.monotonic() + self.lease / 2
                    await self.recover()
                sent = await self.run_once()
            except Exception:
                log.exception("outbox pass failed", extra={"channel": self.channel})
                sent = 0
            if not sent:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.poll_seconds)

    async def run_once(self) -> int:
        """Send every due message once; returns how many were attempted."""

        def claim(session: Session) -> list[OutboxItem]:
            claimed = []
            now = utcnow()
            for msg in session.scalars(q.due_outbox(self.channel, now)):
                msg.attempts += 1
                claimed.append(self._claim(msg, now))
            return claimed

        items = await self.rt.db.write(claim, watched=False)
        self._held.update(item.id for item in items)
        for item in items:
            try:
                await self._leased(item, self.sender(self.rt, item))
            except Undeliverable as exc:
                error = failure_text(exc)
                log.error(
                    "push undeliverable", extra={"channel": self.channel, "id": item.id, "error": error[:300]}
                )
                await self._finish(item, delivered=False, error=error, final=True)
            except Exception as exc:
                error = failure_text(exc)
                log.warning(
                    "push failed; will retry",
                    extra={
                        "channel": self.channel,
                        "id": item.id,
                        "attempt": item.attempts,
                        "error": error[:300],
                    },
                )
                await self._finish(item, delivered=False, error=error)
            else:
                await self._finish(item, delivered=True)
                log.info("pushed", extra={"channel": self.channel, "id": item.id})
        return len(items)

    async def _leased(self, item: OutboxItem, work: Awaitable[T]) -> T:
        """Await `work` (a send, or a recover hook) while renewing the claim on `item` every third of the
        lease: a push may take the PMS minutes, and the claim must not run out under it. A stop
        (cancellation) hands back every claim this worker holds, so that the next start, or another
        daemon, settles them at once instead of after the lease."""
        renewer = asyncio.create_task(self._renew(item), name=f"outbox-lease-{item.id}")
        try:
            return await work
        except asyncio.CancelledError:
            await self._release(sorted(self._held))
            raise
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)

    async def _renew(self, item: OutboxItem) -> None:
        def renew(session: Session) -> bool:
            until = utcnow() + timedelta(seconds=self.lease)
            result = session.execute(q.renew_outbox_lease(item.id, self.instance, until))
            return bool(cast("CursorResult[Any]", result).rowcount)

        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                kept = await self.rt.db.write(renew, watched=False)
            except Exception as exc:  # the store is away: try again; the lease has two more thirds
                log.warning(
                    "outbox lease not renewed",
                    extra={"channel": self.channel, "id": item.id, "error": type(exc).__name__},
                )
                continue
            if not kept:
                log.warning(
                    "outbox claim taken over by another daemon",
                    extra={"channel": self.channel, "id": item.id},
                )
                return

    async def _release(self, ids: Sequence[int]) -> None:
        """End this worker's claims on messages `ids` now (they stay "sending": whoever takes them over
        asks the channel's recover hook whether the PMS has them). Best effort: a claim not released
        runs out."""

        def work(session: Session) -> None:
            now = utcnow()
            for msg_id in ids:
                msg = session.get(OutboxMessage, msg_id)
                if msg is not None and msg.state == "sending" and msg.claimed_by == self.instance:
                    msg.lease_until = now

        try:
            await self.rt.db.write(work, watched=False)
        except Exception:
            log.warning("outbox claims not handed back; they run out", extra={"channel": self.channel})
        self._held.difference_update(ids)

    async def _finish(
        self, item: OutboxItem, *, delivered: bool, error: str = "", final: bool = False
    ) -> None:
        """Settle a message this worker holds. One another daemon took over meanwhile (this one stalled
        past its lease) is left to that daemon: it asks the PMS's side whether the push arrived."""

        def work(session: Session) -> bool:
            msg = session.get(OutboxMessage, item.id)
            if msg is None:
                return True
            if msg.state != "sending" or msg.claimed_by != self.instance:
                return False
            now = utcnow()
            msg.lease_until = None
            if delivered:
                msg.state, msg.done_at, msg.last_error = "done", now, ""
                return True
            msg.last_error = error[:1000]
            if final or msg.attempts >= self.max_attempts:
                msg.state = "failed"
                return True
            delay = self.backoff[min(max(msg.attempts - 1, 0), len(self.backoff) - 1)]
            msg.state, msg.next_attempt_at = "pending", now + timedelta(seconds=delay)
            return True

        settled = await self.rt.db.write(work, watched=False)
        self._held.discard(item.id)
        if not settled:
            log.warning(
                "outbox message was taken over by another daemon",
                extra={"channel": self.channel, "id": item.id},
            )
