"""Typed keys for state hung on the aiohttp applications."""

from __future__ import annotations

from aiohttp import web

from bridge.runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)
MAX_BODY = web.AppKey("max_body", int)
