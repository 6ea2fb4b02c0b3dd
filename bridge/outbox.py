"""Delivering outbox messages (pushes of new images to PMSs) once, across restarts, with backoff.

The service writes a message in the same transaction as the images it announces. A worker per channel
claims due messages (state "sending", attempts + 1), calls the channel's sender and marks the message
done, or schedules a retry with exponential backoff. A message found in "sending" at start-up was cut
off by a crash: the channel's `recover` hook decides whether the PMS already has it (then it is done,
not sent twice) or it is sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from bridge.delivery import Undeliverable, failure_text
from bridge.handlers.vdds_push import push_channels
from bridge.store import queries as q
from bridge.store.models import OutboxMessage
from bridge.store.types import utcnow
from bridge.thumbfolders import folder_targets

if TYPE_CHECKING:
    from bridge.config import Settings
    from bridge.runtime import Runtime

log = logging.getLogger(__name__)

BACKOFF_SECONDS = (2.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)


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

    async def recover(self) -> None:
        """Settle messages a crash left in "sending": done if the PMS has them, else due again."""

        def interrupted(session: Session) -> list[OutboxItem]:
            return [_item(m) for m in session.scalars(q.outbox_in_state(self.channel, "sending"))]

        for item in await self.rt.db.read(interrupted):
            delivered = self.recover_hook is not None and await self.recover_hook(self.rt, item)
            await self._finish(item, delivered=delivered, error="interrupted by a restart")
            log.info(
                "outbox recovered", extra={"channel": self.channel, "id": item.id, "delivered": delivered}
            )

    async def run(self) -> None:
        await self.recover()
        while True:
            try:
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
            for msg in session.scalars(q.due_outbox(self.channel, utcnow())):
                msg.state = "sending"
                msg.attempts += 1
                claimed.append(_item(msg))
            return claimed

        items = await self.rt.db.write(claim, watched=False)
        for item in items:
            try:
                await self.sender(self.rt, item)
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

    async def _finish(
        self, item: OutboxItem, *, delivered: bool, error: str = "", final: bool = False
    ) -> None:
        def work(session: Session) -> None:
            msg = session.get(OutboxMessage, item.id)
            if msg is None:
                return
            now = utcnow()
            if delivered:
                msg.state, msg.done_at, msg.last_error = "done", now, ""
                return
            msg.last_error = error[:1000]
            if final or msg.attempts >= self.max_attempts:
                msg.state = "failed"
                return
            delay = self.backoff[min(max(msg.attempts - 1, 0), len(self.backoff) - 1)]
            msg.state, msg.next_attempt_at = "pending", now + timedelta(seconds=delay)

        await self.rt.db.write(work, watched=False)
