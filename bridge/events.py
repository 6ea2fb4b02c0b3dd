"""The in-process event bus: what the PMS opened, asked to acquire or view, and which images arrived.

Events are notifications (as in pynetdicom's split): the request that caused one has already been
answered or will be answered regardless, so a failing subscriber is logged and never breaks the protocol.
Subscribers are viewers following the PMS (the SSE stream), push channels and metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bridge.store.types import utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """Base of all events; `name` is the SSE event name and the metrics label."""

    name: ClassVar[str] = "event"
    origin_protocol: str = ""
    workstation: str = ""
    at: str = field(default_factory=lambda: utcnow().isoformat())

    def to_json(self) -> dict[str, Any]:
        return {"event": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class PatientOpened(Event):
    """A PMS opened (or created) a patient; a viewer should show it where `open_in` says."""

    name: ClassVar[str] = "patient-opened"
    patient_id: int = 0
    pms_system: str = ""
    pms_id: str = ""
    open_in: str = "home"
    single_patient: bool = False
    viewer_url: str = ""


@dataclass(frozen=True)
class AcquisitionRequested(Event):
    """A PMS asked to start an acquisition for a patient (OPP ACQUIRE, VDDS stage 5 when enabled)."""

    name: ClassVar[str] = "acquisition-requested"
    patient_id: int = 0
    pms_system: str = ""
    pms_id: str = ""
    viewer_url: str = ""


@dataclass(frozen=True)
class ImageViewRequested(Event):
    """A PMS asked to show one image (VDDS MMOVIEW); `open_as` is preview or clinic."""

    name: ClassVar[str] = "image-view-requested"
    image_id: int = 0
    patient_id: int = 0
    open_as: str = "preview"
    viewer_url: str = ""


@dataclass(frozen=True)
class ImagesAdded(Event):
    """New images were stored for a patient (upload, import, acquisition)."""

    name: ClassVar[str] = "images-added"
    patient_id: int = 0
    image_ids: tuple[int, ...] = ()
    # The outbox channels the same transaction queued pushes for, so that only their workers wake (a
    # worker's look at the outbox is a write transaction); None: not known (images another process
    # stored), every push worker looks. Internal: not part of the event's JSON.
    push_channels: frozenset[str] | None = None

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        del data["push_channels"]
        return data

    def may_concern(self, channel: str) -> bool:
        """Whether a push worker of `channel` may find new messages because of these images."""
        return self.push_channels is None or channel in self.push_channels


Handler = Callable[[Event], Awaitable[None] | None]


class EventBus:
    """Publish events to handlers and to per-client queues (SSE); never blocks the publisher."""

    QUEUE_SIZE = 100

    def __init__(self) -> None:
        self._handlers: list[Handler] = []
        self._queues: set[asyncio.Queue[Event]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = itertools.count(1)
        self.published: dict[str, int] = {}

    def subscribe(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def open_stream(self) -> asyncio.Queue[Event]:
        """A queue that receives every event from now on, until `close_stream`."""
        queue: asyncio.Queue[Event] = asyncio.Queue(self.QUEUE_SIZE)
        self._queues.add(queue)
        return queue

    def close_stream(self, queue: asyncio.Queue[Event]) -> None:
        self._queues.discard(queue)

    def publish(self, event: Event) -> None:
        """Deliver `event`; a slow stream loses its oldest event rather than stalling the publisher."""
        self.published[event.name] = self.published.get(event.name, 0) + 1
        log.info("event", extra={"event": event.name, "seq": next(self._seq)})
        for queue in list(self._queues):
            if queue.full():
                queue.get_nowait()
                log.warning("event stream too slow; dropped its oldest event")
            queue.put_nowait(event)
        for handler in self._handlers:
            try:
                result = handler(event)
            except Exception:
                log.exception("event handler failed", extra={"event": event.name})
                continue
            if result is not None:
                task = asyncio.ensure_future(self._guard(result, event.name))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _guard(awaitable: Awaitable[None], name: str) -> None:
        try:
            await awaitable
        except Exception:
            log.exception("event handler failed", extra={"event": name})

    async def drain(self) -> None:
        """Wait for handler tasks still running (on shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
