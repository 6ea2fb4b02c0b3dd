"""OPP web: the HTTP flavour of OPP on its own listener (`[opp_web]`, port 4435 as in DTX Studio Clinic).

`POST /opp` takes the OPP XML document as its body, or form fields; `GET|POST /opp?command=&reference=...`
takes the same fields as parameters (protocols.opp.FIELDS). The answer is XML or JSON by the Accept
header (XML when the client accepts both equally: it is an XML protocol), with a status, the store's
patient id and, for VIEW_DATA, the images with watermarked thumbnail URLs. Errors are RFC 9457 problem
bodies; nothing is changed by a refused request.

Callers are browser-based PMSs on the same workstation, which is why the guards look as they do:

* CORS: only origins listed in `cors_origins` may read answers (none by default).
* A browser sends a cross-site form POST, or follows a link, without asking CORS first. So a browser call
  whose origin (Origin header, or the Referer's origin when Sec-Fetch-Site says cross-site) is not listed
  is refused *before* anything runs: another web page cannot create patients through the receptionist's
  browser.
* The Host header must name loopback, the listen address or `allowed_hosts` (DNS-rebinding guard).
* A bearer token is optional (`token`): a page's JavaScript cannot keep a secret, so it is there for
  non-browser callers and sites that want one, not as the browser protection.
* Thumbnail URLs are signed and expire (`thumbnail_url_seconds`), because an <img> tag cannot send a
  token; the signature is the capability.

Answers to repeated identical requests are given again from memory while the store is unchanged
(bridge.web.answers); the guards above run for every request all the same.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import date
from urllib.parse import urlsplit

from aiohttp import StreamReader, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.hdrs import CONTENT_TYPE
from aiohttp.helpers import parse_mimetype

from bridge.config import ConfigError, Settings
from bridge.handlers.opp import PROTOCOL, WEB_ANSWERS, execute, options
from bridge.model import Outcome, PatientRequest, Status
from bridge.runtime import Runtime
from bridge.tls import server_context
from bridge.web.answers import Kept, RepeatedAnswers
from bridge.web.api import RENDER_VIEW_MAX_AGE, origin_of, rendered_image
from bridge.web.fields import path_id
from bridge.web.keys import LISTENER_TLS, MAX_BODY, RUNTIME
from bridge.web.middleware import ACTOR_KEY, make_request_context, token_matches
from bridge.web.multipart import FormReader, MultipartError, boundary_of
from bridge.web.problems import ProblemError
from protocols.opp import (
    Command,
    OppError,
    OppMessage,
    OppOptions,
    decode_param,
    form_params,
    parse_params,
    parse_xml,
    render_json,
    render_xml,
    text_codec,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPP_PATH = "/opp"
THUMBNAIL_PATH = "/opp/thumbnails/{id:[0-9]{1,19}}.jpg"
FORM_TYPE = "application/x-www-form-urlencoded"
MULTIPART_TYPE = "multipart/form-data"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
XML_TYPE = "application/xml"
JSON_TYPE = "application/json"
PREFLIGHT_MAX_AGE = "600"
ALLOWED_HEADERS = "Content-Type, Accept, Authorization, X-Request-ID, X-PMS-Workstation"


class UrlSigner:
    """Signs thumbnail URLs: HMAC-SHA256 over (image id, expiry), so an <img> needs no token."""

    def __init__(self, key: bytes, ttl_seconds: int) -> None:
        self._key = key
        self.ttl = ttl_seconds

    def _sig(self, image_id: int, expires: int) -> str:
        digest = hmac.new(self._key, f"{image_id}.{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:18]).decode()

    def url(self, base: str, image_id: int, now: float) -> str:
        expires = int(now) + self.ttl
        return f"{base}/opp/thumbnails/{image_id}.jpg?exp={expires}&sig={self._sig(image_id, expires)}"

    def valid(self, image_id: int, expires: str, sig: str, now: float) -> bool:
        if not expires.isdigit() or len(expires) > 12 or int(expires) < now:
            return False
        return hmac.compare_digest(sig.encode(), self._sig(image_id, int(expires)).encode())


@dataclass(frozen=True)
class OppWebState:
    """What the OPP web handlers share: parser options, signer, the guards' lists."""

    options: OppOptions
    signer: UrlSigner
    origins: frozenset[str]
    hosts: frozenset[str]
    any_host: bool
    token: bytes
    answers: RepeatedAnswers[OppMessage]


