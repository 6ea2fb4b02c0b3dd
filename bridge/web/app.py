"""Builds the aiohttp applications of the daemon from a Runtime."""

from __future__ import annotations

from aiohttp import web

from bridge.runtime import Runtime
from bridge.web import api, dicom_import, events_stream, health, launch, openapi
from bridge.web.keys import MAX_BODY, RUNTIME
from bridge.web.middleware import make_bearer_auth, make_request_context


def build_api_app(rt: Runtime) -> web.Application:
    """The API listener: REST API, launches, events, health, metrics, OpenAPI document."""
    max_body = rt.settings.api.max_body_mb * 1024 * 1024
    app = web.Application(
        middlewares=[make_request_context("api", rt.metrics), make_bearer_auth(rt.settings.api.token)],
        client_max_size=max_body,
    )
    app[RUNTIME] = rt
    app[MAX_BODY] = max_body
    for module in (api, health, events_stream, launch, openapi, dicom_import):
        app.add_routes(module.routes)
    events_stream.setup(app)
    return app
