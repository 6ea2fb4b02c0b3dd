"""OPP web on its own listener of a real daemon process (SQLite and PostgreSQL): commands, concurrency,
hostile bodies, VIEW_DATA with signed thumbnails, and the samples/oppweb cases against a running daemon.
The guards (CORS, origins, hosts, token, TLS) are in test_oppweb_guards.py."""

from __future__ import annotations

import http.client
import io
import json
import ssl
import subprocess
import sys
import threading
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from PIL import Image

from bridge.web.oppweb import JSON_TYPE
from tests.conftest import DaemonProcess

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "oppweb"
SCRIPT = Path(sys.executable).with_name("pms-bridge")
PMS_ORIGIN = "https://pms.example.com"

Reply = tuple[int, dict[str, str], bytes]


def opp_xml(command: str, reference: str, last: str = "Müller", extra: str = "") -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><opp version="1.3"><command type="{command}" silent="NO"/>'
        f'<software name="WebPMS" version="2"/><patient reference="{reference}" firstName="Jürgen" '
        f'lastName="{last}" birthdate="1985-07-14" gender="MALE" {extra}/></opp>'
    ).encode()


def call(
    daemon: DaemonProcess,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    context: ssl.SSLContext | None = None,
) -> Reply:
    """One request to the daemon's OPP web listener, with full control over the headers (Host too)."""
    port = daemon.settings.opp_web.port
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def patients(daemon: DaemonProcess, **key: str) -> list[dict[str, Any]]:
    status, body = daemon.request("GET", "/api/v1/patients?" + urlencode({"limit": 500, **key}))
    assert status == 200
    items: list[dict[str, Any]] = json.loads(body)["items"]
    return items


def problem(reply: Reply) -> dict[str, Any]:
    status, headers, body = reply
    assert headers["content-type"].startswith("application/problem+json"), (status, body)
    data: dict[str, Any] = json.loads(body)
    assert data["status"] == status
    return data


# --------------------------------------------------------------------------------------------------
# Commands


def test_update_of_an_unknown_patient_is_refused(daemon: DaemonProcess) -> None:
    reply = call(daemon, "POST", "/opp", opp_xml("UPDATE", "0815"), {"Accept": JSON_TYPE})
    assert reply[0] == 404
    data = problem(reply)
    assert (data["detail"], data["command"]) == ("no patient with id '0815' from WebPMS", "UPDATE")
    assert patients(daemon, pms_system="WebPMS") == []


def test_update_create_twice_gives_one_patient(daemon: DaemonProcess) -> None:
    first = call(daemon, "POST", "/opp", opp_xml("UPDATE_CREATE", "000815"), {"Accept": JSON_TYPE})
    second = call(
        daemon, "GET", "/opp?command=UPDATE_CREATE&reference=000815&software=WebPMS&lastName=M%C3%BCller"
    )
    assert first[0] == second[0] == 200
    created = json.loads(first[2])
    assert (created["status"], created["patient"]["last_name"]) == ("created", "Müller")
    assert f'status="ok" patientId="{created["patient_id"]}"'.encode() in second[2]
    assert [p["id"] for p in patients(daemon, pms_system="WebPMS")] == [created["patient_id"]]


def test_concurrent_update_creates_over_opp_web_create_one_patient(daemon: DaemonProcess) -> None:
    replies: list[Reply] = []
    lock = threading.Lock()

    def send() -> None:
        reply = call(daemon, "POST", "/opp", opp_xml("UPDATE_CREATE", "4242"), {"Accept": JSON_TYPE})
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=send) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(json.loads(body)["status"] for code, _, body in replies if code == 200)
    assert statuses == ["created"] + ["ok"] * 15
    assert len(patients(daemon, pms_system="WebPMS", pms_id="4242")) == 1


HOSTILE = {
    "xxe": b'<?xml version="1.0"?><!DOCTYPE opp [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    b'<opp version="1.2"><command type="UPDATE_CREATE"/><patient reference="1" lastName="&x;"/></opp>',
    "external-dtd": b'<?xml version="1.0"?><!DOCTYPE opp SYSTEM "http://127.0.0.1:9/x.dtd">'
    b'<opp version="1.2"/>',
    "entity-bomb": b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
    b'<!ENTITY b "&a;&a;&a;&a;&a;&a;">'
    b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]><opp version="1.2"><command type="UPDATE_CREATE"/>'
    b'<patient reference="1" lastName="&c;"/></opp>',
    "not-xml": b"this is not XML",
    "truncated": opp_xml("UPDATE_CREATE", "1")[:90],
    "binary": b"\x00\xff\xfe garbage \x80\x81",
}