OPP_WEB = web.AppKey("opp_web", OppWebState)


def signing_key(settings: Settings) -> bytes:
    """Derived from the API token, so daemons sharing a config accept each other's thumbnail URLs; a
    random key when there is no token (URLs then end with the daemon, which only shortens their life)."""
    if settings.api.token:
        return hmac.new(settings.api.token.encode(), b"pms-bridge opp-web thumbnail urls", "sha256").digest()
    return secrets.token_bytes(32)


# --------------------------------------------------------------------------------------------------
# Content negotiation


def negotiate(accept: str) -> str | None:
    """XML_TYPE or JSON_TYPE for an Accept header (q-values and wildcards honoured; a tie or no header
    means XML); None when the client accepts neither."""
    if not accept.strip():
        return XML_TYPE
    best: dict[str, tuple[int, float]] = {}  # our type -> (specificity, q) of the most specific range
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        media = media.lower()
        for ours, matches in (
            (XML_TYPE, {XML_TYPE: 2, "text/xml": 2, "application/*": 1, "text/*": 1, "*/*": 0}),
            (JSON_TYPE, {JSON_TYPE: 2, "application/*": 1, "*/*": 0}),
        ):
            specificity = matches.get(media)
            if specificity is not None and specificity >= best.get(ours, (-1, 0.0))[0]:
                best[ours] = (specificity, q)
    xml_q, json_q = best.get(XML_TYPE, (0, 0.0))[1], best.get(JSON_TYPE, (0, 0.0))[1]
    if max(xml_q, json_q) <= 0:
        return None
    return JSON_TYPE if json_q > xml_q else XML_TYPE


# --------------------------------------------------------------------------------------------------
# Guards


def _host_name(host: str) -> str:
    """The name in a Host header, without port or IPv6 brackets, lower-cased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _origin_of_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return "null"
    return f"{parts.scheme}://{parts.netloc}".lower()


def caller_origin(request: web.Request) -> str | None:
    """The web origin a browser call comes from: its Origin header or, for cross-site navigations and
    no-cors requests (which carry none), the Referer's origin ("null" when there is no Referer either).
    None: not a cross-origin browser call (a PMS program, curl, a typed URL)."""
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin.strip().lower()
    if request.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site"):
        return _origin_of_url(request.headers.get("Referer", ""))
    return None


def make_cors_headers(origins: frozenset[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Outermost: lets listed origins read every answer, problem bodies included."""

    @web.middleware
    async def cors_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        origin = request.headers.get("Origin", "").strip().lower()
        response.headers.add("Vary", "Origin")
        if origin in origins:
            response.headers["Access-Control-Allow-Origin"] = request.headers["Origin"].strip()
            response.headers["Access-Control-Expose-Headers"] = "X-Request-ID"
        return response

    return cors_headers


def make_guard(state: OppWebState) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Host check, origin check (before anything runs), CORS preflight, optional token."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        # No Host header: an HTTP/1.0 program, never a browser (a rebinding page always sends its host).
        host_header = request.headers.get("Host")
        host = _host_name(host_header) if host_header is not None else ""
        if host_header is not None and not state.any_host and host not in state.hosts:
            raise ProblemError(
                403,
                f"requests addressed to host {host!r} are not accepted ([opp_web] allowed_hosts)",
                kind="host-not-allowed",
            )
        is_thumbnail = request.path.startswith("/opp/thumbnails/")
        origin = caller_origin(request)
        listed = origin in state.origins
        own = f"{request.scheme}://{host_header}".lower() if host_header is not None else None
        if request.method == "OPTIONS":
            if not listed:
                raise _origin_refused(origin)
            return _preflight(request)
        if origin is not None and origin != own and not listed and not is_thumbnail:
            raise _origin_refused(origin)
        if state.token and not is_thumbnail:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token_matches(given, state.token):
                raise ProblemError(
                    401, "missing or wrong bearer token ([opp_web] token)", kind="unauthorized"
                )
            request[ACTOR_KEY] = "opp-token:" + hmac.new(state.token, b"actor", "sha256").hexdigest()[:8]
        return await handler(request)

    return guard


