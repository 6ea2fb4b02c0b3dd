"""GET /api/v1/events: the event bus as Server-Sent Events, so a viewer follows what the PMS opens.

The stream carries patient data (store and PMS ids of the patient a PMS opened, its images), so reading
it is audited like any REST read: opening the stream is an `events.read` entry with the reader's origin,
and every event delivered that names a patient is an `event.read` entry for that patient (and image),
queued on the same batched read path as the REST reads (`AuditLog.read`).

A stream ends when the daemon stops (`setup` registers that on the application): an open viewer must not
hold the shutdown for `shutdown_timeout` and more, or a service wrapper kills the daemon before its audit
log is flushed.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from bridge.audit import AuditLog
from bridge.events import Event
from bridge.model import Origin
from bridge.web.api import origin_of
from bridge.web.fields import query_text
from bridge.web.keys import RUNTIME

routes = web.RouteTableDef()
KEEPALIVE_SECONDS = 15.0
STOPPING = web.AppKey("events-stopping", asyncio.Event)


def setup(app: web.Application) -> None:
    """Make the application's event streams end when it shuts down."""
    app[STOPPING] = asyncio.Event()

    async def stop_streams(app: web.Application) -> None:
        app[STOPPING].set()

    app.on_shutdown.append(stop_streams)


async def _next_event(queue: asyncio.Queue[Event], stopping: asyncio.Event) -> Event | None:
    """The next event; None after KEEPALIVE_SECONDS without one or once `stopping` is set."""
    getter = asyncio.ensure_future(queue.get())
    stopper = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({getter, stopper}, timeout=KEEPALIVE_SECONDS, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not getter.done():
            getter.cancel()
    return getter.result() if getter.done() and not getter.cancelled() else None


def audit_delivery(audit: AuditLog, origin: Origin, event: Event) -> None:
    """Queue the read of a delivered event that names a patient (every event kind but the base has a
    `patient_id`; 0 means none), with its image when it names one."""
    patient_id = getattr(event, "patient_id", 0)
    if not patient_id:
        return
    image_id = getattr(event, "image_id", 0) or None
    audit.read(origin, "event.read", patient_id=patient_id, image_id=image_id, detail=event.name)


@routes.get("/api/v1/events")
async def events(request: web.Request) -> web.StreamResponse:
    """Stream events as `event: <name>` / `data: <json>`; a comment line every 15 s keeps proxies open.

    `?workstation=NAME` keeps only the events of requests from that workstation (Windows names are
    case-insensitive): the viewer on a PMS workstation shows what that PMS opened, not every desk's.
    """
    rt = request.app[RUNTIME]
    stopping = request.app[STOPPING]
    workstation = (query_text(request, "workstation") or "").strip().casefold()
    origin = origin_of(request)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    await response.write(b": connected\n\n")
    queue = rt.bus.open_stream()
    rt.audit.read(origin, "events.read")
    try:
        while not stopping.is_set():
            event = await _next_event(queue, stopping)
            if event is None:
                if not stopping.is_set():
                    await response.write(b": keep-alive\n\n")
                continue
            if workstation and event.workstation.strip().casefold() != workstation:
                continue
            data = json.dumps(event.to_json(), ensure_ascii=False)
            await response.write(f"event: {event.name}\ndata: {data}\n\n".encode())
            audit_delivery(rt.audit, origin, event)
    except ConnectionResetError:
        pass  # the viewer went away
    finally:
        rt.bus.close_stream(queue)
    return response
