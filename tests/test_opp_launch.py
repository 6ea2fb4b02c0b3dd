"""`pms-bridge opp FILE` and `pms-bridge opp -p ...` as a PMS runs them: the real console script against a
real daemon process (SQLite and PostgreSQL), and the samples/opp cases through `pms-bridge replay`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from bridge.exits import ExitCode
from tests.conftest import DaemonProcess
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "opp"
SCRIPT = Path(sys.executable).with_name("pms-bridge")

XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\r\n<opp version="1.3">\r\n'
    '  <command type="{command}" silent="NO"/>\r\n  <software name="Praxis-PMS" version="4.1"/>\r\n'
    '  <patient reference="{reference}" firstName="Jürgen" lastName="O&apos;Brien" birthdate="1985-07-14"'
    ' gender="MALE"/>\r\n</opp>\r\n'
)


def run_opp(config: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PMS_BRIDGE_CONFIG": str(config)}
    return subprocess.run(
        [str(SCRIPT), "opp", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def patients(daemon: DaemonProcess, system: str, pms_id: str) -> list[dict[str, Any]]:
    status, body = daemon.request(
        "GET", "/api/v1/patients?" + urlencode({"pms_system": system, "pms_id": pms_id})
    )
    assert status == 200
    items: list[dict[str, Any]] = json.loads(body)["items"]
    return items


def test_update_of_an_unknown_patient_is_refused(daemon: DaemonProcess, tmp_path: Path) -> None:
    request = tmp_path / "opp.xml"
    request.write_text(XML.format(command="UPDATE", reference="0815"), encoding="utf-8", newline="")
    done = run_opp(daemon.config, str(request))
    assert done.returncode == ExitCode.ERROR
    assert "OPP UPDATE: no patient with id '0815' from Praxis-PMS" in done.stderr
    assert patients(daemon, "Praxis-PMS", "0815") == []
    flags = run_opp(daemon.config, "-c", "UPDATE", "-p", "0815", "-l", "Roe")
    assert (flags.returncode, flags.stderr.strip()) == (
        ExitCode.ERROR,
        "OPP UPDATE: no patient with id '0815' from OPP",
    )
    assert patients(daemon, "OPP", "0815") == []


def test_update_create_twice_gives_one_patient_and_leaves_the_file_alone(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    request = tmp_path / "opp.xml"
    data = XML.format(command="UPDATE_CREATE", reference="000815").encode("utf-8")
    request.write_bytes(data)
    first = run_opp(daemon.config, str(request))
    second = run_opp(daemon.config, str(request))
    assert (first.returncode, first.stdout.strip()) == (
        ExitCode.OK,
        "OPP UPDATE_CREATE: patient 000815 created",
    )
    assert (second.returncode, second.stdout.strip()) == (
        ExitCode.OK,
        "OPP UPDATE_CREATE: patient 000815 opened",
    )
    found = patients(daemon, "Praxis-PMS", "000815")
    assert [(p["last_name"], p["first_name"], p["birth_date"], p["sex"]) for p in found] == [
        ("O'Brien", "Jürgen", "1985-07-14", "M")
    ]
    assert request.read_bytes() == data


def test_a_bad_message_is_exit_2_and_the_daemon_keeps_serving(daemon: DaemonProcess, tmp_path: Path) -> None:
    request = tmp_path / "opp.xml"
    request.write_text('<!DOCTYPE opp [<!ENTITY x SYSTEM "file:///etc/passwd">]><opp/>', encoding="utf-8")
    done = run_opp(daemon.config, str(request))
    assert (
        done.returncode == ExitCode.INVALID and "DTDs and entity declarations are not accepted" in done.stderr
    )
    assert (
        run_opp(daemon.config, "-d", "dd.MM.yy", "-p", "1", "-b", "01.02.03").returncode == ExitCode.INVALID
    )
    assert daemon.request("GET", "/healthz", token=None)[0] == 200
    assert run_opp(daemon.config, "-p", "1", "-l", "Danach").returncode == ExitCode.OK


def test_declared_encodings_a_pms_cannot_mean_are_exit_2_and_a_mislabelled_utf16_is_utf8(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    request = tmp_path / "opp.xml"
    for encoding, reference in (("undefined", "E1"), ("punycode", "E2"), ("utf-7", "+2AA-")):
        text = XML.format(command="UPDATE_CREATE", reference=reference)
        request.write_bytes(text.replace('encoding="UTF-8"', f'encoding="{encoding}"').encode())
        done = run_opp(daemon.config, str(request))
        assert (done.returncode, done.stderr.strip()) == (
            ExitCode.INVALID,
            f"OPP: '{encoding}' is not a text encoding OPP accepts in the XML declaration",
        )
    text = XML.format(command="UPDATE_CREATE", reference="SW1").replace(
        'encoding="UTF-8"', 'encoding="utf-16"'
    )
    for reference, tail in (("SW1", ""), ("SW2", " ")):  # an even and an odd byte count
        request.write_bytes((text.replace("SW1", reference) + tail).encode("utf-8"))
        assert run_opp(daemon.config, str(request)).returncode == ExitCode.OK
        assert [p["first_name"] for p in patients(daemon, "Praxis-PMS", reference)] == ["Jürgen"]


def test_an_unreachable_daemon_is_exit_3_with_a_reason(tmp_path: Path) -> None:
    config = tmp_path / "pms-bridge.ini"
    config.write_text(f"[api]\nport = {free_port()}\ntoken = t\n", encoding="utf-8")
    request = tmp_path / "opp.xml"
    data = XML.format(command="VIEW", reference="1").encode()
    request.write_bytes(data)
    done = run_opp(config, str(request))
    assert done.returncode == ExitCode.UNREACHABLE
    assert "the pms-bridge service is not reachable" in done.stderr
    assert request.read_bytes() == data


def test_the_opp_launch_client_imports_nothing_heavy(tmp_path: Path) -> None:
    """A PMS waits on this process: no asyncio, aiohttp, SQLAlchemy, lxml or the OPP parser in it."""
    config = tmp_path / "pms-bridge.ini"
    config.write_text(f"[api]\nport = {free_port()}\ntoken = t\n", encoding="utf-8")
    probe = (
        "import sys\nfrom bridge.cli import main\ncode = main(['opp', '-p', '1', '-l', 'Roe'])\n"
        "heavy = [m for m in ('asyncio', 'aiohttp', 'sqlalchemy', 'lxml', 'argparse', 'protocols.opp', "
        "'bridge.config') if m in sys.modules]\nprint(code, heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PMS_BRIDGE_CONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.strip() == f"{int(ExitCode.UNREACHABLE)} []"


def test_the_opp_samples_replay_against_a_running_daemon(daemon: DaemonProcess) -> None:
    """One long-running daemon on each store kind takes every case in turn (and keeps serving).

    Fresh-store replays of these samples run in tests/test_replay.py with all the others.
    """
    done = subprocess.run(
        [str(SCRIPT), "replay", str(SAMPLES), "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    with_settings = [p for p in SAMPLES.glob("*/case.json") if "settings" in json.loads(p.read_text("utf-8"))]
    cases = len(list(SAMPLES.glob("*/case.json")))
    summary = f"{cases - len(with_settings)} pass" + (f", {len(with_settings)} n/a" if with_settings else "")
    assert done.stdout.strip().splitlines()[-1] == summary
    assert daemon.request("GET", "/healthz", token=None)[0] == 200
