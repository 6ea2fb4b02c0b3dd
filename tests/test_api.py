"""The REST API over real loopback HTTP: auth, problem bodies, paging, the contract's fields, limits."""

from __future__ import annotations

import ast
import asyncio
import base64
import hmac
import inspect
import io
import json
import textwrap
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

import numpy as np
import pytest
from aiohttp import FormData
from PIL import Image

from bridge.runtime import Runtime
from bridge.store.models import Conflict
from bridge.web.app import build_api_app
from bridge.web.problems import CONTENT_TYPE as PROBLEM

PATIENT_FIELDS = {
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
}
IMAGE_FIELDS = {
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
}


def png16(width: int = 40, height: int = 30) -> bytes:
    pixels = (np.arange(width * height, dtype=np.uint16).reshape(height, width) * 3 + 1000) & 0x0FFF
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


async def create(client: Any, **fields: Any) -> Any:
    body = {"pms_system": "desk", "pms_id": "1", "last_name": "Doe", "first_name": "Jane", **fields}
    return await client.post("/api/v1/patients", json=body)


async def test_data_needs_the_token_and_health_does_not(api_client: Any) -> None:
    anonymous = {"Authorization": ""}
    for path in ("/api/v1/patients", "/api/v1/patients/1", "/api/v1/images/1/file", "/api/v1/audit"):
        response = await api_client.get(path, headers=anonymous)
        assert response.status == 401, path
        assert response.content_type == PROBLEM
        body = await response.json(content_type=PROBLEM)
        assert body["status"] == 401 and body["type"].endswith("unauthorized") and body["detail"]
    wrong = await api_client.get("/api/v1/patients", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401
    for path in ("/healthz", "/readyz", "/metrics", "/api/v1/openapi.json"):
        assert (await api_client.get(path, headers=anonymous)).status == 200, path


async def test_create_update_conflict_and_get(api_client: Any) -> None:
    created = await create(
        api_client, pms_id="00123", birth_date="1980-05-06", sex="F", chart_number="DOEJA0"
    )
    assert created.status == 201
    patient = await created.json()
    assert set(patient) >= PATIENT_FIELDS
    assert patient["pms_id"] == "00123" and patient["birth_date"] == "1980-05-06" and patient["sex"] == "F"
    same = await create(api_client, pms_id="00123", first_name="Janet")
    assert same.status == 200 and (await same.json())["first_name"] == "Janet"
    clash = await create(api_client, pms_id="00123", birth_date="1981-05-06")
    assert clash.status == 409 and clash.content_type == PROBLEM
    problem = await clash.json(content_type=PROBLEM)
    assert "birth date" in problem["detail"] and problem["conflict_id"]
    got = await api_client.get(f"/api/v1/patients/{patient['id']}")
    assert (await got.json())["chart_number"] == "DOEJA0"
    conflicts = await (await api_client.get("/api/v1/conflicts")).json()
    assert [c["id"] for c in conflicts["items"]] == [problem["conflict_id"]]
    resolved = await api_client.post(
        f"/api/v1/conflicts/{problem['conflict_id']}/resolve", json={"resolution": "PMS corrected"}
    )
    assert resolved.status == 200 and (await resolved.json())["resolved_at"]
    assert (await (await api_client.get("/api/v1/conflicts")).json())["items"] == []


async def resolve(client: Any, conflict_id: int, **body: Any) -> Any:
    return await client.post(
        f"/api/v1/conflicts/{conflict_id}/resolve", json={"resolution": "checked", **body}
    )


async def conflict_of(response: Any) -> int:
    assert response.status == 409, await response.text()
    conflict_id: int = (await response.json(content_type=PROBLEM))["conflict_id"]
    return conflict_id


async def test_a_patient_without_pms_id_or_chart_number_is_refused_naming_pms_id(api_client: Any) -> None:
    """The document requires one of the two; without either the service's 422 names both, and `pms_id`
    as its field (it said "no chart number", the key the handler fell back to)."""
    for missing in ({}, {"pms_id": " ", "chart_number": ""}):
        response = await api_client.post(
            "/api/v1/patients", json={"pms_system": "test", "last_name": "NoId", **missing}
        )
        assert response.status == 422
        problem = await response.json(content_type=PROBLEM)
        assert (problem["field"], problem["detail"]) == (
            "pms_id",
            "the request carries neither a patient id (pms_id) nor a chart number (chart_number)",
        )
    by_chart = await api_client.post("/api/v1/patients", json={"pms_system": "test", "chart_number": "C7"})
    assert by_chart.status == 201 and (await by_chart.json())["chart_number"] == "C7"
    schema = (await (await api_client.get("/api/v1/openapi.json")).json())["components"]["schemas"]
    assert schema["PatientInput"]["anyOf"] == [{"required": ["pms_id"]}, {"required": ["chart_number"]}]


async def test_the_audit_log_names_what_differs_never_the_values(api_client: Any) -> None:
    """A conflict's audit entry names its kind, its id and which facts differ; the names, dates and ids
    stay in the conflict (GET /api/v1/conflicts). A renumbered chart's entry carries no chart number."""
    sent = {"pms_id": "007", "last_name": "Müller", "birth_date": "1970-01-02", "chart_number": "CH-41"}
    patient = await (await create(api_client, **sent)).json()
    assert (await create(api_client, **{**sent, "chart_number": "CH-42"})).status == 200
    changed = {**sent, "chart_number": "CH-42", "last_name": "Meier", "birth_date": "1980-03-04"}
    conflict_id = await conflict_of(await create(api_client, **changed))
    surname_only = await conflict_of(await create(api_client, **{**changed, "birth_date": "1970-01-02"}))
    audit = await api_client.get("/api/v1/audit", params={"patient_id": str(patient["id"])})
    entries = (await audit.json())["items"]
    details = {e["action"]: e["detail"] for e in entries if e["action"] != "conflict.record"}
    assert details["chart.renumber"] == "chart number changed"
    assert [e["detail"] for e in entries if e["action"] == "conflict.record"] == [
        f"demographics conflict {conflict_id}: birth date, surname differ",
        f"demographics conflict {surname_only}: surname differs",
    ]
    for value in ("007", "Müller", "Meier", "1970", "1980", "CH-4"):
        assert not [e for e in entries if value in e["detail"]], value
    conflicts = (await (await api_client.get("/api/v1/conflicts")).json())["items"]
    [kept] = [c for c in conflicts if c["id"] == conflict_id]
    assert kept["detail"]["differing"] == ["birth date", "surname"]
    assert kept["message"] == (
        "patient '007' is known with other data: birth date 1970-01-02 in the store, 1980-03-04 sent;"
        " surname 'Müller' in the store, 'Meier' sent"
    )


async def test_accepting_a_demographics_conflict_applies_what_the_pms_sent(
    api_client: Any, runtime: Runtime
) -> None:
    """A marriage name: resolving with accept applies the sent demographics, so the same request then
    succeeds instead of opening a new conflict for ever; what cannot be accepted says why."""
    patient = await (await create(api_client, pms_id="MAR2", last_name="Meyer", sex="F")).json()
    conflict_id = await conflict_of(await create(api_client, pms_id="MAR2", last_name="Schmidt", sex="F"))
    # the PMS repeating the request (with a new phone number) keeps the conflict, with what it sent last
    clash = await create(api_client, pms_id="MAR2", last_name="Schmidt", sex="F", phone="0301234")
    assert await conflict_of(clash) == conflict_id
    [listed] = (await (await api_client.get("/api/v1/conflicts")).json())["items"]
    assert (
        listed["detail"]["sent"]["last_name"] == "Schmidt" and listed["detail"]["sent"]["phone"] == "0301234"
    )
    not_bool = await resolve(api_client, conflict_id, accept="yes")
    assert not_bool.status == 422 and (await not_bool.json(content_type=PROBLEM))["field"] == "accept"
    accepted = await resolve(api_client, conflict_id, accept=True)
    assert accepted.status == 200, await accepted.text()
    body = await accepted.json()
    assert body["resolved_at"] and body["detail"]["accepted"] is True
    stored = await (await api_client.get(f"/api/v1/patients/{patient['id']}")).json()
    assert (stored["last_name"], stored["phone"]) == ("Schmidt", "0301234")
    assert (await resolve(api_client, conflict_id, accept=True)).status == 200  # again: nothing changes
    again = await create(api_client, pms_id="MAR2", last_name="Schmidt", sex="F")
    assert again.status == 200 and (await again.json())["id"] == patient["id"]
    assert (await (await api_client.get("/api/v1/conflicts")).json())["items"] == []
    await runtime.audit.flush()
    audit = (await (await api_client.get(f"/api/v1/audit?patient_id={patient['id']}")).json())["items"]
    assert [e["detail"] for e in audit if e["action"] == "patient.update"] == [
        f"last_name,phone (conflict {conflict_id} accepted)"
    ]

    # a conflict closed without accepting keeps the data as it was, and cannot be accepted afterwards
    closed = await conflict_of(await create(api_client, pms_id="MAR2", last_name="Weber", sex="F"))
    assert (await resolve(api_client, closed)).status == 200
    late = await resolve(api_client, closed, accept=True)
    assert (
        late.status == 409
        and "already resolved without accepting" in (await late.json(content_type=PROBLEM))["detail"]
    )
    # another kind carries no data to accept
    assert (await create(api_client, pms_id="C1", chart_number="CH1")).status == 201
    chart = await conflict_of(await create(api_client, pms_id="C2", chart_number="CH1"))
    refused = await resolve(api_client, chart, accept=True)
    problem = await refused.json(content_type=PROBLEM)
    assert refused.status == 409 and problem["type"].endswith("cannot-accept")
    assert "chart-number conflict: it carries no patient data to accept" in problem["detail"]
    assert chart in [c["id"] for c in (await (await api_client.get("/api/v1/conflicts")).json())["items"]]
    # a conflict recorded before the sent data was kept
    old = await conflict_of(await create(api_client, pms_id="MAR2", last_name="Fischer", sex="F"))

    def forget_sent(session: Any) -> None:
        row = session.get(Conflict, old)
        row.detail = {k: v for k, v in row.detail.items() if k != "sent"}

    await runtime.db.write(forget_sent)
    before = await resolve(api_client, old, accept=True)
    assert before.status == 409
    detail = (await before.json(content_type=PROBLEM))["detail"]
    assert "recorded before the bridge kept the data" in detail
    assert "leave it open and launch the patient from the PMS again" in detail
    assert "keeps what it sent in this conflict, which can then be accepted" in detail
    stored = await (await api_client.get(f"/api/v1/patients/{patient['id']}")).json()
    assert stored["last_name"] == "Schmidt"
    # ... and it does: the relaunch is refused into that same conflict, with its data, and accept works
    assert await conflict_of(await create(api_client, pms_id="MAR2", last_name="Fischer", sex="F")) == old
    assert (await resolve(api_client, old, accept=True)).status == 200
    stored = await (await api_client.get(f"/api/v1/patients/{patient['id']}")).json()
    assert stored["last_name"] == "Fischer"


async def test_rest_edits_apply_when_pms_launches_may_not_update(make_settings: Any) -> None:
    """update_patient_info = no is about the PMS's launches: the front desk's explicit create-or-update
    still changes the phone (it was answered 200 with the old one), a launch still does not, and a
    disagreement beyond spelling is still a conflict."""
    from aiohttp.test_utils import TestClient, TestServer

    from bridge.model import Action, Demographics, Origin, PatientRequest, Status

    rt = Runtime.build(make_settings(pms={"update_patient_info": "no"}))
    client = TestClient(TestServer(build_api_app(rt)))
    await client.start_server()
    client.session.headers["Authorization"] = f"Bearer {rt.settings.api.token}"
    try:
        assert (await create(client, pms_id="7", phone="111")).status == 201
        edited = await create(client, pms_id="7", phone="222")
        assert edited.status == 200 and (await edited.json())["phone"] == "222"
        launch = PatientRequest(
            Action.OPEN,
            Origin("vdds"),
            "desk",
            pms_id="7",
            demographics=Demographics("Doe", "Jane", phone="333"),
        )
        launched = await rt.service.handle(launch)
        assert launched.status is Status.OK and launched.patient and launched.patient.phone == "222"
        assert (await create(client, pms_id="7", last_name="Smith")).status == 409
        await rt.audit.flush()
    finally:
        await client.close()
        rt.close()


async def test_bad_requests_get_problem_bodies(api_client: Any) -> None:
    cases = [
        (
            await api_client.post(
                "/api/v1/patients", data=b"{not json", headers={"Content-Type": "application/json"}
            ),
            400,
        ),
        (await api_client.post("/api/v1/patients", json=["a"]), 400),
        (await create(api_client, pms_id=123), 422),
        (await create(api_client, sex="Q"), 422),
        (await create(api_client, birth_date="14.07.1985"), 422),  # a field of the body, like sex
        (await api_client.get("/api/v1/patients?birth_date=14.07.1985"), 400),
        (await create(api_client, pms_id="", chart_number=""), 422),
        (await api_client.get("/api/v1/patients?limit=0"), 400),
        (await api_client.get("/api/v1/patients?cursor=@@@"), 400),
        (await api_client.get("/api/v1/patients/abc"), 400),
        (await api_client.get("/api/v1/nothing-here"), 404),
        (await api_client.delete("/api/v1/patients"), 405),
    ]
    for response, status in cases:
        assert response.status == status, (response.url, await response.text())
        body = await response.json(content_type=PROBLEM)
        assert set(body) >= {"type", "title", "status", "detail"} and body["status"] == status


def cursor(value: Any) -> str:
    """A cursor as the API encodes one (base64url of the JSON, unpadded), around any value."""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


async def test_malformed_ids_and_cursors_are_400_problems_naming_the_parameter(api_client: Any) -> None:
    for i in range(3):
        assert (await create(api_client, pms_id=f"N{i}")).status == 201
    bad_id_cursors = [cursor(v) for v in ("x", True, 1.5, [1, 2], {"a": 1}, 10**30, 0, -1)]
    cases = [
        *[
            (f"/api/v1/{what}?cursor={c}", "cursor")
            for what in ("patients", "conflicts", "audit")
            for c in bad_id_cursors
        ],
        *[
            (f"/api/v1/patients/1/images?cursor={c}", "cursor")
            for c in (
                cursor([None, 10**30]),
                cursor([None, 1e400]),
                cursor(["x", 1]),
                cursor(5),
                cursor([None]),
            )
        ],
        ("/api/v1/patients/1/images?cursor=" + cursor(["2024-01-01T00:00:00+02:00", 1]), "cursor"),
        ("/api/v1/patients?cursor=" + base64.urlsafe_b64encode(b"[" * 2000 + b"]" * 2000).decode(), "cursor"),
        ("/api/v1/audit?patient_id=99999999999999999999999", "patient_id"),
        ("/api/v1/audit?patient_id=%D9%A3", "patient_id"),
        ("/api/v1/patients/%C2%B2", "id"),
        ("/api/v1/patients/%D9%A3", "id"),  # an Arabic-Indic 3 answered patient 3
        ("/api/v1/patients/0", "id"),
        ("/api/v1/patients/9223372036854775808", "id"),
        ("/api/v1/patients/%D9%A3/images", "id"),
        ("/api/v1/images/%C2%B2", "id"),
        ("/api/v1/images/%C2%B2/thumbnail", "id"),
        ("/api/v1/images/%C2%B2/file", "id"),
        ("/api/v1/images/1/thumbnail?size=%D9%A3%D9%A3", "size"),
        ("/api/v1/patients?limit=%D9%A3", "limit"),
        ("/api/v1/patients?limit=1_0", "limit"),
    ]
    for path, parameter in cases:
        response = await api_client.get(path)
        assert response.status == 400, (path, await response.text())
        body = await response.json(content_type=PROBLEM)
        assert body["status"] == 400 and body["parameter"] == parameter, (path, body)
    for path in (
        "/api/v1/patients/9223372036854775807",
        "/api/v1/patients/0099999",
        "/api/v1/images/77/file",
    ):
        assert (await api_client.get(path)).status == 404, path
    three = await api_client.get("/api/v1/patients/3")
    assert three.status == 200 and (await three.json())["id"] == 3


async def test_birth_date_and_sex_are_taken_as_sent_or_refused(api_client: Any) -> None:
    created = await create(api_client, pms_id="S1", birth_date="1980-05-06", sex="F")
    assert created.status == 201
    # A birth date sent as a number was dropped, so this other birth date was no conflict (200).
    for birth_date in (19810102, 19800506, True, ["1980-05-06"], {"y": 1980}):
        response = await create(api_client, pms_id="S1", birth_date=birth_date, sex="F")
        assert response.status == 422, (birth_date, await response.text())
        assert (await response.json(content_type=PROBLEM))["field"] == "birth_date"
    # Sex was read by its first letter: "Mrs" was male, "Frau" female.
    for sex in ("Mrs", "Ms", "Miss", "Frau", "Mann", "W", "Q", 1, True):
        response = await create(api_client, pms_id="S2", sex=sex)
        assert response.status == 422, (sex, await response.text())
        assert (await response.json(content_type=PROBLEM))["field"] == "sex"
    for n, (sex, stored) in enumerate(
        (
            ("f", "F"),
            (" M ", "M"),
            ("female", "F"),
            ("MALE", "M"),
            ("Other", "O"),
            ("unknown", "U"),
            ("", "U"),
        )
    ):
        response = await create(api_client, pms_id=f"S3{n}", sex=sex)
        assert response.status == 201 and (await response.json())["sex"] == stored, sex
    unsent = await create(api_client, pms_id="S4", sex=None, birth_date=None)
    assert unsent.status == 201 and (await unsent.json())["sex"] == "U"


async def test_a_birth_date_in_the_future_is_refused(api_client: Any) -> None:
    """A birth date after today (and the day of slack for time zones) is a typo: the service's refusal,
    a 422 naming the field, nothing stored; today is accepted."""
    future = (date.today() + timedelta(days=3)).isoformat()  # after the slack even across midnight
    response = await create(api_client, pms_id="F1", birth_date=future)
    assert response.status == 422, await response.text()
    problem = await response.json(content_type=PROBLEM)
    assert (problem["field"], problem["detail"]) == ("birth_date", f"birth date '{future}' is in the future")
    assert (await create(api_client, pms_id="F2", birth_date=date.today().isoformat())).status == 201
    listed = await (await api_client.get("/api/v1/patients", params={"pms_id": "F1"})).json()
    assert listed["items"] == []


# The store's column lengths (bridge/store/models.py) that the API's text fields must fit.
COLUMN_LENGTHS = {
    "pms_system": 100,
    "practice_id": 100,
    "pms_id": 100,
    "chart_number": 60,
    "last_name": 120,
    "first_name": 120,
    "middle_name": 120,
    "title": 40,
    "street": 200,
    "city": 120,
    "postal_code": 20,
    "phone": 60,
    "email": 200,
}


async def test_text_fields_fit_their_columns_on_every_database(api_client: Any) -> None:
    from bridge.store.limits import TEXT_RULES

    assert {name: TEXT_RULES[name].limit for name in COLUMN_LENGTHS} == COLUMN_LENGTHS
    for n, (name, length) in enumerate(COLUMN_LENGTHS.items()):
        longest = {"pms_id": f"L{n}", name: "x" * length}
        if name != "chart_number":
            longest["chart_number"] = f"C{n}"
        created = await create(api_client, **longest)
        assert created.status == 201, (name, await created.text())
        stored = await (await api_client.get(f"/api/v1/patients/{(await created.json())['id']}")).json()
        if name in stored:
            assert stored[name] == "x" * length, name
        too_long = await create(api_client, **{**longest, "pms_id": f"T{n}", name: "x" * (length + 1)})
        assert too_long.status == 422, (name, await too_long.text())
        problem = await too_long.json(content_type=PROBLEM)
        assert problem["field"] == name and f"at most {length}" in problem["detail"]
    # SQL Server's NVARCHAR counts UTF-16 code units: a character beyond the BMP counts twice
    astral = await create(api_client, pms_id="astral", title="\U0001f600" * 21)
    assert astral.status == 422 and (await astral.json(content_type=PROBLEM))["field"] == "title"
    huge = await create(api_client, pms_id="a" * 100_000)
    assert huge.status == 422 and (await huge.json(content_type=PROBLEM))["field"] == "pms_id"
    search = await api_client.get("/api/v1/patients", params={"chart_number": "c" * 61})
    assert search.status == 400 and (await search.json(content_type=PROBLEM))["parameter"] == "chart_number"


async def test_control_characters_and_lone_surrogates_are_refused_by_name(api_client: Any) -> None:
    for name, value in (
        ("pms_id", "a\u0000b"),
        ("pms_id", "\ud800"),
        ("pms_system", "desk\x7f"),
        ("chart_number", "C\t1"),
        ("last_name", "Doe\u0000"),
        ("first_name", "Ja\x1bne"),
        ("street", "Main St\udfff"),
        ("last_name", "Meier\u2028Schulz"),  # a line separator: the PMS protocols read it inside a value
        ("first_name", "An\u2029n"),
        ("city", "K\x85ln"),  # NEL, a C1 control (cp1252's "…" read as ISO-8859-15)
    ):
        response = await create(api_client, **{"pms_id": "ctl", name: value})
        assert response.status == 422, (name, value, await response.text())
        assert (await response.json(content_type=PROBLEM))["field"] == name
    for name in ("pms_id", "name", "chart_number", "pms_system"):
        for raw in ("a%00b", "a%1Fb"):
            response = await api_client.get(f"/api/v1/patients?{name}={raw}")
            assert response.status == 400, (name, raw, await response.text())
            assert (await response.json(content_type=PROBLEM))["parameter"] == name
    assert (await api_client.get("/api/v1/patients")).status == 200  # nothing was stored
    # a conflict's resolution is free text: line breaks are fine, NUL is not
    assert (await create(api_client, pms_id="R1", birth_date="1980-01-01")).status == 201
    clash = await create(api_client, pms_id="R1", birth_date="1990-01-01")
    conflict_id = (await clash.json(content_type=PROBLEM))["conflict_id"]
    nul = await api_client.post(f"/api/v1/conflicts/{conflict_id}/resolve", json={"resolution": "ok\u0000"})
    assert nul.status == 422 and (await nul.json(content_type=PROBLEM))["field"] == "resolution"
    lines = await api_client.post(
        f"/api/v1/conflicts/{conflict_id}/resolve", json={"resolution": "PMS corrected\nby the front desk"}
    )
    assert lines.status == 200, await lines.text()


async def test_upload_comment_and_device_are_checked_not_cut(api_client: Any) -> None:
    patient = await (await create(api_client)).json()
    for name, value, status in (
        ("comment", "c" * 500, 201),
        ("comment", "first line\r\nsecond line\tend", 201),
        ("comment", "c" * 501, 422),
        ("comment", "a\x00b", 422),
        ("device", "d" * 201, 422),
        ("device", "Sensor\nX", 422),
    ):
        form = FormData()
        form.add_field("file", png16(), filename="x.png", content_type="image/png")
        form.add_field(name, value)
        response = await api_client.post(f"/api/v1/patients/{patient['id']}/images", data=form)
        assert response.status == status, (name, value, await response.text())
        if status == 422:
            assert (await response.json(content_type=PROBLEM))["field"] == name


async def test_header_bytes_that_are_not_utf8_are_recorded_readably(
    api_client: Any, runtime: Runtime
) -> None:
    """A workstation name in cp1252 arrives as bytes aiohttp hands on as lone surrogates; recorded as
    they were, they made every later audit batch fail on PostgreSQL."""
    patient = await (await create(api_client)).json()
    reader, writer = await asyncio.open_connection(api_client.server.host, api_client.server.port)
    writer.write(
        f"GET /api/v1/patients/{patient['id']} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Bearer {runtime.settings.api.token}\r\n".encode()
        + b"X-PMS-Workstation: PRAXIS-M\xdcLLER\r\nX-Request-ID: r\xff1\r\n\r\n"
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"\r\nX-Request-ID: r\xff1" not in head  # a fresh request id instead of the unprintable one
    await runtime.audit.flush()
    entries = (await (await api_client.get(f"/api/v1/audit?patient_id={patient['id']}")).json())["items"]
    assert any(e["action"] == "patient.read" and e["workstation"] == "PRAXIS-M\ufffdLLER" for e in entries)
    # the launch endpoint takes the workstation percent-encoded: a NUL in it was recorded as it came
    launched = await api_client.post(
        "/api/v1/launch/dexis",
        data=b'SET 4712 LN="Roe" FN="Ann" BD=19991231',
        headers={"X-PMS-Workstation": "WS%00%FF1", "X-PMS-Transport": "cli\t"},
    )
    assert launched.status == 200 and launched.headers["X-PMS-Exit"] == "0"
    [roe] = (await (await api_client.get("/api/v1/patients", params={"pms_id": "4712"})).json())["items"]
    await runtime.audit.flush()
    entries = (await (await api_client.get(f"/api/v1/audit?patient_id={roe['id']}")).json())["items"]
    entries = [e for e in entries if e["protocol"] == "dexis"]
    assert entries and all(e["workstation"] == "WS\ufffd1" and e["transport"] == "cli" for e in entries)


async def test_json_bodies_have_their_own_small_limit_and_depth(api_client: Any) -> None:
    """[api] max_body_mb (200 MB) is for uploads; JSON bodies stop at 1 MB, and deep nesting is a 400,
    not the parser's RecursionError as a 500."""
    patient = await (await create(api_client)).json()
    form = FormData()
    form.add_field("file", png16(), filename="x.png", content_type="image/png")
    uploaded = await api_client.post(f"/api/v1/patients/{patient['id']}/images", data=form)
    image_id = (await uploaded.json())["items"][0]["id"]
    big = json.dumps({"pms_system": "desk", "pms_id": "big", "x": "x" * (1024 * 1024)}).encode()

    async def chunked() -> Any:
        for start in range(0, len(big), 100_000):
            yield big[start : start + 100_000]

    targets = [
        ("POST", "/api/v1/patients"),
        ("PATCH", f"/api/v1/images/{image_id}"),
        ("POST", "/api/v1/conflicts/1/resolve"),
    ]
    json_type = {"Content-Type": "application/json"}
    for method, path in targets:
        for data in (io.BytesIO(big), chunked()):
            response = await api_client.request(method, path, data=data, headers=json_type)
            assert response.status == 413, (method, path, await response.text())
            assert "at most 1048576 bytes" in (await response.json(content_type=PROBLEM))["detail"]
    deep = b"[" * 100_000 + b"]" * 100_000
    for method, path in targets:
        response = await api_client.request(method, path, data=deep, headers=json_type)
        assert response.status == 400, (method, path, await response.text())
        assert "nests too deeply" in (await response.json(content_type=PROBLEM))["detail"]
    fits = json.dumps({"pms_system": "desk", "pms_id": "fits", "x": "x" * (1024 * 1024 - 100)}).encode()
    assert (await api_client.post("/api/v1/patients", data=io.BytesIO(fits), headers=json_type)).status == 201


async def test_a_launch_message_sent_in_pieces_is_read_whole(api_client: Any) -> None:
    """The launch endpoint read only what had arrived by its first read: the first piece of a body
    that comes in several (a slow share, a large exchange file)."""

    async def pieces() -> Any:
        for piece in (b'SET 4713 LN="Roe"', b' FN="Ann"', b" BD=19991231"):
            yield piece
            await asyncio.sleep(0.05)

    launched = await api_client.post("/api/v1/launch/dexis", data=pieces())
    assert launched.status == 200 and launched.headers["X-PMS-Exit"] == "0"
    [roe] = (await (await api_client.get("/api/v1/patients", params={"pms_id": "4713"})).json())["items"]
    assert (roe["last_name"], roe["first_name"], roe["birth_date"]) == ("Roe", "Ann", "1999-12-31")
    too_large = await api_client.post("/api/v1/launch/dexis", data=io.BytesIO(b" " * (4 * 1024 * 1024 + 1)))
    assert too_large.status == 413


async def test_forbidden_when_patient_creation_is_off(make_settings: Any) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    rt = Runtime.build(make_settings(pms={"allow_patient_creation": "no"}))
    client = TestClient(TestServer(build_api_app(rt)))
    await client.start_server()
    try:
        response = await client.post(
            "/api/v1/patients",
            json={"pms_system": "desk", "pms_id": "9", "last_name": "X"},
            headers={"Authorization": f"Bearer {rt.settings.api.token}"},
        )
        assert response.status == 403
        assert "allow_patient_creation" in (await response.json(content_type=PROBLEM))["detail"]
    finally:
        await client.close()
        rt.close()


async def test_search_and_cursor_paging(api_client: Any) -> None:
    for i in range(7):
        assert (await create(api_client, pms_id=f"P{i}", last_name=f"Müller{i}")).status == 201
    seen: list[str] = []
    url = "/api/v1/patients?limit=3"
    while url:
        page = await (await api_client.get(url)).json()
        seen += [p["pms_id"] for p in page["items"]]
        url = f"/api/v1/patients?limit=3&cursor={page['next']}" if page["next"] else ""
    assert seen == [f"P{i}" for i in range(7)]
    by_name = await (await api_client.get("/api/v1/patients", params={"name": "MULLER3"})).json()
    assert [p["pms_id"] for p in by_name["items"]] == ["P3"]
    by_id = await (await api_client.get("/api/v1/patients", params={"pms_id": "P5"})).json()
    assert [p["last_name"] for p in by_id["items"]] == ["Müller5"]


async def test_upload_list_and_bit_exact_original(api_client: Any) -> None:
    patient = await (await create(api_client)).json()
    data = png16(120, 90)
    form = FormData()
    form.add_field("file", data, filename="xray.png", content_type="image/png")
    form.add_field("tooth_numbers", "11, 12")
    form.add_field("captured_at", "2024-03-01T09:30:00")
    form.add_field("rotation", "90")
    uploaded = await api_client.post(f"/api/v1/patients/{patient['id']}/images", data=form)
    assert uploaded.status == 201, await uploaded.text()
    [image] = (await uploaded.json())["items"]
    assert set(image) >= IMAGE_FIELDS
    assert (
        image["tooth_numbers"] == [11, 12]
        and image["rotation"] == 90
        and image["captured_at"] == "2024-03-01T09:30:00"
    )
    assert (image["width"], image["height"], image["bits_stored"], image["color"]) == (120, 90, 16, False)
    listed = await (await api_client.get(f"/api/v1/patients/{patient['id']}/images")).json()
    assert [i["id"] for i in listed["items"]] == [image["id"]]
    original = await api_client.get(f"/api/v1/images/{image['id']}/file")
    assert original.status == 200 and await original.read() == data
    thumb = await api_client.get(f"/api/v1/images/{image['id']}/thumbnail?size=64")
    assert thumb.status == 200 and thumb.content_type == "image/jpeg"
    with Image.open(io.BytesIO(await thumb.read())) as img:
        assert max(img.size) == 64 and img.size[1] > img.size[0]  # rotated by 90 degrees


async def test_bad_uploads_are_refused_and_leave_nothing(api_client: Any, runtime: Runtime) -> None:
    patient = await (await create(api_client)).json()
    for payload in (b"not an image at all", png16()[:200]):
        form = FormData()
        form.add_field("file", payload, filename="broken.png")
        response = await api_client.post(f"/api/v1/patients/{patient['id']}/images", data=form)
        assert response.status == 422
        assert (await response.json(content_type=PROBLEM))["type"].endswith("bad-image")
    stored = [p for p in runtime.files.root.rglob("*") if p.is_file()]
    assert stored == []
    bad_teeth = FormData()
    bad_teeth.add_field("file", png16(), filename="x.png")
    bad_teeth.add_field("tooth_numbers", "19")
    assert (await api_client.post(f"/api/v1/patients/{patient['id']}/images", data=bad_teeth)).status == 422
    for teeth in ("11, 11", "١١", ",".join(["11"] * 53)):
        form = FormData()
        form.add_field("file", png16(), filename="x.png")
        form.add_field("tooth_numbers", teeth)
        response = await api_client.post(f"/api/v1/patients/{patient['id']}/images", data=form)
        assert response.status == 422, teeth
        assert (await response.json(content_type=PROBLEM))["field"] == "tooth_numbers"
    missing = FormData()
    missing.add_field("file", png16(), filename="x.png")
    assert (await api_client.post("/api/v1/patients/999/images", data=missing)).status == 404


async def test_a_malformed_acquisition_upload_is_a_400_and_stores_nothing(api_client: Any) -> None:
    patient = await (
        await api_client.post(
            "/api/v1/patients", json={"pms_system": "desk", "pms_id": "M400", "last_name": "Cut"}
        )
    ).json()
    raw = b'--cut\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n' + png16()
    response = await api_client.post(
        f"/api/v1/patients/{patient['id']}/images",
        data=raw,
        headers={"Content-Type": "multipart/form-data; boundary=cut"},
    )
    assert response.status == 400
    assert (await response.json(content_type=PROBLEM))["detail"] == (
        "the upload is not well-formed multipart/form-data: the body ends inside a part, before its closing"
        " boundary"
    )
    images = await (await api_client.get(f"/api/v1/patients/{patient['id']}/images")).json()
    assert images["items"] == []


async def test_request_size_limit(make_settings: Any) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    rt = Runtime.build(make_settings(api={"max_body_mb": 1}))
    client = TestClient(TestServer(build_api_app(rt)))
    await client.start_server()
    try:
        form = FormData()
        form.add_field("file", io.BytesIO(b"\0" * (2 * 1024 * 1024)), filename="big.png")
        response = await client.post(
            "/api/v1/patients/1/images",
            data=form,
            headers={"Authorization": f"Bearer {rt.settings.api.token}"},
        )
        assert response.status == 413
        assert "too large" in (await response.json(content_type=PROBLEM))["detail"]
    finally:
        await client.close()
        rt.close()


async def test_events_stream_follows_what_the_pms_opens(api_client: Any, runtime: Runtime) -> None:
    from bridge.model import Action, Demographics, Origin, PatientRequest

    async with api_client.get("/api/v1/events") as stream:
        assert stream.status == 200 and stream.content_type == "text/event-stream"
        assert await stream.content.readline() == b": connected\n"
        await stream.content.readline()
        request = PatientRequest(
            Action.OPEN, Origin("test"), "PVS", pms_id="77", demographics=Demographics("Roe")
        )
        await runtime.service.handle(request)
        async with asyncio.timeout(5):
            event_line = await stream.content.readline()
        async with asyncio.timeout(5):
            data_line = await stream.content.readline()
    assert event_line == b"event: patient-opened\n"
    payload = json.loads(data_line.removeprefix(b"data: "))
    assert (
        payload["pms_id"] == "77"
        and payload["open_in"] == "home"
        and payload["viewer_url"].startswith("/viewer/")
    )


async def test_events_stream_of_one_workstation(api_client: Any, runtime: Runtime) -> None:
    """A workstation's viewer follows only what its own PMS opens (?workstation=, without case)."""
    from bridge.model import Action, Demographics, Origin, PatientRequest

    bad = await api_client.get("/api/v1/events", params={"workstation": "WS\u00002"})
    assert bad.status == 400 and (await bad.json(content_type=PROBLEM))["parameter"] == "workstation"
    async with api_client.get("/api/v1/events", params={"workstation": "praxis-2"}) as stream:
        assert stream.status == 200 and await stream.content.readline() == b": connected\n"
        await stream.content.readline()
        for workstation, pms_id in (("PRAXIS-1", "71"), ("", "72"), ("PRAXIS-2", "73")):
            request = PatientRequest(
                Action.OPEN,
                Origin("test", workstation=workstation),
                "PVS",
                pms_id=pms_id,
                demographics=Demographics("Roe"),
            )
            await runtime.service.handle(request)
        async with asyncio.timeout(5):
            event_line = await stream.content.readline()
        async with asyncio.timeout(5):
            data_line = await stream.content.readline()
    assert event_line == b"event: patient-opened\n"
    payload = json.loads(data_line.removeprefix(b"data: "))
    assert (payload["pms_id"], payload["workstation"]) == ("73", "PRAXIS-2")


async def test_reading_the_event_stream_is_audited(api_client: Any, runtime: Runtime) -> None:
    """The stream names the patients a PMS opens: opening it, and every event naming a patient it
    delivers, are audited reads with the reader's origin, as a REST read is."""
    from bridge.model import Action, Demographics, Origin, PatientRequest

    async with api_client.get("/api/v1/events", headers={"X-PMS-Workstation": "SPY"}) as stream:
        assert await stream.content.readline() == b": connected\n"
        await stream.content.readline()
        request = PatientRequest(
            Action.OPEN, Origin("test"), "PVS", pms_id="78", demographics=Demographics("Roe")
        )
        patient = (await runtime.service.handle(request)).patient
        assert patient is not None
        async with asyncio.timeout(5):
            assert await stream.content.readline() == b"event: patient-opened\n"
        async with asyncio.timeout(5):
            await stream.content.readline()
    await runtime.audit.flush()
    entries = await runtime.service.audit_entries(Origin("test"), limit=500)
    spied = [(e["action"], e["patient_id"], e["detail"]) for e in entries if e["workstation"] == "SPY"]
    assert spied == [("events.read", None, ""), ("event.read", patient.id, "patient-opened")]
    actor = "token:" + hmac.new(runtime.settings.api.token.encode(), b"actor", "sha256").hexdigest()[:8]
    assert {(e["actor"], e["transport"]) for e in entries if e["workstation"] == "SPY"} == {(actor, "http")}


async def test_health_readiness_and_metrics(api_client: Any) -> None:
    assert (await (await api_client.get("/healthz")).json())["status"] == "ok"
    ready = await (await api_client.get("/readyz")).json()
    assert ready["status"] == "ready" and ready["checks"]["store"]["ok"] and ready["checks"]["images"]["ok"]
    assert ready["checks"]["images"]["free_bytes"] > 0 and ready["checks"]["images"]["low_space"] is False
    await api_client.get("/api/v1/patients")
    metrics = await (await api_client.get("/metrics")).text()
    assert 'pms_bridge_http_requests_total{listener="api",route="/api/v1/patients",status="200"}' in metrics


def raised_statuses(function: Callable[..., Any], seen: set[Callable[..., Any]] | None = None) -> set[int]:
    """The HTTP statuses `function` answers with a literal `ProblemError(STATUS, ...)`, in its own body or
    in the functions of bridge.web it calls by name (one computed at run time, `STATUS_HTTP[...]`, is not
    found)."""
    seen = set() if seen is None else seen
    if function in seen:
        return set()
    seen.add(function)
    found: set[int] = set()
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(function)))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            continue
        first = node.args[0] if node.args else None
        if (
            node.func.id == "ProblemError"
            and isinstance(first, ast.Constant)
            and isinstance(first.value, int)
        ):
            found.add(first.value)
        callee = function.__globals__.get(node.func.id)
        if inspect.isfunction(callee) and callee.__module__.startswith("bridge.web."):
            found |= raised_statuses(callee, seen)
    return found