def _origin_refused(origin: str | None) -> ProblemError:
    return ProblemError(
        403,
        f"web origin {origin!r} may not call OPP web; add it to [opp_web] cors_origins",
        kind="origin-not-allowed",
    )


def _preflight(request: web.Request) -> web.Response:
    headers = {
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": ALLOWED_HEADERS,
        "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
    }
    if request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
        headers["Access-Control-Allow-Private-Network"] = "true"  # public PMS page -> loopback (Chrome)
    return web.Response(status=204, headers=headers)


# --------------------------------------------------------------------------------------------------
# Handlers

routes = web.RouteTableDef()


def _looks_like_xml(body: bytes) -> bool:
    """An XML document (UTF-8 with or without BOM, or UTF-16 with or without BOM), not form fields (names
    cannot hold '<')."""
    head = body[:64].lstrip(b" \t\r\n\xef\xbb\xbf")
    return head.startswith((b"<", b"\x00<")) or head[:2] in (b"\xff\xfe", b"\xfe\xff")


async def read_message(request: web.Request, body: bytes, opts: OppOptions) -> OppMessage:
    """The OPP message of a request with this `body` (already read): XML body, form fields, or query
    parameters. A POST without a body takes the query, as a GET does (jQuery's `$.post(url)` sends a
    form Content-Type and nothing else)."""
    today = date.today()  # a birth date may not be after it (the parser is free of the clock)
    try:
        if request.method == "POST":
            if _looks_like_xml(body):  # whatever the Content-Type says (curl -d sends XML as a "form")
                return parse_xml(body, opts, today=today)
            if request.content_type == JSON_TYPE:
                raise ProblemError(
                    415, "send the OPP XML document, form fields or query parameters, not JSON"
                )
            if body.strip():
                if request.content_type == FORM_TYPE:
                    pairs = form_params(body, request.charset, opts.encoding)
                    return parse_params(pairs, opts, today=today)
                if request.content_type == MULTIPART_TYPE:
                    return parse_params(await _multipart_params(request, body, opts), opts, today=today)
                return parse_xml(body, opts, today=today)
        query = request.raw_path.partition("?")[2].encode("utf-8", "surrogateescape")
        return parse_params(form_params(query, None, opts.encoding), opts, today=today)
    except OppError as exc:
        raise ProblemError(413 if exc.kind == "too-large" else 400, str(exc), kind=exc.kind) from None


async def _multipart_params(request: web.Request, body: bytes, opts: OppOptions) -> list[tuple[str, str]]:
    """The text fields of a multipart/form-data `body`, each decoded by its part's charset (else the
    request's, else UTF-8) and then `[opp] encoding`. The body was read already (the repeated-answer key
    needs it), so the shared multipart reader is given it from memory."""
    loop = asyncio.get_running_loop()
    stream = StreamReader(BaseProtocol(loop), limit=2**16, loop=loop)
    stream.feed_data(body)
    stream.feed_eof()
    pairs: list[tuple[str, str]] = []
    try:
        reader = FormReader(stream, boundary_of(parse_mimetype(request.headers[CONTENT_TYPE]).parameters))
        while (head := await reader.next_part()) is not None:
            if head.filename is not None:
                raise ProblemError(415, "OPP web form fields are text; file parts are not accepted")
            name = head.name or ""
            charset = parse_mimetype(head.content_type).parameters.get("charset") or request.charset
            codec = text_codec(charset) if charset else "utf-8"
            pairs.append((name, decode_param(name, await reader.read_all(), codec, opts.encoding)))
    except MultipartError as exc:
        raise ProblemError(400, f"the body is not well-formed multipart/form-data: {exc}") from None
    return pairs


