"""The OpenAPI 3.1 document served at /api/v1/openapi.json, written by hand beside the handlers.

A test checks that every route of the API application appears here and that the document is valid, so the
two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from bridge import __version__
from bridge.dicom.teeth import CODES as FDI_TEETH
from bridge.model import Category
from bridge.store.limits import TEXT_RULES
from bridge.web.api import SEX_WORDS
from bridge.web.dicom_import import MAX_PATH_CHARS, MAX_PATHS
from bridge.web.fields import ID_MAX

routes = web.RouteTableDef()


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _list_of(name: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["items", "next"],
        "properties": {"items": {"type": "array", "items": _ref(name)}, "next": {"type": ["string", "null"]}},
    }


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": _ref("Problem")}}}


PROBLEM = _problem("Problem")
# What every endpoint with patient data may answer, besides its own codes: the storage answers come from
# the middleware, for any handler whose disk or share fails (docs/dicom.md).
ERRORS = {
    "400": PROBLEM,
    "401": PROBLEM,
    "404": PROBLEM,
    "503": _problem("Storage the request needs (the image store or a PMS folder) cannot be read or written"),
    "507": _problem("The image store's disk or quota is full"),
}
PAGING = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
]


def _text(name: str, **more: Any) -> dict[str, Any]:
    """A text field's schema with the store's limit (bridge/web/fields.py TEXT_RULES)."""
    return {"type": "string", "maxLength": TEXT_RULES[name].limit, **more}


ROW_ID = {"type": "integer", "minimum": 1, "maximum": ID_MAX}
ID = {"name": "id", "in": "path", "required": True, "schema": ROW_ID}

PATIENT = {
    "type": "object",
    "required": [
        "id",
        "pms_id",
        "pms_system",
        "practice_id",
        "chart_number",
        "last_name",
        "first_name",
        "middle_name",
        "birth_date",
        "sex",
    ],
    "properties": {
        "id": {"type": "integer"},
        "pms_id": {
            "type": ["string", "null"],
            "description": "The PMS's patient id, kept as sent (leading zeros)",
        },
        "pms_system": {"type": ["string", "null"]},
        "practice_id": {"type": ["string", "null"]},
        "chart_number": {"type": ["string", "null"], "description": "Current chart number (an alias)"},
        "last_name": {"type": "string"},
        "first_name": {"type": "string"},
        "middle_name": {"type": "string"},
        "title": {"type": "string"},
        "birth_date": {"type": ["string", "null"], "format": "date"},
        "sex": {"enum": ["M", "F", "O", "U"]},
        "street": {"type": "string"},
        "city": {"type": "string"},
        "postal_code": {"type": "string"},
        "phone": {"type": "string"},
        "email": {"type": "string"},
    },
}

PATIENT_IN = {
    "type": "object",
    "description": "The patient's key in the PMS is pms_id or, for a PMS linking by chart numbers,"
    " chart_number: one of them is required (422 naming pms_id otherwise)",
    "required": ["pms_system"],
    "anyOf": [{"required": ["pms_id"]}, {"required": ["chart_number"]}],
    "properties": {
        "pms_system": _text("pms_system"),
        "practice_id": _text("practice_id"),
        "pms_id": _text("pms_id"),
        "chart_number": _text("chart_number"),
        "last_name": _text("last_name"),
        "first_name": _text("first_name"),
        "middle_name": _text("middle_name"),
        "title": _text("title"),
        "birth_date": {
            "type": ["string", "null"],
            "format": "date",
            "description": "Not after today (one day of slack for time zones): a later date is a 422",
        },
        "sex": {
            "type": ["string", "null"],
            "description": "Any case: " + ", ".join(SEX_WORDS) + "; absent, null or empty is U",
        },
        "street": _text("street"),
        "city": _text("city"),
        "postal_code": _text("postal_code"),
        "phone": _text("phone"),
        "email": _text("email"),
    },
}

IMAGE = {
    "type": "object",
    "required": [
        "id",
        "patient_id",
        "study_uid",
        "series_uid",
        "captured_at",
        "category",
        "tooth_numbers",
        "rotation",
        "mirrored",
        "width",
        "height",
        "bits_stored",
        "color",
        "sha256",
    ],
    "properties": {
        "id": {"type": "integer"},
        "patient_id": {"type": "integer"},
        "study_uid": {"type": "string"},
        "series_uid": {"type": "string"},
        "sop_instance_uid": {"type": "string"},
        "captured_at": {"type": ["string", "null"], "description": "Capture time, practice wall clock"},
        "category": {"enum": [c.value for c in Category]},
        "tooth_numbers": {"type": "array", "items": {"type": "integer"}, "description": "FDI numbers"},
        "rotation": {"enum": [0, 90, 180, 270]},
        "mirrored": {"type": "boolean"},
        "width": {"type": "integer"},
        "height": {"type": "integer"},
        "bits_stored": {"type": "integer"},
        "color": {"type": "boolean"},
        "sha256": {"type": "string"},
        "media_type": {"type": "string"},
        "device": {"type": "string"},
        "comment": {"type": "string"},
        "frames": {"type": "integer"},
    },
}

CONFLICT = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "kind": {"type": "string"},
        "pms_system": {"type": "string"},
        "practice_id": {"type": "string"},
        "pms_id": {"type": "string"},
        "chart_number": {"type": "string"},
        "patient_id": {"type": ["integer", "null"]},
        "other_patient_id": {"type": ["integer", "null"]},
        "message": {"type": "string"},
        "detail": {
            "type": "object",
            "description": "The kind's facts: `differences`, `candidates`; a demographics conflict's"
            " `differing` (the facts that differ: birth date, sex, surname), `sent` (the demographics the"
            " refused request sent: what accepting applies) and `accepted`",
        },
        "origin": {"type": "string"},
        "created_at": {"type": "string"},
        "resolved_at": {"type": ["string", "null"]},
        "resolution": {"type": "string"},
    },
}

AUDIT = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "at": {"type": "string"},
        "action": {"type": "string"},
        "protocol": {"type": "string"},
        "transport": {"type": "string"},
        "workstation": {"type": "string"},
        "actor": {"type": "string"},
        "request_id": {"type": "string"},
        "patient_id": {"type": ["integer", "null"]},
        "image_id": {"type": ["integer", "null"]},
        "detail": {"type": "string"},
    },
}

PROBLEM_SCHEMA = {
    "type": "object",
    "description": "RFC 9457 problem details",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "field": {"type": "string", "description": "The body or form field refused (422)"},
        "parameter": {"type": "string", "description": "The query parameter, path id or cursor refused"},
    },
}

BINARY = {"type": "string", "format": "binary"}

IMAGE_CHANGE = {
    "type": "object",
    "minProperties": 1,
    "additionalProperties": False,
    "properties": {
        "rotation": {"enum": [0, 90, 180, 270], "description": "Clockwise, applied after mirroring"},
        "mirrored": {"type": "boolean", "description": "Left-right mirror, applied first"},
        "tooth_numbers": {
            "type": "array",
            "items": {"enum": sorted(FDI_TEETH)},
            "maxItems": len(FDI_TEETH),
            "uniqueItems": True,
            "description": "FDI numbers, each tooth once",
        },
        "category": {"enum": [c.value for c in Category]},
    },
}

_FILE_PROBLEM = {
    "type": "object",
    "required": ["path", "reason"],
    "properties": {"path": {"type": "string"}, "reason": {"type": "string"}},
}
IMPORT_REPORT = {
    "type": "object",
    "description": "What became of every file of a DICOM import",
    "required": ["imported", "skipped", "errors", "notes", "summary"],
    "properties": {
        "imported": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "image_id": {"type": "integer"},
                    "patient_id": {"type": "integer"},
                    "pms_id": {"type": "string"},
                    "category": {"enum": [c.value for c in Category]},
                    "frames": {"type": "integer"},
                    "files": {"type": "integer", "description": "Source files (slices of a CT volume)"},
                },
            },
        },
        "skipped": {"type": "array", "items": _FILE_PROBLEM, "description": "Already imported, not images"},
        "errors": {"type": "array", "items": _FILE_PROBLEM, "description": "Refused, with the reason"},
        "notes": {"type": "array", "items": _FILE_PROBLEM},
        "summary": {"type": "object"},
    },
}

IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "description": "An ETag from an earlier answer: 304 when the rendering is unchanged",
    "schema": {"type": "string"},
}

_RENDER_HEADERS = {
    "ETag": {"schema": {"type": "string"}, "description": "Changes with orientation and watermark"},
    "Cache-Control": {"schema": {"type": "string"}, "description": "private, no-cache (revalidate)"},
}
RENDERING = {
    "200": {
        "description": "Watermarked JPEG",
        "headers": _RENDER_HEADERS,
        "content": {"image/jpeg": {"schema": BINARY}},
    },
    "304": {"description": "The client's copy (If-None-Match) is current", "headers": _RENDER_HEADERS},
    "503": _problem("The image cannot be read or rendered (`image-unavailable`), or storage fails"),
}


def document() -> dict[str, Any]:
    """The OpenAPI document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pms-bridge API",
            "version": __version__,
            "description": "Patients, images and watermarked thumbnails of the imaging store.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Patient": PATIENT,
                "PatientInput": PATIENT_IN,
                "Image": IMAGE,
                "ImageChange": IMAGE_CHANGE,
                "Conflict": CONFLICT,
                "AuditEntry": AUDIT,
                "Problem": PROBLEM_SCHEMA,
                "ImportReport": IMPORT_REPORT,
            },
        },
        "paths": {
            "/api/v1/patients": {
                "get": {
                    "summary": "Search patients (exact pms_id, chart_number, birth_date; name prefix)",
                    "parameters": [
                        *PAGING,
                        *(
                            {"name": n, "in": "query", "schema": _text(n)}
                            for n in ("pms_id", "pms_system", "chart_number", "name")
                        ),
                        {"name": "birth_date", "in": "query", "schema": {"type": "string", "format": "date"}},
                    ],
                    "responses": {"200": _json(_list_of("Patient")), **ERRORS},
                },
                "post": {
                    "summary": "Create or update a patient by PMS key (the front desk's +)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("PatientInput")}},
                    },
                    "responses": {
                        "200": _json(_ref("Patient"), "Updated or unchanged"),
                        "201": _json(_ref("Patient"), "Created"),
                        "403": PROBLEM,
                        "409": PROBLEM,
                        "413": PROBLEM,
                        "422": PROBLEM,
                        **ERRORS,
                    },
                },
            },
            "/api/v1/patients/{id}": {
                "get": {"parameters": [ID], "responses": {"200": _json(_ref("Patient")), **ERRORS}},
            },
            "/api/v1/patients/{id}/images": {
                "get": {
                    "summary": "A patient's images, newest capture first",
                    "parameters": [ID, *PAGING],
                    "responses": {"200": _json(_list_of("Image")), **ERRORS},
                },
                "post": {
                    "summary": "Upload new acquisitions (multipart parts named 'file')",
                    "parameters": [ID],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "file": {"type": "array", "items": BINARY},
                                        "category": {"enum": [c.value for c in Category]},
                                        "tooth_numbers": {
                                            "type": "string",
                                            "description": "comma-separated FDI numbers, each tooth once",
                                        },
                                        "captured_at": {"type": "string"},
                                        "rotation": {"enum": ["0", "90", "180", "270"]},
                                        "mirrored": {"type": "string"},
                                        "device": _text("device"),
                                        "comment": _text("comment"),
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "201": _json(_list_of("Image")),
                        "413": PROBLEM,
                        "415": PROBLEM,
                        "422": PROBLEM,
                        **ERRORS,
                    },
                },
            },
            "/api/v1/images/{id}": {
                "get": {"parameters": [ID], "responses": {"200": _json(_ref("Image")), **ERRORS}},
                "patch": {
                    "summary": "Change orientation, tooth numbers or category (audited; pixels untouched)",
                    "description": "Orientation is applied at render time: mirror left-right first, then"
                    " rotate clockwise by `rotation`. Cached renderings of the old orientation are not"
                    " served again.",
                    "parameters": [ID],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("ImageChange")}},
                    },
                    "responses": {"200": _json(_ref("Image")), "413": PROBLEM, "422": PROBLEM, **ERRORS},
                },
            },
            "/api/v1/images/{id}/file": {
                "get": {
                    "summary": "The lossless original",
                    "parameters": [ID],
                    "responses": {
                        "200": {"description": "The file", "content": {"*/*": {"schema": BINARY}}},
                        **ERRORS,
                        "503": _problem(
                            "The image file is not reachable (`file-missing`: is the image share mounted?),"
                            " or storage fails"
                        ),
                    },
                }
            },
            "/api/v1/images/{id}/thumbnail": {
                "get": {
                    "summary": "Watermarked JPEG thumbnail, orientation applied",
                    "parameters": [
                        ID,
                        {
                            "name": "size",
                            "in": "query",
                            "description": "Long edge in pixels (default [thumbnails] size)",
                            "schema": {"type": "integer", "minimum": 16, "maximum": 2048},
                        },
                        IF_NONE_MATCH,
                    ],
                    "responses": {**ERRORS, **RENDERING},
                }
            },
            "/api/v1/images/{id}/preview": {
                "get": {
                    "summary": "Larger watermarked JPEG for a viewer (long edge [thumbnails] preview_size)",
                    "parameters": [ID, IF_NONE_MATCH],
                    "responses": {**ERRORS, **RENDERING},
                }
            },
            "/api/v1/conflicts": {
                "get": {
                    "summary": "Identity conflicts (open ones unless state=all)",
                    "parameters": [
                        *PAGING,
                        {"name": "state", "in": "query", "schema": {"enum": ["open", "all"]}},
                    ],
                    "responses": {"200": _json(_list_of("Conflict")), **ERRORS},
                }
            },
            "/api/v1/conflicts/{id}/resolve": {
                "post": {
                    "summary": "Close a conflict; accept: apply the demographics the PMS sent first",
                    "description": "Without `accept` only the conflict is closed: no patient data changes,"
                    ' so the same PMS request is refused again (a new conflict). With `"accept": true`'
                    " (a `demographics` conflict: a marriage name, a corrected birth date) the"
                    " demographics the refused request sent are applied to the patient (audited"
                    " patient.update) and the conflict is closed, in one transaction; the same launch then"
                    " opens the patient. Other kinds, conflicts closed without accepting and conflicts"
                    " recorded before the bridge kept the sent data cannot be accepted: 409 (problem"
                    " type `cannot-accept`) saying why.",
                    "parameters": [ID],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["resolution"],
                                    "properties": {
                                        "resolution": _text("resolution"),
                                        "accept": {
                                            "type": ["boolean", "null"],
                                            "description": "true: the PMS is right; apply what it sent",
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json(_ref("Conflict")),
                        "409": PROBLEM,
                        "413": PROBLEM,
                        "422": PROBLEM,
                        **ERRORS,
                    },
                }
            },
            "/api/v1/audit": {
                "get": {
                    "summary": "The audit log: who read or changed what",
                    "parameters": [
                        *PAGING,
                        {"name": "patient_id", "in": "query", "schema": ROW_ID},
                    ],
                    "responses": {"200": _json(_list_of("AuditEntry")), **ERRORS},
                }
            },
            "/api/v1/events": {
                "get": {
                    "summary": "Server-Sent Events: patient-opened, acquisition-requested,"
                    " image-view-requested, images-added",
                    "parameters": [
                        {
                            "name": "workstation",
                            "in": "query",
                            "description": "Only the events of requests from this workstation (the event's"
                            " `workstation`, compared without case): a workstation's viewer follows only"
                            " what its own PMS opens",
                            "schema": _text("workstation"),
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "An open stream of `event: <name>` and `data: <JSON>` lines",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **ERRORS,
                    },
                }
            },
            "/api/v1/launch/{protocol}": {
                "post": {
                    "summary": "Hand a PMS message to the daemon (used by the pms-bridge launch commands)",
                    "parameters": [
                        {"name": "protocol", "in": "path", "required": True, "schema": {"type": "string"}},
                        {
                            "name": "arg",
                            "in": "query",
                            "schema": {"type": "array", "items": {"type": "string"}},
                        },
                    ],
                    "requestBody": {"content": {"application/octet-stream": {"schema": BINARY}}},
                    "responses": {
                        "200": {
                            "description": "Answer bytes; X-PMS-Exit, X-PMS-Message, X-PMS-Write headers",
                            "content": {"application/octet-stream": {"schema": BINARY}},
                        },
                        "413": PROBLEM,
                        "415": _problem(
                            "The body's Content-Type declares a charset that cannot read it"
                            " (`unsupported-charset`)"
                        ),
                        **ERRORS,
                    },
                }
            },
            "/api/v1/import": {
                "post": {
                    "summary": "Import DICOM files and zipped DICOM file sets (multipart parts named 'file',"
                    " one file as an application/dicom or application/zip body, or JSON naming files and"
                    " folders of the server inside [dicom] import_folders)",
                    "description": "Patients are found by the identity rules from the files' patient id"
                    " ([dicom] patient_id_tag, pms_system) and created only when allow_patient_creation"
                    " permits. Each image is imported completely or not at all; the report names every file."
                    " A JSON body is refused (403) while [dicom] import_folders is empty, and when a path is"
                    " not inside one of those folders once symbolic links are resolved.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"file": {"type": "array", "items": BINARY}},
                                }
                            },
                            "application/dicom": {"schema": BINARY},
                            "application/zip": {"schema": BINARY},
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["paths"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "paths": {
                                            "type": "array",
                                            "minItems": 1,
                                            "maxItems": MAX_PATHS,
                                            "items": {"type": "string", "maxLength": MAX_PATH_CHARS},
                                            "description": "Absolute paths on the server: files, folders,"
                                            " DICOMDIR file sets",
                                        }
                                    },
                                }
                            },
                        },
                    },
                    "responses": {
                        "200": _json(_ref("ImportReport"), "Nothing new: every file was imported before"),
                        "201": _json(_ref("ImportReport"), "Images were imported (errors may list others)"),
                        "400": PROBLEM,
                        "403": PROBLEM,
                        "413": PROBLEM,
                        "415": PROBLEM,
                        "422": PROBLEM,
                        "500": PROBLEM,
                        **ERRORS,
                    },
                }
            },
            "/api/v1/openapi.json": {
                "get": {"security": [], "responses": {"200": _json({"type": "object"})}},
            },
            "/healthz": {
                "get": {
                    "security": [],
                    "summary": "Liveness",
                    "responses": {"200": _json({"type": "object"})},
                }
            },
            "/readyz": {
                "get": {
                    "security": [],
                    "summary": "Readiness: store, image folder, watched folders and last scan age",
                    "responses": {
                        "200": _json({"type": "object"}),
                        "503": _json({"type": "object"}, "Not ready"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "security": [],
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "text/plain",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
    }


@routes.get("/api/v1/openapi.json")
async def openapi_json(_request: web.Request) -> web.Response:
    return web.json_response(document())
