"""Record mode with OPP: launches and OPP web requests are captured, replay at once, and carry no PHI."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import DaemonProcess, pms_bridge_command
from tests.test_oppweb import upload_png

SCRIPT = Path(sys.executable).with_name("pms-bridge")
PHI = ["Jürgen", "Müller-Lüdenscheidt", "O'Brien", "Siobhán", "0047110", "A-99", "1971-03-14", "1988-12-01"]


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """Recording and replaying do not depend on the store kind."""
    return f"sqlite:///{tmp_path / 'bridge.db'}"


def post(
    daemon: DaemonProcess, method: str, path: str, body: bytes = b"", **headers: str
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.settings.opp_web.port, timeout=30)
    try:
        conn.request(
            method, path, body=body or None, headers={k.replace("_", "-"): v for k, v in headers.items()}
        )
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def drive(daemon: DaemonProcess, tmp_path: Path) -> None:
    env = {**os.environ, "PMS_BRIDGE_CONFIG": str(daemon.config)}
    request = tmp_path / "opp.xml"
    request.write_bytes(
        b'<?xml version="1.0" encoding="UTF-8"?>\r\n'
        b'<opp version="1.2"><command type="UPDATE_CREATE" silent="NO"/>'
        b'<software name="Praxis-PMS"/><patient reference="0047110" firstName="J\xc3\xbcrgen" '
        b'lastName="M\xc3\xbcller-L\xc3\xbcdenscheidt" birthdate="1971-03-14" gender="MALE"/></opp>\r\n'
    )
    assert subprocess.run([str(SCRIPT), "opp", str(request)], env=env, check=False).returncode == 0
    flags = ["-c", "VIEW", "-p", "0047110", "-f", "Jürgen", "-l", "Müller-Lüdenscheidt", "-b", "1971-03-14"]
    assert subprocess.run([str(SCRIPT), "opp", *flags], env=env, check=False).returncode == 0

    xml = (
        '<opp version="1.3"><command type="UPDATE_CREATE"/><software name="WebPMS"/>'
        '<patient reference="A-99" firstName="Siobhán" lastName="O&apos;Brien" birthdate="1988-12-01" '
        'gender="FEMALE"/></opp>'
    ).encode()
    status, body = post(
        daemon, "POST", "/opp", xml, Content_Type="application/xml", Accept="application/json"
    )
    assert status == 200
    upload_png(daemon, json.loads(body)["patient_id"])
    status, body = post(
        daemon, "GET", "/opp?command=VIEW_DATA&reference=A-99&software=WebPMS", Accept="application/json"
    )
    assert status == 200 and len(json.loads(body)["images"]) == 1
    query = "command=VIEW&reference=A-99&software=WebPMS&lastName=" + quote("O'Brien")
    assert post(daemon, "GET", f"/opp?{query}")[0] == 200
    assert post(daemon, "POST", "/opp", b"<opp version='9.9'/>", Content_Type="application/xml")[0] == 400
    assert post(daemon, "GET", "/opp?command=UPDATE&reference=nobody&software=WebPMS")[0] == 404


def capture_text(folder: Path) -> str:
    return "\n".join(
        path.read_bytes().decode("utf-8", errors="ignore") for path in folder.rglob("*") if path.is_file()
    )


def test_an_opp_session_is_recorded_replays_and_keeps_no_phi(daemon_factory: Any, tmp_path: Path) -> None:
    captures = tmp_path / "captures"
    daemon = daemon_factory(record={"dir": str(captures)})
    drive(daemon, tmp_path)
    assert daemon.stop(signal.SIGTERM) == 0

    (session,) = captures.iterdir()
    case = json.loads((session / "case.json").read_text("utf-8"))
    transports = [(step["transport"], step.get("listener", step.get("protocol"))) for step in case["steps"]]
    assert (
        transports
        == [("cli", "opp"), ("cli", "opp"), ("http", "opp_web"), ("upload", None)] + [("http", "opp_web")] * 4
    )
    text = capture_text(session)
    leaked = [value for value in PHI if value in text or quote(value) in text]
    assert leaked == []

    done = subprocess.run(
        [*pms_bridge_command(), "replay", str(captures)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "1 pass"


def record_launches(
    daemon_factory: Any, tmp_path: Path, launches: list[tuple[str, list[str]]], **sections: dict[str, Any]
) -> tuple[Path, list[int]]:
    """The session folder recorded while `pms-bridge <protocol> <args>` ran once per launch, in order,
    and the launches' exit codes."""
    captures = tmp_path / "captures"
    daemon = daemon_factory(record={"dir": str(captures)}, **sections)
    env = {**os.environ, "PMS_BRIDGE_CONFIG": str(daemon.config)}
    codes = [
        subprocess.run([str(SCRIPT), protocol, *args], env=env, capture_output=True, check=False).returncode
        for protocol, args in launches
    ]
    assert daemon.stop(signal.SIGTERM) == 0
    (session,) = captures.iterdir()
    return session, codes