@dataclass(frozen=True)
class _Answer:
    """An OPP web answer, with what record mode needs to pseudonymise it (when parsing got that far)."""

    response: web.Response
    request: PatientRequest | None = None
    outcome: Outcome | None = None


@routes.get(OPP_PATH, allow_head=False)  # a HEAD would run the command: 405, as PUT and DELETE
@routes.post(OPP_PATH)
async def opp_request(request: web.Request) -> web.Response:
    """One OPP command; the answer in XML or JSON. Record mode keeps the exchange as a replayable step."""
    rt = request.app[RUNTIME]
    answer = await _answer(request)
    if rt.recorder is not None:
        response = answer.response
        await rt.recorder.http(
            "opp_web",
            await recorded_request(request),
            response.status,
            bytes(response.body) if isinstance(response.body, bytes | bytearray) else b"",
            request=answer.request,
            outcome=answer.outcome,
            suffix=".json" if "json" in response.content_type else ".xml",
        )
    return answer.response


async def _answer(request: web.Request) -> _Answer:
    rt = request.app[RUNTIME]
    state = request.app[OPP_WEB]
    try:
        media = negotiate(request.headers.get("Accept", ""))
        if media is None:
            raise ProblemError(406, f"OPP web answers in {XML_TYPE} or {JSON_TYPE}", kind="not-acceptable")
        body = await request.read()
        # Everything the answer depends on (the settings aside): how the message came, and where to. The
        # query as sent (yarl's query_string is partly decoded: %2526 and %26 would meet) and the whole
        # Content-Type (its charset decides what a form body's bytes mean).
        key = (
            request.method,
            request.headers.get(CONTENT_TYPE, ""),
            request.raw_path,
            body,
            media,
            base_url(request),
        )
        kept, generation = state.answers.get(key)
        if kept is not None:
            patient_request = kept.message.request(origin_of(request, PROTOCOL))
            rt.service.repeat(patient_request, kept.outcome)
            response = web.Response(body=kept.body, content_type=kept.content_type, charset="utf-8")
            return _Answer(response, patient_request, kept.outcome)
        message = await read_message(request, body, state.options)
    except ProblemError as exc:
        return _Answer(exc.response(request.path))
    patient_request = message.request(origin_of(request, PROTOCOL))
    outcome = await execute(rt, message, patient_request)
    if not outcome.status.ok and outcome.status is not Status.PARTIAL:
        extra = {"conflict_id": outcome.conflict_id} if outcome.conflict_id is not None else {}
        status, kind = WEB_ANSWERS[outcome.status]
        refused = ProblemError(status, outcome.message, kind=kind, command=message.command.value, **extra)
        return _Answer(refused.response(request.path), patient_request, outcome)
    urls: dict[int, str] = {}
    if message.command is Command.VIEW_DATA:
        base, now = base_url(request), time.time()
        urls = {image.id: state.signer.url(base, image.id, now) for image in outcome.images}
    render = render_json if media == JSON_TYPE else render_xml
    answer = render(outcome, message, urls)
    state.answers.keep(key, len(body), generation, Kept(message, outcome, answer, media))
    return _Answer(web.Response(body=answer, content_type=media, charset="utf-8"), patient_request, outcome)


def base_url(request: web.Request) -> str:
    """scheme://host[:port] as the client addressed this listener (the host guard checked the name)."""
    host = request.headers.get("Host")
    if host is None:  # HTTP/1.0 without Host: the address the client connected to
        address = request.transport.get_extra_info("sockname") if request.transport else None
        host = f"{address[0]}:{address[1]}" if address else "127.0.0.1"
    return f"{request.scheme}://{host}"