async def test_every_route_and_its_answers_are_in_the_openapi_document(
    api_client: Any, runtime: Runtime
) -> None:
    """Every route, and every status it can answer with: the ones its handler raises (found in its code),
    401 and the storage answers (503, 507) of the middleware for every route that needs the token."""
    from openapi_spec_validator import validate

    from bridge.web.middleware import PUBLIC_PATHS

    document = await (await api_client.get("/api/v1/openapi.json")).json()
    validate(document)
    app = build_api_app(runtime)
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if route.method in ("HEAD", "OPTIONS") or not path:
            continue
        assert path in document["paths"], path
        assert route.method.lower() in document["paths"][path], (route.method, path)
        answers = raised_statuses(route.handler)
        if path not in PUBLIC_PATHS:
            answers |= {401, 503, 507}
        listed = {int(code) for code in document["paths"][path][route.method.lower()]["responses"]}
        assert answers <= listed, (route.method, path, sorted(answers - listed))


async def test_what_the_live_endpoints_answer_is_in_the_openapi_document(
    api_client: Any, runtime: Runtime
) -> None:
    """A launch posted in a charset that cannot read it (415), an image whose file is gone from the store
    (503), the event stream (200 text/event-stream): each answer as the document lists it."""
    paths = (await (await api_client.get("/api/v1/openapi.json")).json())["paths"]

    launched = await api_client.post(
        "/api/v1/launch/dexis",
        data=b'SET 4711 LN="Doe" FN="Ann"',
        headers={"Content-Type": "text/plain; charset=base64"},
    )
    assert launched.status == 415 and (await launched.json())["type"].endswith(":unsupported-charset")
    assert "415" in paths["/api/v1/launch/{protocol}"]["post"]["responses"]

    patient = await (await create(api_client)).json()
    form = FormData()
    form.add_field("file", png16(), filename="x.png", content_type="image/png")
    uploaded = await api_client.post(f"/api/v1/patients/{patient['id']}/images", data=form)
    image = (await uploaded.json())["items"][0]
    runtime.files.path_for(image["sha256"], "png").unlink()
    missing = await api_client.get(f"/api/v1/images/{image['id']}/file")
    assert missing.status == 503 and (await missing.json())["type"].endswith(":file-missing")
    assert "503" in paths["/api/v1/images/{id}/file"]["get"]["responses"]

    async with api_client.get("/api/v1/events") as stream:
        assert stream.status == 200 and stream.content_type == "text/event-stream"
    assert "text/event-stream" in paths["/api/v1/events"]["get"]["responses"]["200"]["content"]