def replays(captures: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*pms_bridge_command(), "replay", str(captures)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_refused_opp_command_leaves_the_option_letters_of_later_ones_alone(
    daemon_factory: Any, tmp_path: Path
) -> None:
    refused = [
        "-p",
        "777003",
        "-l",
        "Wiśniewski",
        "-f",
        "Piotr",
        "-d",
        "dd.MM.yy",
        "-b",
        "02.05.61",
        "-g",
        "MALE",
    ]
    accepted = ["-p", "777004", "-l", "Lewandowski", "-f", "Marek", "-b", "1990-01-15", "-g", "MALE"]
    session, codes = record_launches(daemon_factory, tmp_path, [("opp", refused), ("opp", accepted)])
    assert codes == [2, 0]
    steps = json.loads((session / "case.json").read_text("utf-8"))["steps"]
    assert [a for a in steps[0]["args"] if a.startswith("-")] == ["-p", "-l", "-f", "-d", "-b", "-g"]
    assert steps[0]["args"][7] == "dd.MM.yy"  # the date format is structure
    assert [a for a in steps[1]["args"] if a.startswith("-")] == ["-p", "-l", "-f", "-b", "-g"]
    text = capture_text(session)
    leaked = [
        v
        for v in ("777003", "Wiśniewski", "Piotr", "02.05.61", "777004", "Lewandowski", "Marek", "1990-01-15")
        if v in text
    ]
    assert leaked == []
    done = replays(session.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_opp_values_attached_to_their_flags_are_pseudonymised(daemon_factory: Any, tmp_path: Path) -> None:
    flags = ["-p5015", "-lBrandt", "-fInge", "-b1961-05-02", "-gFEMALE"]
    session, codes = record_launches(daemon_factory, tmp_path, [("opp", flags)])
    assert codes == [0]
    (step,) = json.loads((session / "case.json").read_text("utf-8"))["steps"]
    assert [a[:2] for a in step["args"]] == ["-p", "-l", "-f", "-b", "-g"]
    assert step["args"][-1] == "-gFEMALE"
    text = capture_text(session)
    assert [v for v in ("5015", "Brandt", "Inge", "1961-05-02") if v in text] == []
    done = replays(session.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cliniview_arguments_split_at_spaces_are_pseudonymised_and_replay(
    daemon_factory: Any, tmp_path: Path
) -> None:
    args = ["-5479;Mary", "Ann;Van", "Der", "Berg;;11/21/1976"]
    session, codes = record_launches(daemon_factory, tmp_path, [("cliniview", args)])
    assert codes == [0]
    (step,) = json.loads((session / "case.json").read_text("utf-8"))["steps"]
    assert len(step["args"]) == 4
    words = set(re.findall(r"\w+", capture_text(session)))
    assert words.isdisjoint({"5479", "Mary", "Ann", "Van", "Der", "Berg", "MARY", "BERG"})
    text = capture_text(session)  # the date's pseudonym is 1 to 3650 days away: its year may be 1976 too
    assert "11/21/1976" not in text and "1976-11-21" not in text
    done = replays(session.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_birth_dates_in_declared_and_configured_formats_are_pseudonymised(
    daemon_factory: Any, tmp_path: Path
) -> None:
    launches = [
        ("opp", ["-p", "777005", "-l", "Nowak", "-f", "Anna", "-d", "dd-MM-yyyy", "-b", "14-07-1985"]),
        ("opp", ["-p", "777006", "-l", "Kowal", "-f", "Jan", "-d", "yyyy.MM.dd", "-b", "1979.11.23"]),
        ("cliniview", ["-4711;Ewa;Zielinska;;03-09-1966"]),
    ]
    session, codes = record_launches(
        daemon_factory, tmp_path, launches, cliniview={"date_format": "dd-MM-yyyy"}
    )
    assert codes == [0, 0, 0]
    steps = json.loads((session / "case.json").read_text("utf-8"))["steps"]
    assert [step["args"][7] for step in steps[:2]] == ["dd-MM-yyyy", "yyyy.MM.dd"]
    text = capture_text(session)
    assert [v for v in ("14-07-1985", "1979.11.23", "03-09-1966") if v in text] == []
    done = replays(session.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_refused_dexis_birth_date_is_refused_again_on_replay(daemon_factory: Any, tmp_path: Path) -> None:
    # The same date was learned from an accepted message first; its day-first form must stay invalid
    # month-first (about every other capture replayed the refusal as accepted before the fix).
    info = tmp_path / "infofile.txt"
    info.write_bytes(
        b"Tremblay, Luc  14/07/1985  (1048)\r\nPN=1048\r\nLN=Tremblay\r\nFN=Luc\r\nBD=14/07/1985\r\n"
    )
    launches = [
        ("opp", ["-p", "1048", "-l", "Tremblay", "-f", "Luc", "-b", "1985-07-14", "-g", "MALE"]),
        ("dexis", [f"@{info}"]),
    ]
    session, codes = record_launches(daemon_factory, tmp_path, launches)
    assert codes == [0, 2]
    assert "14/07/1985" not in capture_text(session)
    done = replays(session.parent)
    assert done.returncode == 0, done.stdout + done.stderr
