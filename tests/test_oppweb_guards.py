"""OPP web's guards and transport on a real daemon process: CORS, origins, host names, the optional token,
body limit, content negotiation, TLS, switching it off, and the transports (query, form, multipart, XML
body: their encodings, repeated parameters, HEAD, the repeated-answer key). None of this depends on the
store kind, so these run on SQLite only (the store-dependent behaviour is in test_oppweb.py, on SQLite and
PostgreSQL)."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from bridge.install import write_self_signed
from bridge.web.oppweb import FORM_TYPE, JSON_TYPE, XML_TYPE, UrlSigner, negotiate
from tests.conftest import DaemonProcess
from tests.test_oppweb import PMS_ORIGIN, Reply, call, opp_xml, patients, problem


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """One SQLite store: what is tested here happens before the store is asked."""
    return f"sqlite:///{tmp_path / 'bridge.db'}"


def test_cors_refused_for_an_origin_not_listed_and_allowed_for_a_listed_one(daemon_factory: Any) -> None:
    daemon = daemon_factory(opp_web={"cors_origins": f"{PMS_ORIGIN}, http://localhost:8080"})
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    refused = call(daemon, "OPTIONS", "/opp", headers={"Origin": "https://evil.example", **preflight})
    assert refused[0] == 403 and "access-control-allow-origin" not in refused[1]
    thumbnail = call(daemon, "OPTIONS", "/opp/thumbnails/1.jpg", headers={"Origin": "https://evil.example"})
    assert thumbnail[0] == 403 and "access-control-allow-origin" not in thumbnail[1]
    assert call(daemon, "OPTIONS", "/opp", headers=preflight)[0] == 403  # no Origin: not a preflight
    allowed = call(daemon, "OPTIONS", "/opp", headers={"Origin": PMS_ORIGIN, **preflight})
    assert allowed[0] == 204
    assert allowed[1]["access-control-allow-origin"] == PMS_ORIGIN
    assert "POST" in allowed[1]["access-control-allow-methods"]
    assert "content-type" in allowed[1]["access-control-allow-headers"].lower()

    post = call(daemon, "POST", "/opp", opp_xml("VIEW", "7"), {"Origin": PMS_ORIGIN, "Accept": JSON_TYPE})
    assert post[0] == 200 and post[1]["access-control-allow-origin"] == PMS_ORIGIN
    assert "x-request-id" in post[1]["access-control-expose-headers"].lower()

    # A form POST needs no preflight: the request is refused before it runs, not merely unreadable.
    csrf = call(
        daemon,
        "POST",
        "/opp",
        b"command=UPDATE_CREATE&reference=8&software=WebPMS",
        {"Origin": "https://evil.example", "Content-Type": FORM_TYPE},
    )
    assert csrf[0] == 403 and problem(csrf)["type"].endswith("origin-not-allowed")
    assert patients(daemon, pms_system="WebPMS", pms_id="8") == []


def test_no_origin_is_allowed_by_default(daemon: DaemonProcess) -> None:
    reply = call(
        daemon, "OPTIONS", "/opp", headers={"Origin": PMS_ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert reply[0] == 403 and "access-control-allow-origin" not in reply[1]
    post = call(daemon, "POST", "/opp", opp_xml("UPDATE_CREATE", "9"), {"Origin": PMS_ORIGIN})
    assert post[0] == 403
    assert patients(daemon, pms_system="WebPMS") == []
    # A PMS program on the workstation (no browser, no Origin) is served.
    assert call(daemon, "POST", "/opp", opp_xml("UPDATE_CREATE", "9"))[0] == 200


def test_cross_site_links_need_a_listed_referer(daemon_factory: Any) -> None:
    daemon = daemon_factory(opp_web={"cors_origins": PMS_ORIGIN})
    path = "/opp?command=VIEW&reference=10&software=WebPMS"
    nav = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert call(daemon, "GET", path, headers={**nav, "Referer": "https://evil.example/x"})[0] == 403
    assert call(daemon, "GET", path, headers=nav)[0] == 403  # no Referer: cannot tell who sent it
    assert call(daemon, "GET", path, headers={**nav, "Referer": f"{PMS_ORIGIN}/patients/10"})[0] == 200
    assert call(daemon, "GET", path, headers={"Sec-Fetch-Site": "none"})[0] == 200  # typed into the bar


def test_requests_for_a_foreign_host_name_are_refused(daemon_factory: Any) -> None:
    """DNS rebinding: a page of attacker.example resolved to 127.0.0.1 is 'same-origin' to the browser."""
    daemon = daemon_factory()
    port = daemon.settings.opp_web.port
    path = "/opp?command=UPDATE_CREATE&reference=11&software=WebPMS"
    rebound = call(daemon, "GET", path, headers={"Host": f"attacker.example:{port}"})
    assert rebound[0] == 403 and problem(rebound)["type"].endswith("host-not-allowed")
    assert call(daemon, "GET", path, headers={"Host": f"localhost:{port}"})[0] == 200
    assert call(daemon, "GET", path, headers={"Host": f"[::1]:{port}"})[0] == 200
    # HTTP/1.0 programs may send no Host at all: not a browser, so not a rebinding page.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        assert sock.makefile("rb").readline().split()[1] == b"200"
    anyhost = daemon_factory(opp_web={"allowed_hosts": "*"})
    assert call(anyhost, "GET", path, headers={"Host": "pms-server.praxis.local"})[0] == 200


def test_the_optional_token(daemon_factory: Any) -> None:
    daemon = daemon_factory(opp_web={"token": "opp-secret"})
    path = "/opp?command=UPDATE_CREATE&reference=12&software=WebPMS"
    assert call(daemon, "GET", path)[0] == 401
    assert call(daemon, "GET", path, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert patients(daemon) == []
    assert call(daemon, "GET", path, headers={"Authorization": "Bearer opp-secret"})[0] == 200


def test_a_body_over_the_limit_is_413(daemon_factory: Any) -> None:
    daemon = daemon_factory(opp_web={"max_body_kb": 1})
    reply = call(daemon, "POST", "/opp", opp_xml("UPDATE_CREATE", "1", last="x" * 2000))
    assert reply[0] == 413 and "limit 1024 bytes" in problem(reply)["detail"]
    assert patients(daemon) == []


def test_thumbnail_links_expire() -> None:
    signer = UrlSigner(b"k" * 32, ttl_seconds=60)
    url = urlsplit(signer.url("http://h", 5, now=1000.0))
    query = dict(part.split("=", 1) for part in url.query.split("&"))
    assert query["exp"] == "1060"
    assert signer.valid(5, query["exp"], query["sig"], now=1060.0)
    assert not signer.valid(5, query["exp"], query["sig"], now=1060.5)
    assert not signer.valid(6, query["exp"], query["sig"], now=1000.0)
    assert not UrlSigner(b"x" * 32, 60).valid(5, query["exp"], query["sig"], now=1000.0)


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("", XML_TYPE),
        ("*/*", XML_TYPE),
        ("application/json", JSON_TYPE),
        ("text/xml", XML_TYPE),
        ("application/json, application/xml", XML_TYPE),
        ("application/xml;q=0.5, application/json", JSON_TYPE),
        ("text/html, */*;q=0.1", XML_TYPE),
        ("application/*", XML_TYPE),
        ("text/html", None),
        ("application/json;q=0, application/xml;q=0", None),
        ("application/json;q=abc", None),
    ],
)
def test_accept_negotiation(accept: str, chosen: str | None) -> None:
    assert negotiate(accept) == chosen


def test_an_unacceptable_accept_header_is_406_and_runs_nothing(daemon: DaemonProcess) -> None:
    reply = call(daemon, "POST", "/opp", opp_xml("UPDATE_CREATE", "14"), {"Accept": "text/html"})
    assert reply[0] == 406
    assert patients(daemon) == []


def test_opp_web_over_tls(daemon_factory: Any, tmp_path: Path) -> None:
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    write_self_signed(cert, key)
    daemon = daemon_factory(opp_web={"tls": "yes", "tls_cert": str(cert), "tls_key": str(key)})
    context = ssl.create_default_context(cafile=str(cert))
    reply = call(
        daemon, "POST", "/opp", opp_xml("UPDATE_CREATE", "15"), {"Accept": JSON_TYPE}, context=context
    )
    assert reply[0] == 200 and json.loads(reply[2])["status"] == "created"
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        call(daemon, "POST", "/opp", opp_xml("UPDATE_CREATE", "16"))
    # The API listener stays plain HTTP: TLS is per listener.
    assert daemon.request("GET", "/healthz", token=None)[0] == 200


def test_opp_web_can_be_switched_off(daemon_factory: Any) -> None:
    daemon = daemon_factory(opp_web={"enabled": "no"})
    with pytest.raises(ConnectionRefusedError):
        call(daemon, "GET", "/opp")


# --------------------------------------------------------------------------------------------------
# Transports: how a message may come, and how its bytes are read


def json_view(daemon: DaemonProcess, method: str, path: str, body: bytes = b"", **headers: str) -> Reply:
    return call(daemon, method, path, body, {"Accept": JSON_TYPE, **headers})


def test_a_kept_answer_is_found_by_the_query_as_sent(daemon: DaemonProcess) -> None:
    """yarl's query_string decodes %25: reference=K%2526 and reference=K%26 gave one key, and the
    patient "K&" was answered with the patient "K%26"."""
    for _ in range(2):  # the second answer is a pure read: kept
        reply = json_view(daemon, "GET", "/opp?command=VIEW&reference=K%2526&software=WebPMS")
        assert json.loads(reply[2])["patient"]["pms_id"] == "K%26"
    other = json_view(daemon, "GET", "/opp?command=VIEW&reference=K%26&software=WebPMS")
    assert (other[0], json.loads(other[2])["status"], json.loads(other[2])["patient"]["pms_id"]) == (
        200,
        "created",
        "K&",
    )
    assert sorted(p["pms_id"] for p in patients(daemon, pms_system="WebPMS")) == ["K%26", "K&"]


def test_a_kept_answer_is_found_by_the_whole_content_type(daemon: DaemonProcess) -> None:
    """The charset parameter decides what a form body's bytes mean, so it is part of the key."""
    body = b"command=VIEW&software=WebPMS&reference=Z%C3%BC1"
    latin1 = f"{FORM_TYPE}; charset=iso-8859-1"
    for _ in range(2):
        reply = json_view(daemon, "POST", "/opp", body, **{"Content-Type": latin1})
        assert json.loads(reply[2])["patient"]["pms_id"] == "Z\u00c3\u00bc1"
    utf8 = json_view(daemon, "POST", "/opp", body, **{"Content-Type": FORM_TYPE})
    assert (utf8[0], json.loads(utf8[2])["status"], json.loads(utf8[2])["patient"]["pms_id"]) == (
        200,
        "created",
        "Zü1",
    )