# Headers a recorded request leaves out: secrets, and what the replay sets itself.
UNRECORDED_HEADERS = frozenset({b"authorization", b"cookie", b"host", b"content-length"})


async def recorded_request(request: web.Request) -> bytes:
    """The request as raw HTTP (request line, headers, blank line, body), as samples keep requests."""
    lines = [f"{request.method} {request.raw_path} HTTP/1.1".encode()]
    lines += [
        name + b": " + value for name, value in request.raw_headers if name.lower() not in UNRECORDED_HEADERS
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + await request.read()


@routes.get(THUMBNAIL_PATH)
async def opp_thumbnail(request: web.Request) -> web.StreamResponse:
    """The watermarked thumbnail a VIEW_DATA answer links to (signed URL, no token)."""
    rt = request.app[RUNTIME]
    state = request.app[OPP_WEB]
    image_id = path_id(request)
    if not state.signer.valid(
        image_id, request.query.get("exp", ""), request.query.get("sig", ""), time.time()
    ):
        raise ProblemError(
            403, "the thumbnail link is invalid or has expired; ask VIEW_DATA again", kind="invalid-link"
        )
    image = await rt.service.get_image(
        origin_of(request, "opp"), image_id, action="image.thumbnail", max_age=RENDER_VIEW_MAX_AGE
    )
    if image is None:
        raise ProblemError(404, f"no image with id {image_id}")
    return await rendered_image(request, rt, image, rt.settings.thumbnails.size)


# --------------------------------------------------------------------------------------------------
# The listener


def server_tls(settings: Settings) -> ssl.SSLContext | None:
    """The OPP web TLS context (`[opp_web] tls`), with the [api] certificate unless it names its own."""
    opp_web = settings.opp_web
    if not opp_web.tls:
        return None
    cert_in, cert = ("opp_web", opp_web.tls_cert) if opp_web.tls_cert else ("api", settings.api.tls_cert)
    key_in, key = ("opp_web", opp_web.tls_key) if opp_web.tls_key else ("api", settings.api.tls_key)
    if cert is None or key is None:
        raise ConfigError("[opp_web] tls = yes needs tls_cert and tls_key (here or in [api])")
    return server_context((f"[{cert_in}] tls_cert", cert), (f"[{key_in}] tls_key", key))


def build_oppweb_app(rt: Runtime) -> web.Application:
    """The OPP web application: guards, the /opp endpoint, signed thumbnails."""
    settings = rt.settings
    opp_web = settings.opp_web
    max_body = opp_web.max_body_kb * 1024
    hosts = {h.strip().lower() for h in opp_web.allowed_hosts}
    state = OppWebState(
        options=replace(options(settings), max_bytes=max_body),
        signer=UrlSigner(signing_key(settings), opp_web.thumbnail_url_seconds),
        origins=frozenset(opp_web.cors_origins),
        hosts=frozenset(LOOPBACK_HOSTS | {_host_name(opp_web.host)} | hosts),
        any_host="*" in hosts,
        token=opp_web.token.encode(),
        # Kept answers carry signed thumbnail URLs: give them again only while most of their life is left.
        answers=RepeatedAnswers(rt.db.generation, max_age=min(60.0, opp_web.thumbnail_url_seconds / 10)),
    )
    app = web.Application(
        middlewares=[
            make_cors_headers(state.origins),
            make_request_context("opp_web", rt.metrics),
            make_guard(state),
        ],
        client_max_size=max_body,
    )
    app[RUNTIME] = rt
    app[MAX_BODY] = max_body
    app[OPP_WEB] = state
    app[LISTENER_TLS] = server_tls(settings)
    app.add_routes(routes)
    return app


def opp_web_listener(rt: Runtime) -> tuple[str, web.Application, str, int] | None:
    """The daemon's OPP web listener, or None when `[opp_web] enabled = no`."""
    opp_web = rt.settings.opp_web
    if not opp_web.enabled:
        return None
    return ("opp_web", build_oppweb_app(rt), opp_web.host, opp_web.port)
