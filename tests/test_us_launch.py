"""The US launch commands as a PMS runs them: real `pms-bridge <protocol>` processes, a real daemon.

Each test starts `pms-bridge serve` on the parametrised store (SQLite and PostgreSQL), runs the launch
command a PMS would start, and checks the exit code, the line it printed and the store through the API.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from bridge.exits import ExitCode
from bridge.handlers.dexis import build_integrator_watchers
from bridge.logs import JsonFormatter
from bridge.model import Origin
from bridge.runtime import Runtime
from bridge.store.models import ProcessedFile
from tests.conftest import DaemonProcess, pms_bridge_command

ORIGIN = Origin(protocol="test", actor="pytest")


def run(daemon: DaemonProcess, protocol: str, *args: str, cwd: Path | None = None) -> tuple[int, str]:
    """Run `pms-bridge <protocol> ARGS` as the PMS would; (exit code, everything it printed)."""
    proc = subprocess.run(
        [*pms_bridge_command(), protocol, *args],
        capture_output=True,
        env={**os.environ, "PMS_BRIDGE_CONFIG": str(daemon.config)},
        cwd=cwd,
        timeout=60,
        check=False,
    )
    return proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace").strip()


def patients(daemon: DaemonProcess, **query: str) -> list[dict[str, Any]]:
    status, body = daemon.request("GET", "/api/v1/patients?" + urllib.parse.urlencode(query))
    assert status == 200, body
    items: list[dict[str, Any]] = json.loads(body)["items"]
    return items


def conflicts(daemon: DaemonProcess) -> list[dict[str, Any]]:
    status, body = daemon.request("GET", "/api/v1/conflicts")
    assert status == 200, body
    items: list[dict[str, Any]] = json.loads(body)["items"]
    return items


def wait_for_patients(daemon: DaemonProcess, deadline_s: float = 30, **query: str) -> list[dict[str, Any]]:
    """The patients matching `query` once there are any (a watched folder answers asynchronously)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        found = patients(daemon, **query)
        if found:
            return found
        time.sleep(0.1)
    return []


def crlf(*lines: str, encoding: str = "cp1252") -> bytes:
    return "".join(line + "\r\n" for line in lines).encode(encoding)


def create(daemon: DaemonProcess, **patient: str) -> None:
    """A new patient through the REST API (201), as the PMS's own launches would later find it."""
    status, body = daemon.request(
        "POST", "/api/v1/patients", json.dumps(patient).encode(), headers={"Content-Type": "application/json"}
    )
    assert status == 201, body


def test_dexis_info_file_creates_the_patient_in_cp1252(daemon: DaemonProcess, tmp_path: Path) -> None:
    info = tmp_path / "infofile.txt"
    info.write_bytes(
        crlf("Côté, Zoë  7/14/1985  (01042)", "PN=01042", "LN=Côté", "FN=Zoë", "BD=7/14/1985", "SX=F")
    )
    code, output = run(daemon, "dexis", f"@{info}")
    assert (code, output) == (ExitCode.OK, "pms-bridge dexis: patient 01042 created")
    [patient] = patients(daemon, pms_system="dexis", pms_id="01042")
    assert (patient["last_name"], patient["first_name"], patient["birth_date"], patient["sex"]) == (
        "Côté",
        "Zoë",
        "1985-07-14",
        "F",
    )
    assert info.read_bytes().startswith(b"C\xf4t\xe9")  # no answer file: the PMS's file is left alone