def test_hostile_bodies_are_400_problems_change_nothing_and_the_daemon_keeps_serving(
    daemon: DaemonProcess,
) -> None:
    for name, body in HOSTILE.items():
        reply = call(daemon, "POST", "/opp", body, {"Content-Type": "application/xml"})
        assert reply[0] == 400, name
        assert problem(reply)["type"].startswith("urn:pms-bridge:problem:"), name
    assert patients(daemon) == []
    _, conflicts = daemon.request("GET", "/api/v1/conflicts")
    assert json.loads(conflicts)["items"] == []
    ok = call(daemon, "POST", "/opp", opp_xml("UPDATE_CREATE", "after"), {"Accept": JSON_TYPE})
    assert ok[0] == 200


def test_names_xml_cannot_carry_are_refused_and_never_break_an_answer(daemon: DaemonProcess) -> None:
    """lxml refuses U+FFFE: the patient was created, then every XML answer about it was a 500."""
    reply = call(daemon, "GET", "/opp?command=VIEW&reference=FFFE1&software=WebPMS&lastName=A%EF%BF%BEB")
    assert reply[0] == 400
    assert (problem(reply)["detail"], problem(reply)["type"]) == (
        "lastName contains U+FFFE, a character XML cannot carry",
        "urn:pms-bridge:problem:invalid-field",
    )
    assert patients(daemon, pms_system="WebPMS") == []
    # Another way in (the REST API here) may store such a name: the answer replaces what XML cannot hold.
    body = {"pms_system": "WebPMS", "pms_id": "FFFE2", "last_name": "A\ufffeB", "first_name": "\uffffC"}
    status, _ = daemon.request("POST", "/api/v1/patients", json.dumps(body).encode())
    assert status == 201
    for command in ("VIEW", "VIEW_DATA"):
        answer = call(daemon, "GET", f"/opp?command={command}&reference=FFFE2&software=WebPMS")
        assert answer[0] == 200, answer
        assert 'lastName="A\ufffdB"'.encode() in answer[2] and 'firstName="\ufffdC"'.encode() in answer[2]


def test_opp_web_answers_every_refusal_of_the_service() -> None:
    """Every status the service refuses with has its OPP web answer (a missing one would be a 500)."""
    from bridge.handlers.opp import WEB_ANSWERS
    from bridge.model import Status

    assert set(WEB_ANSWERS) == {s for s in Status if not s.ok and s is not Status.PARTIAL}
    assert WEB_ANSWERS[Status.INVALID] == (400, "invalid-field")


def test_what_the_store_cannot_take_is_a_400_naming_the_field(daemon: DaemonProcess) -> None:
    """Store limits are field problems as docs/opp.md lists them (400 field-too-long or invalid-field),
    never the REST API's 422: a 101-character reference, a 121-character lastName (parameters or XML
    body) and 61 characters beyond the BMP (122 UTF-16 code units, as the store counts) are too long; a
    name the store refuses (a line separator) is an invalid field. Nothing is stored."""
    long_reference = "R" * 101
    cases = {
        f"/opp?command=UPDATE_CREATE&reference={long_reference}": (
            "field-too-long",
            "reference is longer than 100 characters",
        ),
        f"/opp?command=UPDATE_CREATE&reference=L1&lastName={'L' * 121}": (
            "field-too-long",
            "lastName is longer than 120 characters",
        ),
        "/opp?command=UPDATE_CREATE&reference=L2&lastName=Meier%E2%80%A8Schulz": (  # U+2028
            "invalid-field",
            "last name must not contain a line separator (U+2028)",
        ),
        "/opp?command=UPDATE_CREATE&reference=L3&lastName=" + "%F0%9F%98%80" * 61: (  # 61 x U+1F600
            "field-too-long",
            "lastName is longer than 120 characters (UTF-16 code units, as the store counts), got 122",
        ),
    }
    for path, (kind, detail) in cases.items():
        reply = call(daemon, "GET", path)
        assert reply[0] == 400, (path, reply)
        assert (problem(reply)["type"], problem(reply)["detail"]) == (
            f"urn:pms-bridge:problem:{kind}",
            detail,
        )
    body = opp_xml("UPDATE_CREATE", "L4", last="L" * 121)
    reply = call(daemon, "POST", "/opp", body, {"Content-Type": "application/xml"})
    assert reply[0] == 400 and problem(reply)["type"] == "urn:pms-bridge:problem:field-too-long"
    assert patients(daemon) == []