async def test_reads_are_audited_with_the_token_actor(api_client: Any, runtime: Runtime) -> None:
    patient = await (await create(api_client)).json()
    await api_client.get(f"/api/v1/patients/{patient['id']}")
    entries = (await (await api_client.get(f"/api/v1/audit?patient_id={patient['id']}")).json())["items"]
    actions = [e["action"] for e in entries]
    assert "patient.create" in actions and "patient.read" in actions
    assert all(e["actor"].startswith("token:") and e["transport"] == "http" for e in entries)


async def test_name_search_takes_wildcards_literally(api_client: Any) -> None:
    for pms_id, last in (("W1", "50%_off"), ("W2", "50xyoff"), ("W3", "a/b")):
        assert (await create(api_client, pms_id=pms_id, last_name=last)).status == 201
    literal = await (await api_client.get("/api/v1/patients", params={"name": "50%_"})).json()
    assert [p["pms_id"] for p in literal["items"]] == ["W1"]
    slash = await (await api_client.get("/api/v1/patients", params={"name": "a/b"})).json()
    assert [p["pms_id"] for p in slash["items"]] == ["W3"]


async def test_readiness_says_the_image_folder_is_low_on_space_and_stays_ready(make_settings: Any) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    rt = Runtime.build(make_settings(store={"min_free_mb": 10**9}))
    client: TestClient[Any, Any] = TestClient(TestServer(build_api_app(rt)))
    await client.start_server()
    try:
        response = await client.get("/readyz")
        images = (await response.json())["checks"]["images"]
        assert response.status == 200 and images["ok"] and images["low_space"] is True
    finally:
        await client.close()
        rt.close()


