"""The REST API under /api/v1: patients, images, conflicts, audit. Thin: parse, call the service, answer.

Lists answer {"items": [...], "next": cursor-or-null} and take `limit` and `cursor`; cursors are opaque
(base64url JSON of the last row's sort key), so paging stays stable while rows are added.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

from aiohttp import web
from aiohttp.hdrs import CONTENT_TYPE
from aiohttp.helpers import parse_mimetype

from bridge.dicom.teeth import CODES as FDI_TEETH
from bridge.dicom.teeth import is_fdi
from bridge.imaging.analyze import ImagingError
from bridge.model import (
    Action,
    Category,
    Demographics,
    IdKind,
    ImageView,
    Origin,
    PatientRequest,
    Sex,
    Status,
)
from bridge.runtime import Runtime
from bridge.service import Refused
from bridge.store.limits import DEMOGRAPHIC_TEXTS
from bridge.web.fields import (
    body_birth_date,
    body_text,
    cursor_after_capture,
    cursor_after_id,
    encode_cursor,
    form_text,
    header_text,
    int_param,
    parse_id,
    parse_number,
    path_id,
    query_date,
    query_text,
    read_body,
)
from bridge.web.keys import MAX_BODY, RUNTIME
from bridge.web.middleware import ACTOR_KEY
from bridge.web.multipart import BodyTooLarge, FormReader, MultipartError, boundary_of, read_in_large_pieces
from bridge.web.problems import ProblemError, json_text

routes = web.RouteTableDef()

MAX_LIMIT = 500
STATUS_HTTP = {
    Status.OK: 200,
    Status.UPDATED: 200,
    Status.CREATED: 201,
    Status.PARTIAL: 200,
    Status.NOT_FOUND: 404,
    Status.CONFLICT: 409,
    Status.FORBIDDEN: 403,
    Status.INVALID: 422,
    Status.ERROR: 500,
}


def origin_of(request: web.Request, protocol: str = "rest") -> Origin:
    """Who is asking, for the audit log: the token's actor name, the client's address."""
    from bridge.logs import request_id_var

    return Origin(
        protocol=protocol,
        transport="http",
        workstation=header_text(request, "X-PMS-Workstation", "workstation") or (request.remote or ""),
        actor=request.get(ACTOR_KEY, ""),
        request_id=request_id_var.get(),
    )


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json_text(data), content_type="application/json")


# JSON bodies (a patient, an image's changes, a conflict's resolution) are at most a few KB; the much
# larger [api] max_body_mb is for uploads, and would let a client make the daemon parse 200 MB of JSON.
MAX_JSON_BYTES = 1024 * 1024


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 4xx problem saying what is wrong with it: 413 over
    MAX_JSON_BYTES, 400 when it is not JSON or nests deeper than the parser's recursion allows."""
    raw = await read_body(request, MAX_JSON_BYTES, f"a JSON body may be at most {MAX_JSON_BYTES} bytes")
    try:
        body = json.loads(raw.decode(request.charset or "utf-8"))
    except (ValueError, LookupError):  # not JSON, not in its charset, or an unknown charset
        raise ProblemError(400, "the body is not valid JSON") from None
    except RecursionError:
        raise ProblemError(400, "the body is not valid JSON: it nests too deeply") from None
    if not isinstance(body, dict):
        raise ProblemError(400, "the body must be a JSON object")
    return body


# ------------------------------------------------------------------------------------------------
# Patients