def test_dexis_bad_files_answer_with_a_line_and_the_daemon_keeps_serving(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.txt"
    truncated.write_bytes(crlf("Doe, Jane  7/14/1985  (7)", "PN=7", "LN=Doe")[:-4])
    wrong_locale = tmp_path / "de.txt"
    wrong_locale.write_bytes(
        crlf("Doe, Jane  14.07.1985  (7)", "PN=7", "LN=Doe", "FN=Jane", "BD=14.07.1985", "SX=F")
    )
    assert run(daemon, "dexis", f"@{truncated}") == (
        ExitCode.INVALID,
        "pms-bridge dexis: the file ends in the middle of a line: it is truncated or still being written",
    )
    code, output = run(daemon, "dexis", f"@{wrong_locale}")
    assert (
        code == ExitCode.INVALID
        and "BD '14.07.1985' is not a date in the configured locale's short date" in output
    )
    code, output = run(daemon, "dexis", f"@{tmp_path / 'missing.txt'}")
    assert code == ExitCode.INVALID and "no such file" in output
    assert patients(daemon, pms_id="7") == []
    code, output = run(daemon, "dexis", "SET", "7", "LN=Doe", "FN=Jane", "BD=19850714")
    assert code == ExitCode.OK
    assert daemon.request("GET", "/healthz", token=None)[0] == 200


def test_dexis_started_without_a_patient_is_a_valid_launch(daemon: DaemonProcess) -> None:
    """No patient selected: the PMS starts the program without arguments [C]. Exit 0 and nothing done,
    not an error the front desk sees every time (it was exit 2 "no patient")."""
    for protocol in ("dexis", "dentrix"):
        line = f"pms-bridge {protocol}: started without a patient; nothing to open"
        assert run(daemon, protocol) == (ExitCode.OK, line)
    shim = urllib.request.Request(daemon.url + "/api/v1/launch/dexis", data=b"", method="POST")
    shim.add_header("Authorization", f"Bearer {daemon.token}")
    with urllib.request.urlopen(shim, timeout=30) as response:  # a DDE shim with nothing to send
        assert (response.status, response.headers["X-PMS-Exit"]) == (200, "0")
    assert patients(daemon) == []
    status, metrics = daemon.request("GET", "/metrics", token=None)
    assert status == 200 and b"pms_bridge_events_total{" not in metrics


def test_set_command_on_the_command_line_and_over_loopback_http(daemon: DaemonProcess) -> None:
    code, output = run(daemon, "dexis", "SET", "4711", "LN=García Márquez", "FN=José", "MI=", "BD=19700102")
    assert (code, output) == (ExitCode.OK, "pms-bridge dexis: patient 4711 created")
    # The DDE string as one argument, with its quotes, is the same message.
    assert run(daemon, "dexis", 'SET 4711 LN="García Márquez" FN="José" MI="" BD=19700102')[0] == ExitCode.OK
    # A DDE-to-HTTP shim posts the SET string (cp1252, as the PMS wrote it) to the launch endpoint.
    status, body = daemon.request(
        "POST", "/api/v1/launch/dexis", 'SET 4712 LN="Núñez" FN="Inés" MI="" BD=19991231'.encode("cp1252")
    )
    assert (status, body) == (200, b"")
    [patient] = patients(daemon, pms_system="dexis", pms_id="4712")
    assert (patient["last_name"], patient["first_name"], patient["birth_date"]) == (
        "Núñez",
        "Inés",
        "1999-12-31",
    )
    assert len(patients(daemon, pms_system="dexis")) == 2


def test_dentrix_chart_renumber_follows_the_patient_and_a_reused_chart_is_a_conflict(
    daemon: DaemonProcess,
) -> None:
    assert (
        run(daemon, "dentrix", "SET", "1001", "CN=SMIJO0", "LN=Smith", "FN=John", "BD=19600506")[0]
        == ExitCode.OK
    )
    assert (
        run(daemon, "dentrix", "SET", "1002", "CN=DOEJA0", "LN=Doe", "FN=Jane", "BD=19700101")[0]
        == ExitCode.OK
    )
    # Dentrix renumbers John's chart: the alias follows the immutable patient id.
    code, output = run(daemon, "dentrix", "SET", "1001", "CN=SMIJO1", "LN=Smith", "FN=John", "BD=19600506")
    assert (code, output) == (ExitCode.OK, "pms-bridge dentrix: patient 1001 updated")
    [john] = patients(daemon, pms_system="dentrix", pms_id="1001")
    assert john["chart_number"] == "SMIJO1"
    assert patients(daemon, chart_number="SMIJO0") == []
    assert [p["id"] for p in patients(daemon, chart_number="SMIJO1")] == [john["id"]]
    # Jane's PMS record now claims John's current chart number: recorded, not relinked.
    code, output = run(daemon, "dentrix", "SET", "1002", "CN=SMIJO1", "LN=Doe", "FN=Jane", "BD=19700101")
    assert (
        code == ExitCode.CONFLICT
        and "chart number 'SMIJO1' is already the chart of another patient" in output
    )
    [conflict] = conflicts(daemon)
    assert (conflict["kind"], conflict["pms_id"], conflict["chart_number"]) == (
        "chart-number",
        "1002",
        "SMIJO1",
    )
    assert f"(conflict {conflict['id']})" in output
    [jane] = patients(daemon, pms_system="dentrix", pms_id="1002")
    assert jane["chart_number"] == "DOEJA0"
    assert [p["id"] for p in patients(daemon, chart_number="SMIJO1")] == [john["id"]]


def test_dentrix_keyed_by_chart_number_finds_a_migrated_patient(daemon_factory: Any) -> None:
    daemon = daemon_factory(dentrix={"id_field": "chart_number"})
    create(daemon, pms_system="dexis11", chart_number="SMIJO0", last_name="Smith", first_name="John")
    code, output = run(daemon, "dentrix", 'SET SMIJO0 LN="Smith" FN="John" BD=19600506')
    assert (code, output) == (ExitCode.OK, "pms-bridge dentrix: patient SMIJO0 updated")
    [john] = patients(daemon, chart_number="SMIJO0")
    assert john["birth_date"] == "1960-05-06"


def test_eaglesoft_legacy_numbers_open_one_patient_and_refuse_an_ambiguous_one(
    daemon_factory: Any, tmp_path: Path
) -> None:
    daemon = daemon_factory(eaglesoft={"legacy_id_suffix": 5})
    for number, last in (("1042817", "Alpha"), ("1012345", "Beta"), ("2012345", "Gamma")):
        create(daemon, pms_system="eaglesoft", pms_id=number, last_name=last, first_name="A")

    def ini(number: str, last: str) -> Path:
        path = tmp_path / f"patterson-{number}.ini"
        path.write_bytes(
            crlf(
                "[Patient]",
                "FirstName=A",
                f"LastName={last}",
                "SSN=",
                "Gender= ",
                "Birthdate=1/1/0001",
                f"PatientNumber={number}",
            )
        )
        return path

    assert run(daemon, "eaglesoft", str(ini("42817", "Alpha"))) == (
        ExitCode.OK,
        "pms-bridge eaglesoft: patient 42817 opened",
    )
    code, output = run(daemon, "eaglesoft", str(ini("12345", "Beta")))
    assert code == ExitCode.CONFLICT and "is the end of 2 known numbers (1012345, 2012345)" in output
    assert [(c["kind"], c["pms_id"]) for c in conflicts(daemon)] == [("ambiguous-id-suffix", "12345")]
    assert patients(daemon, pms_system="eaglesoft", pms_id="12345") == []
    assert len(patients(daemon, pms_system="eaglesoft")) == 3


def test_cliniview_argument_and_ini(daemon: DaemonProcess, tmp_path: Path) -> None:
    assert run(daemon, "cliniview", "-0815;MaryAnn;VanDerBerg;123456789;03/02/1975") == (
        ExitCode.OK,
        "pms-bridge cliniview: patient 0815 created",
    )
    # A PMS that left the spaces in: the shell split the argument, the parts are joined again.
    assert run(daemon, "cliniview", "-0816;Mary", "Ann;Van", "Der", "Berg;;01/01/0001")[0] == ExitCode.OK
    [spaced] = patients(daemon, pms_system="cliniview", pms_id="0816")
    assert (spaced["first_name"], spaced["last_name"], spaced["birth_date"]) == (
        "Mary Ann",
        "Van Der Berg",
        None,
    )
    ini = tmp_path / "Cliniview.ini"
    ini.write_bytes(
        crlf("[Patient]", "PatientID=0817", "FirstName=Zoë", "LastName=Côté", "BirthDate=07/14/1985")
    )
    assert run(daemon, "cliniview", str(ini)) == (ExitCode.OK, "pms-bridge cliniview: patient 0817 created")
    [zoe] = patients(daemon, pms_system="cliniview", pms_id="0817")
    assert (zoe["last_name"], zoe["birth_date"], zoe["sex"]) == ("Côté", "1985-07-14", "U")
    _status, body = daemon.request("GET", "/api/v1/audit?limit=500")
    assert b"123456789" not in body and b"123456789" not in daemon.log().encode()


def test_integrator_files_in_the_watched_folder(daemon_factory: Any, tmp_path: Path) -> None:
    folder = tmp_path / "integrator"
    folder.mkdir()  # the PMS's share: the daemon does not create it
    daemon = daemon_factory(dentrix={"integrator_dir": str(folder)})
    deadline = time.monotonic() + 30
    while (ready := daemon.request("GET", "/readyz", token=None))[
        0
    ] != 200 or b"dentrix-integrator" not in ready[1]:
        assert time.monotonic() < deadline, ready  # the watcher starts and scans just after /healthz answers
        time.sleep(0.1)
    tmp = folder / ".Patient_OP3.txt.tmp"
    tmp.write_bytes(crlf("PN=000123456789", "LN=O'Brien", "FN=Siobhán", "MI=M"))
    tmp.replace(folder / "Patient_OP3.txt")
    [patient] = wait_for_patients(daemon, pms_system="dentrix", pms_id="000123456789")
    assert (patient["first_name"], patient["middle_name"], patient["sex"], patient["birth_date"]) == (
        "Siobhán",
        "M",
        "U",
        None,
    )
    (folder / "notes.txt").write_bytes(crlf("PN=99", "LN=Not", "FN=Ours", "MI="))  # not a communication file
    (folder / "Patient_OP4.txt").write_bytes(crlf("PN=000000000042", "LN=Second", "FN=One", "MI=", "SX=F"))
    [second] = wait_for_patients(daemon, pms_system="dentrix", pms_id="000000000042")
    assert second["sex"] == "F"
    assert patients(daemon, pms_id="99") == []
    status, body = daemon.request("GET", f"/api/v1/audit?patient_id={patient['id']}")
    assert status == 200
    assert [e["workstation"] for e in json.loads(body)["items"] if e["action"] == "patient.create"] == ["OP3"]


def test_launch_commands_import_nothing_heavy(tmp_path: Path) -> None:
    """A PMS waits on the launch process: no asyncio, argparse, aiohttp or SQLAlchemy in it."""
    config = tmp_path / "pms-bridge.ini"
    config.write_text("[api]\nport = 9\ntoken = t\n", encoding="utf-8")
    probe = (
        "import sys\n"
        "from bridge.cli import main\n"
        "code = main(['dexis', 'SET', '1', 'LN=A', '--config', sys.argv[1]])\n"
        "heavy = ('asyncio', 'argparse', 'aiohttp', 'sqlalchemy', 'protocols.dexis')\n"
        "print(code, [m for m in heavy if m in sys.modules])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(config)], capture_output=True, check=True, timeout=60
    )
    assert proc.stdout.decode().strip() == f"{int(ExitCode.UNREACHABLE)} []"  # nothing listens on port 9
    assert b"pms-bridge dexis: the pms-bridge service is not reachable" in proc.stderr


async def test_an_integrator_file_still_being_written_is_not_taken_half(
    make_settings: Any, tmp_path: Path
) -> None:
    """A file seen mid-write waits for a stable size; one left cut off is refused; the full one is read."""
    folder = tmp_path / "integrator"
    folder.mkdir()
    rt = Runtime.build(make_settings(dexis={"integrator_dir": str(folder)}))
    try:
        [watcher] = build_integrator_watchers(rt)
        comm = folder / "Patient_OP2.txt"
        comm.write_bytes(crlf("PN=77", "LN=Doe")[:-3])  # the PMS is still writing
        assert await watcher.scan() and await watcher.scan()  # seen twice with the same size: handed over
        assert await rt.service.search_patients(ORIGIN, pms_id="77") == []
        comm.write_bytes(crlf("PN=77", "LN=Doe", "FN=Jane", "MI=", "BD=19850714"))
        assert await watcher.scan()
        assert await rt.service.search_patients(ORIGIN, pms_id="77") == []  # changed since: not yet
        assert await watcher.scan()
        [patient] = await rt.service.search_patients(ORIGIN, pms_id="77")
        assert (patient.first_name, patient.birth_date) == ("Jane", date(1985, 7, 14))

        def results(session: Any) -> list[str]:
            return [r.result for r in session.query(ProcessedFile).order_by(ProcessedFile.id)]

        assert await rt.db.read(results) == ["exit 2", "exit 0"]
    finally:
        await rt.audit.flush()
        rt.close()


async def test_a_link_in_the_integrator_folder_is_not_followed_and_logged_once(
    make_settings: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As the VDDS share: a `Patient_<workstation>.txt` that is a symbolic link is never read (nobody is
    opened from the file it points at) and is logged once, naming it."""
    caplog.set_level(logging.WARNING, logger="bridge.watch")
    folder, outside = tmp_path / "integrator", tmp_path / "elsewhere.txt"
    outside.write_bytes(crlf("PN=88", "LN=Doe", "FN=Jane"))
    folder.mkdir()  # the daemon never creates a watched folder
    rt = Runtime.build(make_settings(dexis={"integrator_dir": str(folder)}))
    try:
        [watcher] = build_integrator_watchers(rt)
        (folder / "Patient_OP5.txt").symlink_to(outside)
        for _ in range(3):
            assert await watcher.scan()
        assert await rt.service.search_patients(ORIGIN, pms_id="88") == []
        [record] = [r for r in caplog.records if r.name == "bridge.watch"]
        assert (record.__dict__["watcher"], record.__dict__["file"]) == (
            "dexis-integrator",
            "Patient_OP5.txt",
        )
    finally:
        rt.close()


def test_an_ini_cut_short_is_refused_and_opens_or_changes_nobody(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """An Eaglesoft ini or Cliniview.ini read while still being written: exit 2, the store untouched."""
    for system, last in (("eaglesoft", "Ten"), ("cliniview", "Ten"), ("eaglesoft", "Other")):
        pms_id = "10" if last == "Ten" else "1042"
        create(daemon, pms_system=system, pms_id=pms_id, last_name=last, first_name="Ann")
    full = crlf(
        "[Patient]", "PatientNumber=1042", "FirstName=Ann", "LastName=Other", "Gender=F", "Birthdate=2/2/1990"
    )
    cuts = {
        "eaglesoft-id.ini": ("eaglesoft", full[:27]),  # "PatientNumber=10"
        "eaglesoft-name.ini": ("eaglesoft", full.replace(b"Ann", b"Zoe")[: full.index(b"Ann") + 2]),
        "eaglesoft-new.ini": ("eaglesoft", full.replace(b"1042", b"2042").replace(b"1990", b"1985")[:-5]),
        "Cliniview.ini": ("cliniview", b"[Patient]\r\nPatientID=10"),
    }
    for name, (protocol, data) in cuts.items():
        (tmp_path / name).write_bytes(data)
        what = "Cliniview.ini" if protocol == "cliniview" else "the ini"
        refused = f"pms-bridge {protocol}: {what} ends in the middle of a line: it is truncated or still"
        assert run(daemon, protocol, str(tmp_path / name)) == (
            ExitCode.INVALID,
            f"{refused} being written",
        ), name
    # Cut at a line end, after the number: no name key, so no nameless patient 3042 either.
    (tmp_path / "line-end.ini").write_bytes(full.replace(b"1042", b"3042").split(b"FirstName")[0])
    assert run(daemon, "eaglesoft", str(tmp_path / "line-end.ini")) == (
        ExitCode.INVALID,
        "pms-bridge eaglesoft: the ini has no LastName key in [Patient]: it is truncated or not the PMS's",
    )
    assert patients(daemon, pms_system="eaglesoft", pms_id="3042") == []
    [other] = patients(daemon, pms_system="eaglesoft", pms_id="1042")
    assert other["first_name"] == "Ann"  # not "Zo"
    assert patients(daemon, pms_system="eaglesoft", pms_id="2042") == []  # not born in 2019
    # The whole file opens the right patient.
    (tmp_path / "whole.ini").write_bytes(full)
    assert run(daemon, "eaglesoft", str(tmp_path / "whole.ini")) == (
        ExitCode.OK,
        "pms-bridge eaglesoft: patient 1042 updated",
    )


def test_a_line_break_like_character_in_an_id_is_refused_not_cut(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """Only CR and LF end a line: an id holding VT, FF or GS (`PN=1042<VT>999`) was cut at it and
    opened patient 1042. Now it stays in the value and is refused (exit 2), and patient 1042 is not
    opened."""
    for system in ("dexis", "eaglesoft", "cliniview"):
        create(daemon, pms_system=system, pms_id="1042", last_name="Other", first_name="Ann")
    files = {
        # Integrator file: PN=1042 <VT> 999
        "Patient_OP1.txt": ("dexis", "PN", crlf("PN=1042\x0b999", "LN=Other", "FN=Ann")),
        # Patterson ini: PatientNumber=1042 <FF> 999
        "patterson.ini": (
            "eaglesoft",
            "PatientNumber",
            crlf("[Patient]", "PatientNumber=1042\x0c999", "FirstName=Ann", "LastName=Other"),
        ),
        # Cliniview.ini: PatientID=1042 <GS> 999
        "Cliniview.ini": (
            "cliniview",
            "PatientID",
            crlf("[Patient]", "PatientID=1042\x1d999", "FirstName=Ann", "LastName=Other"),
        ),
    }
    for name, (protocol, key, data) in files.items():
        (tmp_path / name).write_bytes(data)
        argument = f"@{tmp_path / name}" if protocol == "dexis" else str(tmp_path / name)
        assert run(daemon, protocol, argument) == (
            2,
            f"pms-bridge {protocol}: {key} contains control characters",
        )
    _status, audit = daemon.request("GET", "/api/v1/audit?limit=500")
    assert b"patient.open" not in audit, audit


def test_birth_dates_are_never_in_the_future(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A two-digit year is the latest century not in the future (Birthdate=7/14/45 was stored as 2045);
    a four-digit date after today (and its day of slack) is refused with exit 2 and nothing is stored."""
    ini = tmp_path / "patterson.ini"
    ini.write_bytes(
        crlf("[Patient]", "PatientNumber=4501", "FirstName=Ann", "LastName=Lee", "Birthdate=7/14/45")
    )
    assert run(daemon, "eaglesoft", str(ini)) == (0, "pms-bridge eaglesoft: patient 4501 created")
    [ann] = patients(daemon, pms_system="eaglesoft", pms_id="4501")
    assert ann["birth_date"] == "1945-07-14"
    future = date.today() + timedelta(days=3)  # after the slack even across midnight
    integrator = tmp_path / "Patient_OP2.txt"
    integrator.write_bytes(crlf("PN=4502", "LN=Lee", "FN=Ann", f"BD={future:%Y%m%d}"))
    assert run(daemon, "dexis", f"@{integrator}") == (
        2,
        f"pms-bridge dexis: BD '{future:%Y%m%d}' is in the future",
    )
    us_date = f"{future.month:02d}/{future.day:02d}/{future.year}"
    assert run(daemon, "cliniview", f"-4503;Ann;Lee;;{us_date}") == (
        2,
        f"pms-bridge cliniview: birth date '{us_date}' is in the future",
    )
    assert patients(daemon, pms_id="4502") == [] and patients(daemon, pms_id="4503") == []


def test_set_without_an_id_cut_short_or_without_names_changes_nobody(daemon: DaemonProcess) -> None:
    """A SET the Integrator would not have sent whole: exit 2, and the stored patient keeps its name."""
    assert run(daemon, "dentrix", "SET", "4713", "LN=Smith", "FN=Ann", "BD=19850714")[0] == ExitCode.OK
    refused = {
        (
            "SET",
            "LN=Smith",
            "FN=Ann",
            "BD=19850714",
        ): "the SET command has no patient id: 'LN=Smith' is a key, not an id",
        ('SET 4713 LN="Smit',): "LN has an unbalanced quote: the SET command is truncated",
        ("SET", "4713", 'LN="Smith"', 'FN="An'): "FN has an unbalanced quote: the SET command is truncated",
        ("SET", "4716"): "the SET command has no LN=: it is truncated or not an Integrator SET",
    }
    for args, message in refused.items():
        assert run(daemon, "dentrix", *args) == (ExitCode.INVALID, f"pms-bridge dentrix: {message}"), args
    [patient] = patients(daemon, pms_system="dentrix")
    assert (patient["pms_id"], patient["last_name"], patient["first_name"]) == ("4713", "Smith", "Ann")


def test_set_over_http_is_read_in_the_declared_charset(daemon: DaemonProcess) -> None:
    """A shim that says `charset=utf-8` is read as UTF-8; an unreadable charset is a 415, never a 500."""
    command = 'SET 4712 LN="Núñez" FN="Inés" MI="" BD=19991231'
    status, body = daemon.request(
        "POST",
        "/api/v1/launch/dexis",
        command.encode("utf-8"),
        headers={"Content-Type": "text/plain; charset=utf-8"},
    )
    assert (status, body) == (200, b"")
    [patient] = patients(daemon, pms_system="dexis", pms_id="4712")
    assert (patient["last_name"], patient["first_name"]) == ("Núñez", "Inés")
    for charset in ("no-such-charset", "base64", "idna", "undefined"):
        status, body = daemon.request(
            "POST",
            "/api/v1/launch/dexis",
            command.replace("4712", "4713").encode("utf-8"),
            headers={"Content-Type": f"text/plain; charset={charset}"},
        )
        assert status == 415, (charset, body)
        assert json.loads(body)["detail"] == f"cannot read the body in the declared charset {charset!r}"
    assert patients(daemon, pms_system="dexis", pms_id="4713") == []
    # Without a charset the profile's code page (cp1252) still reads it, as a Windows shim sends it.
    status, _ = daemon.request(
        "POST",
        "/api/v1/launch/dexis",
        command.replace("4712", "4714").encode("cp1252"),
        headers={"Content-Type": "text/plain"},
    )
    assert status == 200
    [cp1252] = patients(daemon, pms_system="dexis", pms_id="4714")
    assert cp1252["last_name"] == "Núñez"


def test_bomless_utf8_files_and_bodies_are_read_as_utf8_and_explicit_code_pages_stay(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """`encoding = auto` (the US profiles' default): a BOM-less UTF-8 file or launch body is UTF-8 ("Côté",
    not "CÃ´tÃ©"), a cp1252 one cp1252 (`test_dexis_info_file_creates_the_patient_in_cp1252`); an
    explicit code page is never second-guessed."""
    folder = tmp_path / "integrator"
    folder.mkdir()  # the daemon never creates a watched folder
    daemon = daemon_factory(dexis={"integrator_dir": str(folder)})
    files = {
        "dexis": (
            "infofile.txt",
            ["Côté, Zoë  7/14/1985  (U1)", "PN=U1", "LN=Côté", "FN=Zoë", "BD=7/14/1985"],
        ),
        "eaglesoft": ("patterson.ini", ["[Patient]", "PatientNumber=U2", "FirstName=Zoë", "LastName=Côté"]),
        "cliniview": ("Cliniview.ini", ["[Patient]", "PatientID=U3", "FirstName=Zoë", "LastName=Côté"]),
    }
    for protocol, (name, lines) in files.items():
        (tmp_path / name).write_bytes(crlf(*lines, encoding="utf-8"))
        argument = f"@{tmp_path / name}" if protocol == "dexis" else str(tmp_path / name)
        assert run(daemon, protocol, argument)[0] == 0, protocol
    (folder / "Patient_OP4.txt").write_bytes(crlf("PN=U4", "LN=Côté", "FN=Zoë", encoding="utf-8"))
    assert wait_for_patients(daemon, pms_system="dexis", pms_id="U4")
    status, _ = daemon.request(  # a shim that declares no charset
        "POST",
        "/api/v1/launch/dexis",
        'SET U5 LN="Núñez" FN="Inés"'.encode(),
        headers={"Content-Type": "text/plain"},
    )
    assert status == 200
    names = {p["pms_id"]: (p["last_name"], p["first_name"]) for p in patients(daemon)}
    assert names == {f"U{n}": ("Côté", "Zoë") for n in range(1, 5)} | {"U5": ("Núñez", "Inés")}
    explicit = daemon_factory(cliniview={"encoding": "cp1252"})  # on the same store
    ini = tmp_path / "explicit.ini"
    ini.write_bytes(crlf("[Patient]", "PatientID=U6", "FirstName=Zoë", "LastName=Côté", encoding="utf-8"))
    assert run(explicit, "cliniview", str(ini))[0] == 0
    [read_as_cp1252] = patients(explicit, pms_system="cliniview", pms_id="U6")
    assert read_as_cp1252["last_name"] == "CÃ´tÃ©"


def test_a_utf16_info_file_without_a_bom_starting_outside_latin1_opens_its_patient(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """A PMS writing UTF-16LE without a BOM: a surname starting with Ł was refused as "truncated"."""
    lines = ("Łukasiewicz, Zoë  7/14/1985  (1043)", "PN=1043", "LN=Łukasiewicz", "FN=Zoë", "BD=7/14/1985")
    info = tmp_path / "infofile.txt"
    info.write_bytes("".join(f"{line}\r\n" for line in lines).encode("utf-16-le"))
    assert run(daemon, "dexis", f"@{info}") == (ExitCode.OK, "pms-bridge dexis: patient 1043 created")
    [patient] = patients(daemon, pms_system="dexis", pms_id="1043")
    assert (patient["last_name"], patient["first_name"], patient["birth_date"]) == (
        "Łukasiewicz",
        "Zoë",
        "1985-07-14",
    )


async def test_integrator_files_leave_no_patient_data_in_the_log_or_the_claims(
    make_settings: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The line a launch answers with quotes the file's id, names and dates; a watched folder's result is
    logged and kept with the file's claim, so it is the exit code alone (docs/operations.md, "Logs")."""
    caplog.set_level(logging.DEBUG)
    folder = tmp_path / "integrator"
    folder.mkdir()
    rt = Runtime.build(make_settings(dexis={"integrator_dir": str(folder)}))
    try:
        [watcher] = build_integrator_watchers(rt)
        comm = folder / "Patient_OP1.txt"
        for birth_date in ("19800231", "19800229"):  # no such date (exit 2), then a good file (exit 0)
            comm.write_bytes(crlf("PN=KX5556", "LN=Zwoelfhaus", "FN=Kunigunde", "MI=", f"BD={birth_date}"))
            assert await watcher.scan() and await watcher.scan()
        [patient] = await rt.service.search_patients(ORIGIN, pms_id="KX5556")
        assert patient.birth_date == date(1980, 2, 29)

        def results(session: Any) -> list[str]:
            return [r.result for r in session.query(ProcessedFile).order_by(ProcessedFile.id)]

        assert await rt.db.read(results) == ["exit 2", "exit 0"]
        logged = "\n".join(JsonFormatter().format(record) for record in caplog.records)
        assert '"result": "exit 2"' in logged and '"result": "exit 0"' in logged
        for value in ("KX5556", "Zwoelfhaus", "Kunigunde", "19800231", "1980"):
            assert value not in logged, logged
    finally:
        await rt.audit.flush()
        rt.close()