async def test_a_missing_image_folder_is_not_ready_refuses_uploads_and_is_not_recreated(
    api_client: Any, runtime: Runtime
) -> None:
    """The share behind [store] images is unmounted: recreating its mount point would hide that and put new
    images on the local disk; readiness fails and uploads are refused until the folder is back."""
    patient = await (await create(api_client)).json()
    form = FormData()
    form.add_field("file", png16(), filename="x.png", content_type="image/png")
    [image] = (await (await api_client.post(f"/api/v1/patients/{patient['id']}/images", data=form)).json())[
        "items"
    ]
    thumbnail = f"/api/v1/images/{image['id']}/thumbnail"
    assert (await api_client.get(thumbnail)).status == 200  # now also in the memory cache
    images = runtime.files.root
    away = images.with_name("images-unmounted")
    images.rename(away)
    try:
        # a rendering still in memory is served; nothing below recreates the folder for it
        assert (await api_client.get(thumbnail)).status == 200
        with pytest.raises(FileNotFoundError):  # a rendering cached to disk (its cache is in the folder)
            runtime.imaging._write_cache(runtime.imaging.cache_dir / "ab" / "x.jpg", b"jpeg")
        response = await api_client.get("/readyz")
        body = await response.json()
        assert response.status == 503 and body["status"] == "not-ready"
        assert body["checks"]["images"] == {
            "ok": False,
            "path": str(images),
            "error": f"the image folder {images} does not exist: is the share mounted?",
        }
        form = FormData()
        form.add_field("file", png16(), filename="x.png", content_type="image/png")
        upload = await api_client.post(f"/api/v1/patients/{patient['id']}/images", data=form)
        assert upload.status == 503, await upload.text()
        assert "is the share mounted?" in (await upload.json(content_type=PROBLEM))["detail"]
        assert not images.exists()
    finally:
        away.rename(images)
    assert (await api_client.get("/readyz")).status == 200
    form = FormData()
    form.add_field("file", png16(), filename="x.png", content_type="image/png")
    assert (await api_client.post(f"/api/v1/patients/{patient['id']}/images", data=form)).status == 201
