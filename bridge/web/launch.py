"""POST /api/v1/launch/{protocol}: where `pms-bridge <protocol> ...` hands a PMS message to the daemon.

The thin launch client sends the raw bytes of the file the PMS named as the body, the arguments as
repeated `arg` query parameters, and the file name and workstation in headers; the answer is the bytes to
write back into the file (when X-PMS-Write is 1), the exit code and one line of message. Percent-encoding
keeps non-ASCII names intact in headers.
"""

from __future__ import annotations

import logging
from urllib.parse import quote, unquote

from aiohttp import web

from bridge.exits import ExitCode
from bridge.handlers import UnknownProtocol, get_handler
from bridge.handlers.base import Launch, LaunchReply
from bridge.logs import request_id_var
from bridge.store.db import StoreFileLost
from bridge.web.fields import header_text, label_text, read_body
from bridge.web.keys import RUNTIME
from bridge.web.middleware import ACTOR_KEY
from bridge.web.problems import ProblemError

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

MAX_LAUNCH_BYTES = 4 * 1024 * 1024  # exchange files, XML and info files are a few KB
MAX_ARGS = 64


@routes.post("/api/v1/launch/{protocol}")
async def launch(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    protocol = request.match_info["protocol"]
    try:
        handler = get_handler(protocol)
    except UnknownProtocol as exc:
        raise ProblemError(404, str(exc), kind="unknown-protocol") from None
    too_large = f"a PMS message may be at most {MAX_LAUNCH_BYTES} bytes"
    content = await read_body(request, MAX_LAUNCH_BYTES, too_large)
    charset = _declared_charset(request, content)
    args = tuple(request.query.getall("arg", []))
    if len(args) > MAX_ARGS:
        raise ProblemError(400, f"at most {MAX_ARGS} arguments")
    item = Launch(
        protocol=protocol,
        args=args,
        filename=unquote(request.headers.get("X-PMS-Filename", "")),
        content=content,
        workstation=label_text(unquote(request.headers.get("X-PMS-Workstation", "")), "workstation"),
        transport=header_text(request, "X-PMS-Transport", "transport") or "cli",
        request_id=request_id_var.get(),
        charset=charset,
        actor=request.get(ACTOR_KEY, ""),
    )
    log.info("launch", extra={"protocol": protocol, "actor": item.actor, "bytes": len(content)})
    try:
        reply = await handler(rt, item)
    except StoreFileLost as exc:  # logged once where it was found (bridge.store.db); the line says what to do
        # An exit code, as every other refusal of the store: left to the middleware's 503, the launch
        # client would exit LAUNCH_REFUSED (4), which PMS vendors read as a wrong token. VDDS answers it
        # itself, in the exchange file's ERRORTEXT.
        reply = LaunchReply(ExitCode.ERROR, f"pms-bridge {protocol}: {exc}")
    rt.metrics.launches.labels(protocol, str(reply.exit_code)).inc()
    if rt.recorder is not None:
        await rt.recorder.launch(item, reply)
    headers = {
        "X-PMS-Exit": str(reply.exit_code),
        "X-PMS-Message": quote(reply.message.replace("\n", " ")[:1000]),
        "X-PMS-Write": "1" if reply.content is not None else "0",
    }
    return web.Response(body=reply.content or b"", headers=headers, content_type="application/octet-stream")


def _declared_charset(request: web.Request, content: bytes) -> str:
    """The charset parameter of the body's Content-Type ("" without one), checked against the body.

    A SET command posted as `text/plain; charset=utf-8` must be read as UTF-8, not in the profile's code
    page (which turned "Núñez" into "NÃºÃ±ez"). A charset Python does not know, one that is not a text
    encoding (`base64`) or one that cannot decode this body even with replacement characters (`idna`,
    `undefined`) is the client's error: 415, not a failure inside the handler.
    """
    charset = (request.charset or "").strip()
    if not charset:
        return ""
    try:
        content.decode(charset, errors="replace")
    except (LookupError, UnicodeError):
        raise ProblemError(
            415, f"cannot read the body in the declared charset {charset[:40]!r}", kind="unsupported-charset"
        ) from None
    return charset