def multipart(fields: list[tuple[str, bytes, str]], boundary: str = "opp-boundary") -> tuple[bytes, str]:
    """A multipart/form-data body of (name, value, extra part headers) and its Content-Type."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n{extra}\r\n'.encode()
        + value
        + b"\r\n"
        for name, value, extra in fields
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_form_fields_are_a_message(daemon: DaemonProcess) -> None:
    """The body is read before parsing (the repeated-answer key needs it): multipart failed with 500."""
    body, content_type = multipart(
        [
            ("command", b"VIEW", ""),
            ("reference", b"MP1", ""),
            ("software", b"WebPMS", ""),
            ("lastName", "Müller".encode(), ""),
            ("firstName", "Jürgen".encode("latin-1"), "Content-Type: text/plain; charset=iso-8859-1\r\n"),
        ]
    )
    reply = json_view(daemon, "POST", "/opp", body, **{"Content-Type": content_type})
    assert reply[0] == 200 and json.loads(reply[2])["status"] == "created", reply
    found = patients(daemon, pms_system="WebPMS", pms_id="MP1")
    assert [(p["last_name"], p["first_name"]) for p in found] == [("Müller", "Jürgen")]
    upload, upload_type = multipart([("command", b"VIEW", ""), ("reference", b"MP2", "")])
    upload = upload.replace(b'name="reference"', b'name="reference"; filename="x.txt"')
    refused = json_view(daemon, "POST", "/opp", upload, **{"Content-Type": upload_type})
    assert refused[0] == 415 and "file parts are not accepted" in problem(refused)["detail"]
    broken = json_view(daemon, "POST", "/opp", body[:60], **{"Content-Type": content_type})
    assert broken[0] == 400 and "not well-formed multipart/form-data" in problem(broken)["detail"]
    assert patients(daemon, pms_system="WebPMS", pms_id="MP2") == []


def test_a_post_without_a_body_takes_the_query_whatever_its_content_type(daemon: DaemonProcess) -> None:
    """jQuery's $.post(url) sends a form Content-Type and no body."""
    form = {"Content-Type": FORM_TYPE}
    reply = json_view(daemon, "POST", "/opp?command=VIEW&reference=Q1&software=WebPMS", b"", **form)
    assert reply[0] == 200 and json.loads(reply[2])["status"] == "created", reply
    assert len(patients(daemon, pms_system="WebPMS", pms_id="Q1")) == 1


