"""Typed keys for state hung on the aiohttp applications."""

from __future__ import annotations

import ssl

from aiohttp import web

from bridge.runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)
MAX_BODY = web.AppKey("max_body", int)
# An extra listener's own TLS context (None: plain HTTP); without it a listener uses the [api] one.
LISTENER_TLS: web.AppKey[ssl.SSLContext | None] = web.AppKey("listener_tls")
