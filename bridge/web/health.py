"""Liveness, readiness and metrics: what a service monitor or `pms-bridge doctor` asks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.outbox_admin import OutboxCount, outbox_counts, worker_channels
from bridge.store.types import utcnow
from bridge.web.api import json_response
from bridge.web.keys import RUNTIME

routes = web.RouteTableDef()

# How long one readiness check (or the metrics' outbox count) may take: a store server or a share that
# stopped answering makes /readyz say so, instead of holding the monitor's request.
CHECK_SECONDS = 5.0


def _reason(exc: Exception) -> str:
    """The first line of what went wrong; a check that did not answer says so (TimeoutError has no text)."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {CHECK_SECONDS:g} s"
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers. Says nothing about the store (that is /readyz)."""
    rt = request.app[RUNTIME]
    return json_response(
        {
            "status": "ok",
            "instance": rt.instance_id,
            "uptime_s": round(time.time() - rt.readiness.started_at, 1),
        }
    )


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready: store reachable, image folder writable, watched folders reachable and recently scanned."""
    rt = request.app[RUNTIME]
    checks: dict[str, Any] = {}
    ok = True
    try:
        async with asyncio.timeout(CHECK_SECONDS):
            await asyncio.to_thread(rt.db.ping)
        checks["store"] = {"ok": True, "dialect": rt.db.dialect}
    except Exception as exc:  # any failure means not ready; the reason is the payload
        ok = False
        checks["store"] = {"ok": False, "error": _reason(exc)[:500]}
    try:
        async with asyncio.timeout(CHECK_SECONDS):
            await asyncio.to_thread(rt.files.check_writable)
            free = await asyncio.to_thread(rt.files.free_bytes)
        checks["images"] = {
            "ok": True,  # reads go on while the disk fills; doctor and low_space warn the admin
            "path": str(rt.files.root),
            "free_bytes": free,
            "low_space": free < rt.settings.store.min_free_mb * 2**20,
        }
    except Exception as exc:
        ok = False
        checks["images"] = {"ok": False, "path": str(rt.files.root), "error": _reason(exc)[:300]}
    now = time.time()
    for watcher, folder in rt.readiness.watched.items():
        last = rt.readiness.last_scan.get(watcher)
        age = None if last is None else round(now - last, 3)
        limit = rt.readiness.max_scan_age.get(watcher, 60.0)
        error = rt.readiness.scan_errors.get(watcher)
        healthy = error is None and age is not None and age <= limit
        ok = ok and healthy
        checks[f"watch:{watcher}"] = {
            "ok": healthy,
            "path": str(folder),
            "last_successful_scan_age_s": age,
            **({"error": error} if error else {}),
        }
    return json_response({"status": "ready" if ok else "not-ready", "checks": checks}, 200 if ok else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text. The outbox gauges are counted now, from the store (one grouped query on the
    state index), so that every daemon shows the same, current figures."""
    rt = request.app[RUNTIME]
    counts: list[OutboxCount] | None
    try:
        async with asyncio.timeout(CHECK_SECONDS):
            counts = await rt.db.read(outbox_counts)
    except Exception:  # the store is away: /readyz says so; the other metrics are still worth serving
        counts = None
    rt.metrics.show_outbox(worker_channels(rt.settings), counts, utcnow())
    body = generate_latest(rt.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
