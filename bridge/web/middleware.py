"""Middlewares shared by the bridge's listeners: request id, problem bodies, bearer auth, metrics."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from bridge.logs import new_request_id, request_id_var
from bridge.runtime import Metrics
from bridge.store.db import StoreFileLost
from bridge.store.limits import TEXT_RULES
from bridge.web.keys import MAX_BODY
from bridge.web.problems import ProblemError, problem, storage_status

log = logging.getLogger(__name__)
access = logging.getLogger("pms_bridge.access")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Paths anyone on the listener may call: they carry no patient data.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/api/v1/openapi.json"})
ACTOR_KEY = web.RequestKey("actor", str)


def make_request_context(listener: str, metrics: Metrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Request id in and out (X-Request-ID), every error as a problem body, metrics per route."""
    latency = metrics.http_latency.labels(listener)
    counters: dict[tuple[str, int], Any] = {}  # (route, status) -> its counter (labels() is not free)

    @web.middleware
    async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = client_request_id(request) or new_request_id()
        token = request_id_var.set(rid)
        started = time.perf_counter()
        try:
            response = await _answer(request, handler, rid)
        finally:
            request_id_var.reset(token)
        response.headers["X-Request-ID"] = rid
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        elapsed = time.perf_counter() - started
        counter = counters.get((route, response.status))
        if counter is None:
            counter = metrics.http_requests.labels(listener, route, str(response.status))
            counters[(route, response.status)] = counter
        counter.inc()
        latency.observe(elapsed)
        if access.isEnabledFor(logging.INFO):
            # The path only: query strings can hold names (patient search), which stay out of logs.
            access.info(
                "request",
                extra={
                    "request_id": rid,
                    "listener": listener,
                    "method": request.method,
                    "path": request.path,
                    "status": response.status,
                    "ms": round(elapsed * 1000, 2),
                },
            )
        return response

    return request_context


def client_request_id(request: web.Request) -> str:
    """The client's X-Request-ID when it is printable ASCII (it is echoed in a response header and
    recorded), cut to the audit column; else "" and the daemon makes one."""
    given = request.headers.get("X-Request-ID", "")[: TEXT_RULES["request_id"].limit]
    return given if given.isascii() and given.isprintable() else ""


def token_matches(given: str, expected: bytes) -> bool:
    """Whether a bearer token as received is `expected`, in constant time.

    aiohttp keeps header bytes that are not UTF-8 as lone surrogates, which cannot be encoded: such a
    token is a wrong token (401), not an encoding error (500).
    """
    try:
        presented = given.strip().encode()
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(presented, expected)


def make_bearer_auth(token: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Everything but PUBLIC_PATHS needs `Authorization: Bearer <token>`; an empty token refuses all."""
    expected = token.encode()

    @web.middleware
    async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS or request.method == "OPTIONS":
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if not expected:
            raise ProblemError(
                401, "the API token is not configured ([api] token); all data requests are refused"
            )
        if scheme.lower() != "bearer" or not token_matches(given, expected):
            raise ProblemError(401, "missing or wrong bearer token", kind="unauthorized")
        request[ACTOR_KEY] = "token:" + hmac.new(expected, b"actor", "sha256").hexdigest()[:8]
        return await handler(request)

    return bearer_auth


async def _answer(request: web.Request, handler: Handler, rid: str) -> web.StreamResponse:
    """The handler's response, or a problem body for any error it raised."""
    try:
        return await handler(request)
    except ProblemError as exc:
        return exc.response(request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = exc.reason
        if exc.status == 413:
            detail = f"request body too large (limit {request.app[MAX_BODY]} bytes)"
        elif exc.text and not exc.text.startswith(f"{exc.status}:"):
            detail = exc.text
        return problem(exc.status, detail, instance=request.path)
    except StoreFileLost as exc:  # logged once where it was found (bridge.store.db); nothing was saved
        return problem(503, str(exc), kind="store-file-lost", instance=request.path)
    except ConnectionResetError:  # the client went away mid-body (an upload cut off): not our error
        log.warning("client closed the connection mid-request", extra={"path": request.path})
        return problem(400, "the connection was closed before the request was complete")
    except OSError as exc:  # a disk or share the request needs (the image store, a PMS folder): full, gone
        log.exception("storage error", extra={"path": request.path, "errno": exc.errno})
        return problem(
            storage_status(exc),
            f"storage the bridge needs (the image store or a PMS folder) cannot be written or read"
            f" ({exc.strerror or exc}); the daemon log names it under request id {rid}",
        )
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return problem(500, f"internal error; the daemon log has the details under request id {rid}")