@routes.get("/api/v1/patients")
async def list_patients(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    limit = int_param(request, "limit", 50, 1, MAX_LIMIT)
    after_id = cursor_after_id(request)
    found = await rt.service.search_patients(
        origin_of(request),
        pms_id=query_text(request, "pms_id"),
        pms_system=query_text(request, "pms_system"),
        chart_number=query_text(request, "chart_number"),
        name=query_text(request, "name"),
        birth_date=query_date(request, "birth_date"),
        after_id=after_id,
        limit=limit,
    )
    nxt = encode_cursor(found[-1].id) if len(found) == limit else None
    return json_response({"items": [p.to_json() for p in found], "next": nxt})


# What `sex` may be, case-insensitive: the API's letters and the English words for them. Anything else is
# refused rather than read by its first letter ("Mrs" is not male, "Frau" not female).
SEX_WORDS: dict[str, Sex] = {
    **{sex.value.lower(): sex for sex in Sex},
    "male": Sex.MALE,
    "female": Sex.FEMALE,
    "other": Sex.OTHER,
    "unknown": Sex.UNKNOWN,
}


def parse_sex(value: Any) -> Sex:
    """The `sex` of a JSON body (SEX_WORDS); absent, null or "" is unknown, anything else a 422."""
    if value is None or value == "":
        return Sex.UNKNOWN
    sex = SEX_WORDS.get(value.strip().lower()) if isinstance(value, str) else None
    if sex is None:
        allowed = "M, F, O, U (or male, female, other, unknown)"
        raise ProblemError(422, f"sex must be one of {allowed}, got {value!r:.40}", field="sex")
    return sex


def demographics_from_json(body: dict[str, Any]) -> Demographics:
    """The demographics of a POST /patients body; every field checked, none silently dropped (a birth
    date sent as a number would otherwise hide a birth-date conflict)."""
    return Demographics(
        birth_date=body_birth_date(body, "birth_date"),
        sex=parse_sex(body.get("sex")),
        **{name: body_text(body, name, strip=True) for name in DEMOGRAPHIC_TEXTS},
    )


@routes.post("/api/v1/patients")
async def create_or_update_patient(request: web.Request) -> web.Response:
    """The front desk's "+": create or update by PMS key, under the same identity rules as every PMS."""
    rt = request.app[RUNTIME]
    body = await json_object(request)
    pms_system, pms_id, practice_id, chart = (
        body_text(body, name) for name in ("pms_system", "pms_id", "practice_id", "chart_number")
    )
    req = PatientRequest(
        action=Action.CREATE_OR_UPDATE,
        origin=origin_of(request),
        pms_system=pms_system,
        pms_id=pms_id,
        practice_id=practice_id,
        id_kind=IdKind.PMS_ID if pms_id else IdKind.CHART_NUMBER,
        chart_number=chart,
        demographics=demographics_from_json(body),
    )
    outcome = await rt.service.handle(req)
    if rt.recorder is not None:
        await rt.recorder.api("POST", "/api/v1/patients", body, STATUS_HTTP[outcome.status], outcome)
    if not outcome.status.ok:
        raise ProblemError(
            STATUS_HTTP[outcome.status],
            outcome.message,
            kind=outcome.status.value.replace("_", "-"),
            **({"conflict_id": outcome.conflict_id} if outcome.conflict_id else {}),
            **({"field": outcome.field} if outcome.field else {}),
        )
    assert outcome.patient is not None
    return json_response(outcome.patient.to_json(), STATUS_HTTP[outcome.status])


@routes.get("/api/v1/patients/{id}")
async def get_patient(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    view = await rt.service.get_patient(origin_of(request), path_id(request))
    if view is None:
        raise ProblemError(404, f"no patient with id {request.match_info['id']}")
    return json_response(view.to_json())


@routes.get("/api/v1/patients/{id}/images")
async def list_patient_images(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    patient_id = path_id(request)
    limit = int_param(request, "limit", 100, 1, MAX_LIMIT)
    after = cursor_after_capture(request)
    if await rt.service.get_patient(origin_of(request), patient_id) is None:
        raise ProblemError(404, f"no patient with id {patient_id}")
    images = await rt.service.list_images(origin_of(request), patient_id, after=after, limit=limit)
    nxt = None
    if len(images) == limit:
        last = images[-1]
        nxt = encode_cursor([last.captured_at.isoformat() if last.captured_at else None, last.id])
    return json_response({"items": [i.to_json() for i in images], "next": nxt})


MAX_UPLOAD_FILES = 100


@routes.post("/api/v1/patients/{id}/images")
async def upload_images(request: web.Request) -> web.Response:
    """New acquisitions as multipart parts named `file`; optional fields apply to all of them."""
    rt = request.app[RUNTIME]
    patient_id = path_id(request)
    if not request.content_type.startswith("multipart/"):
        raise ProblemError(415, "send the images as multipart/form-data parts named 'file'")
    limit = request.app[MAX_BODY]
    if (request.content_length or 0) > limit:
        raise ProblemError(413, f"request body too large (limit {limit} bytes)")
    read_in_large_pieces(request.transport)
    blobs: list[tuple[str, bytes]] = []
    fields: dict[str, str] = {}
    try:
        form = FormReader(
            request.content,
            boundary_of(parse_mimetype(request.headers[CONTENT_TYPE]).parameters),
            max_bytes=limit,
        )
        while (part := await form.next_part()) is not None:
            if part.name == "file":
                if len(blobs) >= MAX_UPLOAD_FILES:
                    raise ProblemError(413, f"at most {MAX_UPLOAD_FILES} files per request")
                blobs.append((part.filename or "", await form.read_all()))
            elif part.name:
                fields[part.name] = (await form.read_all()).decode("utf-8", "replace")
    except BodyTooLarge as exc:
        raise ProblemError(413, str(exc)) from None
    except MultipartError as exc:
        raise ProblemError(400, f"the upload is not well-formed multipart/form-data: {exc}") from None
    if not blobs:
        raise ProblemError(400, "no part named 'file' in the upload")
    metadata = upload_metadata(fields)
    if await rt.service.get_patient(origin_of(request), patient_id) is None:
        raise ProblemError(404, f"no patient with id {patient_id}")
    try:
        added = await rt.imaging.ingest_all(rt.service, origin_of(request), patient_id, blobs, **metadata)
    except ImagingError as exc:
        raise ProblemError(422, str(exc), kind="bad-image") from None
    except Refused as refused:
        raise ProblemError(STATUS_HTTP[refused.outcome.status], refused.outcome.message) from None
    if rt.recorder is not None:
        patient = await rt.service.get_patient(origin_of(request), patient_id)
        if patient is not None:
            await rt.recorder.upload(patient, blobs, fields)
    return json_response({"items": [i.to_json() for i in added], "next": None}, 201)


def upload_metadata(fields: dict[str, str]) -> dict[str, Any]:
    """Validate the optional upload fields: category, tooth_numbers, captured_at, rotation, mirrored ..."""
    meta: dict[str, Any] = {}
    if "category" in fields:
        try:
            meta["category"] = Category(fields["category"])
        except ValueError:
            allowed = ", ".join(c.value for c in Category)
            raise ProblemError(422, f"category must be one of {allowed}") from None
    if "tooth_numbers" in fields:
        meta["tooth_numbers"] = parse_teeth(fields["tooth_numbers"])
    if "captured_at" in fields:
        try:
            meta["captured_at"] = datetime.fromisoformat(fields["captured_at"]).replace(tzinfo=None)
        except ValueError:
            raise ProblemError(422, "captured_at must be an ISO date-time") from None
    if "rotation" in fields:
        if fields["rotation"] not in ("0", "90", "180", "270"):
            raise ProblemError(422, "rotation must be 0, 90, 180 or 270")
        meta["rotation"] = int(fields["rotation"])
    if "mirrored" in fields:
        meta["mirrored"] = fields["mirrored"].lower() in ("1", "true", "yes")
    for name in ("device", "comment"):
        if (text := form_text(fields, name)) is not None:
            meta[name] = text
    return meta


def parse_teeth(raw: str | list[Any]) -> tuple[int, ...]:
    """FDI tooth numbers (`bridge.dicom.teeth.is_fdi`: 11-18 ... 41-48, 51-55 ... 81-85), each once, in
    the order given: a form field's comma list or a JSON list of integers (or digit strings). More
    entries than FDI has teeth are refused before any is read, so a list stays cheap to check."""
    items = raw if isinstance(raw, list) else [t for t in raw.replace(";", ",").split(",") if t.strip()]
    if len(items) > len(FDI_TEETH):
        raise ProblemError(
            422,
            f"at most {len(FDI_TEETH)} tooth numbers (each FDI tooth once), got {len(items)}",
            field="tooth_numbers",
        )
    found: dict[int, None] = {}
    for item in items:
        number = parse_number(item.strip()) if isinstance(item, str) else item if type(item) is int else None
        if number is None:
            raise ProblemError(422, f"tooth number {item!r:.40} is not a number", field="tooth_numbers")
        if not is_fdi(number):
            raise ProblemError(422, f"{number} is not an FDI tooth number", field="tooth_numbers")
        if number in found:
            raise ProblemError(422, f"tooth {number} is listed twice", field="tooth_numbers")
        found[number] = None
    return tuple(found)


# ------------------------------------------------------------------------------------------------
# Images


async def image_or_404(request: web.Request, action: str) -> ImageView:
    rt = request.app[RUNTIME]
    image = await rt.service.get_image(origin_of(request), path_id(request), action=action)
    if image is None:
        raise ProblemError(404, f"no image with id {request.match_info['id']}")
    return image


@routes.get("/api/v1/images/{id}")
async def get_image(request: web.Request) -> web.Response:
    return json_response((await image_or_404(request, "image.read")).to_json())


@routes.get("/api/v1/images/{id}/file")
async def get_image_file(request: web.Request) -> web.StreamResponse:
    """The lossless original, byte for byte as stored."""
    rt = request.app[RUNTIME]
    image = await image_or_404(request, "image.file")
    path = rt.files.path_for(image.sha256, image.file_ext)
    if not await asyncio.to_thread(path.exists):  # the image store may be a share: never stat on the loop
        raise ProblemError(
            503, "the image file is not reachable (is the image share mounted?)", kind="file-missing"
        )
    return web.FileResponse(
        path,
        headers={
            "Content-Type": image.media_type,
            "ETag": f'"{image.sha256}"',
            "Content-Disposition": f'attachment; filename="image-{image.id}.{image.file_ext}"',
        },
    )


@routes.patch("/api/v1/images/{id}")
async def update_image(request: web.Request) -> web.Response:
    """Change orientation (rotation, mirrored), tooth numbers or category; audited, pixels untouched."""
    rt = request.app[RUNTIME]
    image_id = path_id(request)
    body = await json_object(request)
    unknown = sorted(set(body) - set(IMAGE_CHANGES))
    if unknown:
        raise ProblemError(422, f"cannot change {', '.join(unknown)}; changeable: {', '.join(IMAGE_CHANGES)}")
    if not body:
        raise ProblemError(422, f"nothing to change; send any of {', '.join(IMAGE_CHANGES)}")
    rotation = body.get("rotation")
    if rotation is not None and (type(rotation) is not int or rotation not in (0, 90, 180, 270)):
        raise ProblemError(422, "rotation must be 0, 90, 180 or 270 (clockwise, applied after mirroring)")
    mirrored = body.get("mirrored")
    if mirrored is not None and not isinstance(mirrored, bool):
        raise ProblemError(422, "mirrored must be true or false")
    teeth = body.get("tooth_numbers")
    if teeth is not None and not isinstance(teeth, list):
        raise ProblemError(422, "tooth_numbers must be a list of FDI numbers", field="tooth_numbers")
    category = None
    if body.get("category") is not None:
        try:
            category = Category(body["category"])
        except ValueError:
            allowed = ", ".join(c.value for c in Category)
            raise ProblemError(422, f"category must be one of {allowed}") from None
    view = await rt.service.update_image(
        origin_of(request),
        image_id,
        rotation=rotation,
        mirrored=mirrored,
        tooth_numbers=parse_teeth(teeth) if teeth is not None else None,
        category=category,
    )
    if view is None:
        raise ProblemError(404, f"no image with id {image_id}")
    return json_response(view.to_json())


IMAGE_CHANGES = ("rotation", "mirrored", "tooth_numbers", "category")

# How stale an image's orientation may be on the rendering paths when another daemon sharing the store
# changed it (this daemon's own changes apply at once); it spares a database round trip per thumbnail.
RENDER_VIEW_MAX_AGE = 2.0
# Clients may keep renderings but must revalidate (ETag): orientation can change under the same URL.
RENDER_CACHE_CONTROL = "private, no-cache"


def etag_matches(header: str, etag: str) -> bool:
    """If-None-Match semantics (RFC 9110 13.1.2): weak comparison, a list of tags, or *."""
    if header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == f'"{etag}"' for tag in header.split(","))


async def rendering_response(request: web.Request, size: int, action: str) -> web.Response:
    """A cached watermarked JPEG of the image, or 304 when the client's copy is current."""
    rt = request.app[RUNTIME]
    image = await rt.service.get_image(
        origin_of(request), path_id(request), action=action, max_age=RENDER_VIEW_MAX_AGE
    )
    if image is None:
        raise ProblemError(404, f"no image with id {request.match_info['id']}")
    return await rendered_image(request, rt, image, size)


async def rendered_image(request: web.Request, rt: Runtime, image: ImageView, size: int) -> web.Response:
    """The watermarked rendering of `image` at `size` with its ETag (304 when the client has it);
    shared by the API and OPP web's signed thumbnail links."""
    etag = rt.imaging.etag_for(image, size)
    headers = {"ETag": f'"{etag}"', "Cache-Control": RENDER_CACHE_CONTROL}
    if etag_matches(request.headers.get("If-None-Match", ""), etag):
        return web.Response(status=304, headers=headers)
    try:
        rendered = await rt.imaging.rendered(image, size)
    except ImagingError as exc:
        raise ProblemError(503, str(exc), kind="image-unavailable") from None
    return web.Response(body=rendered.data, content_type="image/jpeg", headers=headers)


@routes.get("/api/v1/images/{id}/thumbnail")
async def get_thumbnail(request: web.Request) -> web.Response:
    """A watermarked JPEG, oriented as the clinician left the image; cached on disk and in memory."""
    rt = request.app[RUNTIME]
    size = int_param(request, "size", rt.settings.thumbnails.size, 16, 2048)
    return await rendering_response(request, size, "image.thumbnail")


@routes.get("/api/v1/images/{id}/preview")
async def get_preview(request: web.Request) -> web.Response:
    """A larger watermarked JPEG for a viewer (long edge `[thumbnails] preview_size`)."""
    rt = request.app[RUNTIME]
    return await rendering_response(request, rt.settings.thumbnails.preview_size, "image.preview")


# ------------------------------------------------------------------------------------------------
# Conflicts and audit


@routes.get("/api/v1/conflicts")
async def list_conflicts(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    limit = int_param(request, "limit", 50, 1, MAX_LIMIT)
    after_id = cursor_after_id(request)
    open_only = request.query.get("state", "open") != "all"
    items = await rt.service.list_conflicts(
        origin_of(request), open_only=open_only, after_id=after_id, limit=limit
    )
    nxt = encode_cursor(items[-1]["id"]) if len(items) == limit else None
    return json_response({"items": items, "next": nxt})


@routes.post("/api/v1/conflicts/{id}/resolve")
async def resolve_conflict(request: web.Request) -> web.Response:
    """Close a conflict; with `"accept": true` (demographics conflicts) the PMS's data is applied first."""
    rt = request.app[RUNTIME]
    conflict_id = path_id(request)
    body = await json_object(request)
    resolution = body_text(body, "resolution", strip=True)
    if not resolution:
        raise ProblemError(422, 'send {"resolution": "<what was done>"}', field="resolution")
    accept = body.get("accept")  # absent or null: only close the conflict
    if accept is not None and not isinstance(accept, bool):
        raise ProblemError(422, f"accept must be true or false, got {accept!r:.40}", field="accept")
    try:
        result = await rt.service.resolve_conflict(
            origin_of(request), conflict_id, resolution, accept=bool(accept)
        )
    except Refused as refused:
        raise ProblemError(
            STATUS_HTTP[refused.outcome.status], refused.outcome.message, kind="cannot-accept"
        ) from None
    if result is None:
        raise ProblemError(404, f"no conflict with id {request.match_info['id']}")
    return json_response(result)


@routes.get("/api/v1/audit")
async def list_audit(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    limit = int_param(request, "limit", 100, 1, MAX_LIMIT)
    after_id = cursor_after_id(request)
    patient = request.query.get("patient_id")
    await rt.audit.flush()  # show reads that are still queued
    items = await rt.service.audit_entries(
        origin_of(request),
        patient_id=parse_id(patient, "patient_id") if patient else None,
        after_id=after_id,
        limit=limit,
    )
    nxt = encode_cursor(items[-1]["id"]) if len(items) == limit else None
    return json_response({"items": items, "next": nxt})