def test_latin1_parameters_are_read_with_the_opp_encoding_never_as_replacement_characters(
    daemon: DaemonProcess,
) -> None:
    stored = call(daemon, "POST", "/opp", opp_xml("UPDATE_CREATE", "000815"), {"Accept": JSON_TYPE})
    assert json.loads(stored[2])["status"] == "created"
    latin1 = "lastName=M%FCller&firstName=J%FCrgen&birthdate=1985-07-14&gender=MALE"
    reply = json_view(daemon, "GET", f"/opp?command=VIEW&reference=000815&software=WebPMS&{latin1}")
    assert (reply[0], json.loads(reply[2])["status"]) == (200, "ok")
    form = b"command=UPDATE_CREATE&software=WebPMS&reference=L2&lastName=Gro\xdf&firstName=J%FCrgen"
    raw = json_view(daemon, "POST", "/opp", form, **{"Content-Type": FORM_TYPE})
    assert raw[0] == 200, raw
    charset = f"{FORM_TYPE}; charset=iso-8859-1"
    body = b"command=UPDATE_CREATE&software=WebPMS&reference=L3&lastName=%C4rger"
    assert json_view(daemon, "POST", "/opp", body, **{"Content-Type": charset})[0] == 200
    names = {p["pms_id"]: (p["last_name"], p["first_name"]) for p in patients(daemon, pms_system="WebPMS")}
    assert names == {"000815": ("Müller", "Jürgen"), "L2": ("Groß", "Jürgen"), "L3": ("Ärger", "")}

    unknown = json_view(daemon, "POST", "/opp", body, **{"Content-Type": f"{FORM_TYPE};charset=foo"})
    assert unknown[0] == 400 and problem(unknown)["type"].endswith("unsupported-encoding")
    unreadable = json_view(daemon, "GET", "/opp?command=VIEW&reference=L4&lastName=M%81ller")
    assert unreadable[0] == 400
    assert (
        problem(unreadable)["detail"]
        == "parameter lastName is neither utf-8 nor cp1252 text (the [opp] encoding)"
    )
    assert patients(daemon, pms_id="L4") == []


