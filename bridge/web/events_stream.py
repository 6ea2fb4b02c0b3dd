"""GET /api/v1/events: the event bus as Server-Sent Events, so a viewer follows what the PMS opens."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from bridge.web.keys import RUNTIME

routes = web.RouteTableDef()
KEEPALIVE_SECONDS = 15.0


@routes.get("/api/v1/events")
async def events(request: web.Request) -> web.StreamResponse:
    """Stream events as `event: <name>` / `data: <json>`; a comment line every 15 s keeps proxies open."""
    rt = request.app[RUNTIME]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    await response.write(b": connected\n\n")
    queue = rt.bus.open_stream()
    try:
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            data = json.dumps(event.to_json(), ensure_ascii=False)
            await response.write(f"event: {event.name}\ndata: {data}\n\n".encode())
    except ConnectionResetError:
        pass  # the viewer went away
    finally:
        rt.bus.close_stream(queue)
    return response