def test_a_birthdate_in_the_future_is_a_400_invalid_date(daemon: DaemonProcess) -> None:
    """birthdate=2099-12-31 was stored; after today (and its day of slack) it is refused, nothing stored."""
    future = (date.today() + timedelta(days=3)).isoformat()  # after the slack even across midnight
    reply = call(daemon, "GET", f"/opp?command=UPDATE_CREATE&reference=B1&software=WebPMS&birthdate={future}")
    assert reply[0] == 400
    assert (problem(reply)["type"], problem(reply)["detail"]) == (
        "urn:pms-bridge:problem:invalid-date",
        f"birthdate '{future}' is in the future",
    )
    assert patients(daemon, pms_system="WebPMS") == []


# --------------------------------------------------------------------------------------------------
# VIEW_DATA and thumbnails


def upload_png(daemon: DaemonProcess, patient_id: int) -> None:
    image = Image.new("L", (600, 400), 40)
    image.paste(220, (200, 100, 400, 300))
    png = io.BytesIO()
    image.save(png, "PNG")
    boundary = "opp-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="category"\r\n\r\nintraoral-xray\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, reply = daemon.request(
        "POST",
        f"/api/v1/patients/{patient_id}/images",
        body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert status == 201, reply


def test_view_data_lists_images_with_signed_watermarked_thumbnail_urls(daemon_factory: Any) -> None:
    daemon = daemon_factory(opp_web={"token": "opp-secret"})
    auth = {"Authorization": "Bearer opp-secret", "Accept": JSON_TYPE}
    created = json.loads(call(daemon, "POST", "/opp", opp_xml("UPDATE_CREATE", "13"), auth)[2])
    upload_png(daemon, created["patient_id"])
    reply = call(daemon, "POST", "/opp", opp_xml("VIEW_DATA", "13"), auth)
    assert reply[0] == 200
    data = json.loads(reply[2])
    assert (data["status"], data["message"], len(data["images"])) == ("ok", "1 images", 1)
    url = urlsplit(data["images"][0]["thumbnail_url"])
    port = daemon.settings.opp_web.port
    assert (url.scheme, url.netloc) == ("http", f"127.0.0.1:{port}")

    # An <img> tag sends no token: the signature is the permission.
    thumb = call(daemon, "GET", f"{url.path}?{url.query}")
    assert thumb[0] == 200 and thumb[1]["content-type"] == "image/jpeg"
    picture = Image.open(io.BytesIO(thumb[2]))
    assert picture.format == "JPEG" and max(picture.size) == daemon.settings.thumbnails.size
    again = call(daemon, "GET", f"{url.path}?{url.query}", headers={"If-None-Match": thumb[1]["etag"]})
    assert (again[0], again[2]) == (304, b"")

    query = dict(part.split("=", 1) for part in url.query.split("&"))
    forged = f"{url.path}?exp={query['exp']}&sig=AAAA{query['sig'][4:]}"
    other_image = f"/opp/thumbnails/{data['images'][0]['id'] + 1}.jpg?{url.query}"
    later = f"{url.path}?exp={int(query['exp']) + 1}&sig={query['sig']}"
    for path in (forged, other_image, later, url.path):
        refused = call(daemon, "GET", path)
        assert refused[0] == 403 and problem(refused)["type"].endswith("invalid-link")


def test_the_oppweb_samples_replay_against_a_running_daemon(daemon: DaemonProcess) -> None:
    """Fresh-store replays of these samples run in tests/test_replay.py with all the others."""
    done = subprocess.run(
        [str(SCRIPT), "replay", str(SAMPLES), "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with_settings = [p for p in SAMPLES.glob("*/case.json") if "settings" in json.loads(p.read_text("utf-8"))]
    cases = len(list(SAMPLES.glob("*/case.json")))
    summary = f"{cases - len(with_settings)} pass, {len(with_settings)} n/a"
    assert done.stdout.strip().splitlines()[-1] == summary
