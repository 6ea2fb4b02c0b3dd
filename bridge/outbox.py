"""Delivering outbox messages (pushes of new images to PMSs) once, across restarts, with backoff.

The service writes a message in the same transaction as the images it announces. A worker per channel
claims due messages (state "sending", attempts + 1), calls the channel's sender and marks the message
done, or schedules a retry with exponential backoff.

Several daemons may share one store (scale-out on PostgreSQL), so a claim names its daemon (the
runtime's instance id, new with every start) and carries a lease (`[daemon] outbox_lease`). A worker
claims a batch (up to 20) and sends it one message after another; it renews the lease of every claim it
holds, in one UPDATE every third of the lease, however long the PMS takes, and checks and extends the
claim on each message in the store right before sending it. A message in "sending" whose lease is alive
is another daemon's business and is never touched; one whose lease ran out was cut off (its daemon died,
hung, or lost the store for a whole lease): a worker takes it over, at start and every half lease, and
the channel's `recover` hook decides whether the PMS already has it (then it is done, not sent twice)
or it is sent again. A daemon that finds a claim lost (taken over, or not renewed within the lease)
does not send that message, and cuts off its send in progress as a stop does. A graceful stop hands its
claims back (lease ended) so that the next start settles them at once. Only the daemon holding a claim
may settle the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.orm import Session

from bridge.delivery import Undeliverable, failure_text
from bridge.handlers.vdds_push import push_channels
from bridge.store import queries as q
from bridge.store.db import StoreFileLost
from bridge.store.models import OutboxMessage
from bridge.store.types import utcnow
from bridge.thumbfolders import folder_targets

if TYPE_CHECKING:
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


class ClaimLost(Exception):
    """The claim on the message being sent (or recovered) was lost meanwhile, and the attempt cut off."""


@dataclass
class _Attempt:
    """The send (or recover hook) in progress, which the lease keeper cuts off when its claim is lost."""

    item_id: int
    task: asyncio.Future[Any]
    lost: bool = False


@dataclass
class _Claims:
    """The claims of one batch a worker has in hand (`OutboxWorker._holding`)."""

    held: set[int]  # not settled, not lost
    valid_until: float  # monotonic; not renewed by then, the held claims count as lost
    checked: int | None  # the held message whose claim the last transaction confirmed
    attempt: _Attempt | None = None


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

    def _claim(self, msg: OutboxMessage, now: datetime) -> OutboxItem:
        """Make `msg` this daemon's, in the claiming transaction (the caller holds the claims, in
        `_holding`, once that has committed)."""
        msg.state, msg.claimed_by, msg.claimed_at = "sending", self.instance, now
        msg.lease_until = now + timedelta(seconds=self.lease)
        return _item(msg)

    async def recover(self) -> int:
        """Take over the messages left in "sending" whose lease ran out and settle them: done if the PMS
        has them, else due again. Returns how many. Messages another daemon holds are left alone."""

        def take_over(session: Session) -> list[tuple[OutboxItem, str]]:
            now = utcnow()
            taken = []
            for msg in session.scalars(q.expired_outbox(self.channel, now)):
                previous = msg.claimed_by or ""
                taken.append((self._claim(msg, now), previous))
            return taken

        claimed_at = time.monotonic()
        taken = await self.rt.db.write(take_over, watched=False)
        if not taken:
            return 0
        # A hook that raises (not known whether the PMS has the message) leaves it and the rest to a
        # later pass: _holding hands back the claims still held.
        async with self._holding([item.id for item, _previous in taken], claimed_at) as claims:
            for item, previous in taken:
                if item.id not in claims.held:
                    continue  # lost while earlier hooks ran: its new holder settles it
                delivered = False
                if self.recover_hook is not None:
                    try:
                        delivered = await self._leased(claims, item, self.recover_hook(self.rt, item))
                    except ClaimLost:
                        continue
                await self._finish(
                    claims, item, delivered=delivered, error="interrupted: its daemon stopped or died"
                )
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
            except StoreFileLost:
                sent = 0  # logged once where it was found; nothing is claimed or sent meanwhile
            except Exception:
                log.exception("outbox pass failed", extra={"channel": self.channel})
                sent = 0
            if not sent:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_seconds):
                        await self.wake.wait()

    async def run_once(self) -> int:
        """Send every due message once; returns how many were claimed (a batch of up to 20)."""

        def claim(session: Session) -> list[OutboxItem]:
            claimed = []
            now = utcnow()
            for msg in session.scalars(q.due_outbox(self.channel, now)):
                msg.attempts += 1
                claimed.append(self._claim(msg, now))
            return claimed

        claimed_at = time.monotonic()
        items = await self.rt.db.write(claim, watched=False)
        if not items:
            return 0
        async with self._holding([item.id for item in items], claimed_at) as claims:
            for item in items:
                if not await self._confirm(claims, item):
                    continue  # its new holder settles it
                try:
                    await self._leased(claims, item, self.sender(self.rt, item))
                except ClaimLost:
                    continue
                except Undeliverable as exc:
                    error = failure_text(exc)
                    log.error(
                        "push undeliverable",
                        extra={"channel": self.channel, "id": item.id, "error": error[:300]},
                    )
                    await self._finish(claims, item, delivered=False, error=error, final=True)
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
                    await self._finish(claims, item, delivered=False, error=error)
                else:
                    await self._finish(claims, item, delivered=True)
                    log.info("pushed", extra={"channel": self.channel, "id": item.id})
        return len(items)

    # ----------------------------------------------------------------------------------------------
    # Holding claims: a message is sent only by the daemon holding a live claim on it

    @contextlib.asynccontextmanager
    async def _holding(self, ids: Sequence[int], claimed_at: float) -> AsyncIterator[_Claims]:
        """Hold the claims just made (at monotonic `claimed_at`) on messages `ids`, in id order, while
        they are worked through one after another: a keeper renews them all every third of the lease,
        however long the batch takes. Before, only the message being sent was renewed: the rest of the
        batch ran out under a slow push, another daemon took them over and sent them, and this one then
        sent them again.

        Claims still held at the end (a stop, or an error cut the pass short) are handed back, so that
        the next pass, the next start or another daemon settles them at once through the recover hook."""
        # the claim, just made, confirms the first message's
        claims = _Claims(set(ids), claimed_at + self.lease, checked=ids[0])
        keeper = asyncio.create_task(self._keep(claims), name=f"outbox-leases-{self.channel}")
        try:
            yield claims
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            if claims.held:
                await self._release(claims)

    def _extend(self, session: Session, ids: Sequence[int]) -> set[int]:
        """In a transaction: extend this worker's live claims on `ids` by a lease from now; returns the
        ids it still holds (the others were taken over, or their lease ran out)."""
        now = utcnow()
        until = now + timedelta(seconds=self.lease)
        return set(session.scalars(q.extend_outbox_claims(ids, self.instance, now, until)))

    async def _keep(self, claims: _Claims) -> None:
        """Renew every claim held, each third of the lease, in one UPDATE, until none is left.

        A claim found lost is dropped (and the send in progress cut off, if it is that one's). No
        renewal for a whole lease (the store is away, or slow) loses them all: another daemon may take
        them over from then on, so this one must not send them; they are taken over once the store is
        back, this daemon's own next pass included."""
        while claims.held:
            await asyncio.sleep(max(0.0, min(self.lease / 3, claims.valid_until - time.monotonic())))
            remaining = claims.valid_until - time.monotonic()
            if remaining <= 0:
                self._lose(claims, set(claims.held), "not renewed within the lease")
                return
            ids = sorted(claims.held)
            started = time.monotonic()
            try:
                async with asyncio.timeout(remaining):
                    kept = await self.rt.db.write(functools.partial(self._extend, ids=ids), watched=False)
            except Exception as exc:  # try again while the lease lasts
                log.warning(
                    "outbox leases not renewed",
                    extra={"channel": self.channel, "ids": ids, "error": type(exc).__name__},
                )
                continue
            claims.valid_until = started + self.lease
            lost = (set(ids) - kept) & claims.held  # one settled meanwhile is not lost
            if lost:
                self._lose(claims, lost, "taken over by another daemon, or its lease ran out")

    def _lose(self, claims: _Claims, ids: set[int], why: str) -> None:
        """Drop claims this worker no longer holds, and cut off the send (or recover hook) in progress if
        it is one of them: the message's new holder settles it, asking the channel's recover hook
        whether the PMS got it."""
        claims.held.difference_update(ids)
        attempt, cut = claims.attempt, None
        if attempt is not None and attempt.item_id in ids and not attempt.task.done():
            attempt.lost = True
            attempt.task.cancel()
            cut = attempt.item_id
        log.warning(
            "outbox claims lost",
            extra={"channel": self.channel, "ids": sorted(ids), "reason": why, "cut_off": cut},
        )

    async def _confirm(self, claims: _Claims, item: OutboxItem) -> bool:
        """Whether this worker still holds its claim on `item`, checked and extended in the store right
        before the send (only a live claim of its own counts). The transaction just before a send (the
        claim, or the previous message's settling) checks the next message on the way, so that a
        batch of small messages costs no extra round trip each."""
        if item.id not in claims.held:
            return False  # lost while earlier messages were sent (logged then)
        if claims.checked == item.id:
            claims.checked = None
            return True
        kept = await self.rt.db.write(lambda session: self._extend(session, [item.id]), watched=False)
        if not kept:
            self._lose(claims, {item.id}, "lost before its send")
        return bool(kept)

    async def _leased(self, claims: _Claims, item: OutboxItem, work: Awaitable[T]) -> T:
        """Await `work` (a send, or a recover hook) on `item` under its claim, which the keeper renews
        however long the PMS takes. When the keeper finds the claim lost meanwhile, `work` is cancelled
        as a stop cancels it (the VDDS push leaves a started import program running) and ClaimLost is
        raised: this worker must not settle the message, nor go on sending it."""
        task = asyncio.ensure_future(work)
        claims.attempt = attempt = _Attempt(item.id, task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if attempt.lost and (current is None or not current.cancelling()):
                raise ClaimLost(f"outbox message {item.id}") from None
            raise  # the daemon stops: _holding hands the claims back
        finally:
            claims.attempt = None

    async def _release(self, claims: _Claims) -> None:
        """End the claims still held now (the messages stay "sending": whoever takes them over asks the
        channel's recover hook whether the PMS has them). Best effort: a claim not released runs out."""
        ids = sorted(claims.held)

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
        claims.held.difference_update(ids)

    async def _finish(
        self, claims: _Claims, item: OutboxItem, *, delivered: bool, error: str = "", final: bool = False
    ) -> None:
        """Settle a message this worker holds and, in the same transaction, check and extend the claim on
        the next one it holds (sent right after: `_confirm`). One another daemon took over meanwhile
        (this one stalled past its lease) is left to that daemon: it asks the PMS's side whether the
        push arrived."""
        claims.held.discard(item.id)  # first: a renewal meanwhile must not count it lost
        upcoming = min((other for other in claims.held if other > item.id), default=None)

        def settle(session: Session) -> bool:
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

        def work(session: Session) -> tuple[bool, bool]:
            settled = settle(session)
            return settled, upcoming is not None and bool(self._extend(session, [upcoming]))

        settled, checked = await self.rt.db.write(work, watched=False)
        if upcoming is not None:
            if checked:
                claims.checked = upcoming
            elif upcoming in claims.held:
                self._lose(claims, {upcoming}, "lost before its send")
        if not settled:
            log.warning(
                "outbox message was taken over by another daemon",
                extra={"channel": self.channel, "id": item.id},
            )