def test_xml_bodies_with_odd_encodings_are_400_or_read_never_500(daemon: DaemonProcess) -> None:
    for encoding in ("undefined", "punycode", "utf-7"):
        data = opp_xml("VIEW", "U7", last="+2AA-").replace(
            b'encoding="UTF-8"', f'encoding="{encoding}"'.encode()
        )
        reply = call(daemon, "POST", "/opp", data, {"Content-Type": XML_TYPE})
        assert reply[0] == 400 and problem(reply)["type"].endswith("not-xml"), (encoding, reply)
    utf16 = (
        opp_xml("VIEW", "BE1").replace(b'encoding="UTF-8"', b'encoding="UTF-16"').decode().encode("utf-16-be")
    )
    reply = json_view(daemon, "POST", "/opp", utf16, **{"Content-Type": FORM_TYPE})  # curl -d's default type
    assert reply[0] == 200 and json.loads(reply[2])["patient"]["last_name"] == "Müller", reply
    assert [p["pms_id"] for p in patients(daemon)] == ["BE1"]


def test_head_does_not_run_the_command(daemon: DaemonProcess) -> None:
    reply = call(daemon, "HEAD", "/opp?command=VIEW&reference=HEAD1&software=WebPMS")
    assert reply[0] == 405 and reply[1]["content-type"].startswith("application/problem+json")
    for method in ("PUT", "DELETE"):
        assert call(daemon, method, "/opp?command=VIEW&reference=HEAD1")[0] == 405
    assert patients(daemon) == []


def test_a_repeated_parameter_or_software_element_is_refused(daemon: DaemonProcess) -> None:
    reply = call(daemon, "GET", "/opp?command=VIEW&reference=D1&reference=D2&software=WebPMS")
    assert reply[0] == 400
    assert (problem(reply)["detail"], problem(reply)["type"]) == (
        "parameter reference is given twice",
        "urn:pms-bridge:problem:invalid-field",
    )
    body = b"command=VIEW&reference=D1&Software=A&software=B"
    assert call(daemon, "POST", "/opp", body, {"Content-Type": FORM_TYPE})[0] == 400
    two = opp_xml("VIEW", "D1").replace(b"</opp>", b'<software name="Other" version="1"/></opp>')
    reply = call(daemon, "POST", "/opp", two, {"Content-Type": XML_TYPE})
    assert reply[0] == 400 and "has 2 <software> elements, not one" in problem(reply)["detail"]
    assert patients(daemon) == []
