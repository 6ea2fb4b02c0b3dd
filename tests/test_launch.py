"""The launch client a PMS waits on: what it sends, what it writes back, what it imports, when it fails."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from bridge import launch
from bridge.exits import ExitCode
from bridge.handlers import HANDLERS
from bridge.runtime import Runtime
from tests.conftest import DaemonProcess, pms_bridge_command, start_daemon, write_config
from tests.test_vdds import keys, stage1

HEAVY = (
    "asyncio",
    "argparse",
    "aiohttp",
    "sqlalchemy",
    "PIL",
    "numpy",
    "pydicom",
    "lxml",
    "dataclasses",
    "typing",
)


@pytest.fixture
def echo_protocol() -> Any:
    HANDLERS["echo"] = "tests.support.echo_handler:handle"
    yield "echo"
    del HANDLERS["echo"]


async def run_client(runtime: Runtime, port: int, argv: list[str], tmp_path: Path) -> int:
    config = tmp_path / "client.ini"
    config.write_text(f"[api]\nport = {port}\ntoken = {runtime.settings.api.token}\n", encoding="utf-8")
    return await asyncio.to_thread(launch.run, "echo", [*argv, "--config", str(config)])


async def test_the_file_goes_to_the_daemon_and_the_answer_comes_back(
    api_client: Any, runtime: Runtime, echo_protocol: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exchange = tmp_path / "Übergabe 1.tmp"
    exchange.write_bytes(b"[PATIENT]\r\nPATID=0042\r\n")
    code = await run_client(runtime, api_client.port, ["@" + str(exchange), "-x", "ä b"], tmp_path)
    assert code == ExitCode.OK
    answer = json.loads(exchange.read_bytes())
    assert answer["args"] == ["@" + str(exchange), "-x", "ä b"]
    assert answer["filename"] == str(exchange)
    assert answer["content"] == "[PATIENT]\r\nPATID=0042\r\n"
    assert answer["workstation"]
    assert "Grüße: done" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


async def test_the_exit_code_and_message_of_the_handler_are_the_process_result(
    api_client: Any, runtime: Runtime, echo_protocol: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_client(runtime, api_client.port, ["fail"], tmp_path) == ExitCode.NOT_FOUND
    assert "refused" in capsys.readouterr().err


async def test_a_wrong_token_is_a_refusal_not_a_crash(
    api_client: Any, runtime: Runtime, echo_protocol: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "client.ini"
    config.write_text(f"[api]\nport = {api_client.port}\ntoken = wrong\n", encoding="utf-8")
    code = await asyncio.to_thread(launch.run, "echo", ["--config", str(config)])
    assert code == ExitCode.LAUNCH_REFUSED
    assert "missing or wrong bearer token" in capsys.readouterr().err


def test_an_unreachable_daemon_gives_one_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    from tests.support.ports import free_port

    config = tmp_path / "pms-bridge.ini"
    config.write_text(f"[api]\nport = {free_port()}\ntoken = t\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-c", PROBE, "probe", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["code"] == ExitCode.UNREACHABLE
    assert "not reachable" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # the launch path imported nothing heavy: a PMS waits on this process
    assert report["heavy"] == []


def test_a_missing_config_is_reported_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, "probe", "--config", str(tmp_path / "none.ini")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert json.loads(result.stdout.splitlines()[-1])["code"] == ExitCode.UNREACHABLE
    assert "config file not found" in result.stderr


async def test_only_the_file_position_is_read_as_a_file(
    api_client: Any,
    runtime: Runtime,
    echo_protocol: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A flag value naming a file in the working directory is data: the file is neither sent nor written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "4711").write_bytes(b"private")
    (tmp_path / "Roe").write_bytes(b"private too")
    assert await run_client(runtime, api_client.port, ["-p", "4711", "Roe"], tmp_path) == 0
    assert "Grüße: done" in capsys.readouterr().out
    # the echo answer goes into the named file: had either been taken for the message, it would hold it
    assert (tmp_path / "4711").read_bytes() == b"private"
    assert (tmp_path / "Roe").read_bytes() == b"private too"
    assert launch.named_file("opp", ["-p", "4711", "Roe"]) == ("", 0, 0)
    assert launch.named_file("dexis", ["SET", "4711", "Roe"]) == ("", 0, 0)
    assert launch.named_file("dexis", ["@4711"]) == ("4711", 0, 1)
    assert launch.named_file("vdds", ["4711"]) == ("", 0, 0)  # an MMOVIEW id, not the file of that name
    assert launch.named_file("vdds", ["ACQUIRE", "4711"]) == ("", 0, 0)
    (tmp_path / "sp ace").mkdir()
    (tmp_path / "sp ace" / "MME505F.tmp").write_bytes(b"[PATID]")
    assert launch.named_file("vdds", ["sp", "ace/MME505F.tmp"]) == ("sp ace/MME505F.tmp", 0, 2)


def test_the_vdds_file_is_the_path_the_pvs_appends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PVS appends the exchange file's path to the registered command line, arguments and all
    (`NNT.exe -VDDS PATDATIMPORT <file>`, `pms-bridge vdds ACQUIRE <file>`): the file is at the end."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "A2.tmp").write_bytes(b"[PATIENT]")
    # flags typed after the file: the file is found at the start when the end names none
    assert launch.named_file("vdds", ["A2.tmp", "ACQUIRE"]) == ("A2.tmp", 0, 1)
    (tmp_path / "ACQUIRE").write_bytes(b"not the request")  # a registered flag stays a flag
    assert launch.named_file("vdds", ["ACQUIRE", "A2.tmp"]) == ("A2.tmp", 1, 1)
    assert launch.named_file("vdds", ["-VDDS", "PATDATIMPORT", "A2.tmp"]) == ("A2.tmp", 2, 1)
    absolute = str(tmp_path / "A2.tmp")
    assert launch.named_file("vdds", ["ACQUIRE", absolute]) == (absolute, 1, 1)
    # unquoted with spaces, after a registered argument
    (tmp_path / "Temp Files").mkdir()
    spaced = tmp_path / "Temp Files" / "MME1.tmp"
    spaced.write_bytes(b"[PATID]")
    assert launch.named_file("vdds", ["ACQUIRE", *str(spaced).split(" ")]) == (str(spaced), 1, 2)
    # the other protocols keep their file first
    assert launch.named_file("opp", ["A2.tmp", "ACQUIRE"]) == ("A2.tmp", 0, 1)
    assert launch.named_file("opp", ["ACQUIRE", "A2.tmp"]) == ("ACQUIRE", 0, 1)


def test_a_folder_named_by_part_of_a_path_is_not_the_file(tmp_path: Path) -> None:
    """`.../sp x/MME1.tmp` unquoted, with a folder `.../sp` beside `.../sp x`: the file is the join."""
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp x").mkdir()
    request = tmp_path / "sp x" / "MME1.tmp"
    request.write_bytes(b"[PATID]")
    parts = str(request).split(" ")
    for protocol in ("vdds", "opp", "eaglesoft"):
        assert launch.named_file(protocol, parts) == (str(request), 0, 2)
    # a folder alone is still what the launch names, for `run` to refuse
    assert launch.named_file("opp", [str(tmp_path / "sp")]) == (str(tmp_path / "sp"), 0, 1)
    assert launch.named_file("vdds", [str(tmp_path / "sp")]) == (str(tmp_path / "sp"), 0, 1)


def run_launch(
    daemon: DaemonProcess, protocol: str, *args: str | bytes, cwd: Path | None = None, **env: str
) -> tuple[int, str, str]:
    """`pms-bridge PROTOCOL ARGS` as a PMS starts it (bytes: an argument that is not UTF-8):
    (exit code, stdout, stderr), both decoded as UTF-8 unless PYTHONIOENCODING says otherwise."""
    done = subprocess.run(
        [*pms_bridge_command(), protocol, *args],
        env={**os.environ, "PMS_BRIDGE_CONFIG": str(daemon.config), **env},
        cwd=cwd,
        capture_output=True,
        timeout=60,
        check=False,
    )
    encoding = env.get("PYTHONIOENCODING", "utf-8").split(":")[0]
    return done.returncode, done.stdout.decode(encoding), done.stderr.decode(encoding)


def patients(daemon: DaemonProcess, system: str, pms_id: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"pms_system": system, "pms_id": pms_id})
    status, body = daemon.request("GET", "/api/v1/patients?" + query)
    assert status == 200, body
    items: list[dict[str, Any]] = json.loads(body)["items"]
    return items


NOT_UTF8 = ": the PMS must pass its arguments in UTF-8\n"


def test_an_argument_that_is_not_utf8_is_refused_in_one_line(daemon: DaemonProcess) -> None:
    """POSIX arguments are bytes; Latin-1 ones are not sent with guessed letters but refused (exit 2)."""
    code, out, err = run_launch(daemon, "opp", "-p", "C1", "-l", b"M\xfcller")
    assert (code, out, err) == (
        ExitCode.INVALID,
        "",
        "pms-bridge opp: argument 'M\\xfcller' is not UTF-8 text" + NOT_UTF8,
    )
    assert patients(daemon, "OPP", "C1") == []
    code, out, err = run_launch(daemon, "cliniview", b"-3006;Jos\xe9;Smith;;07/14/1985")
    assert (code, out) == (ExitCode.INVALID, "")
    assert (
        err
        == "pms-bridge cliniview: argument '-3006;Jos\\xe9;Smith;;07/14/1985' is not UTF-8 text" + NOT_UTF8
    )
    assert patients(daemon, "cliniview", "3006") == []
    assert run_launch(daemon, "opp", "-p", "C1", "-l", "Müller")[0] == ExitCode.OK  # and the daemon serves on


def test_a_file_path_that_is_not_utf8_is_opened_by_its_bytes(daemon: DaemonProcess, tmp_path: Path) -> None:
    folder = os.fsencode(tmp_path)
    info = folder + b"/x\xe9.txt"
    lines = ("Côté, Zoë  7/14/1985  (01043)", "PN=01043", "LN=Côté", "FN=Zoë", "BD=7/14/1985", "SX=F")
    with open(info, "wb") as fh:
        fh.write("".join(line + "\r\n" for line in lines).encode("cp1252"))
    assert run_launch(daemon, "dexis", b"@" + info) == (
        ExitCode.OK,
        "pms-bridge dexis: patient 01043 created\n",
        "",
    )
    [patient] = patients(daemon, "dexis", "01043")
    assert (patient["last_name"], patient["first_name"]) == ("Côté", "Zoë")

    # VDDS: the answer goes back into the file of that name
    exchange = folder + b"/MM\xe9.tmp"
    with open(exchange, "wb") as fh:
        fh.write(stage1("0920"))
    assert run_launch(daemon, "vdds", exchange)[0] == ExitCode.OK
    with open(exchange, "rb") as fh:
        answer = keys(fh.read(), "PATIENT")
    assert (answer["ERRORLEVEL"], answer["READY"]) == ("0", "1")
    assert len(patients(daemon, "TESTPVS", "0920")) == 1

    # a request that cannot be sent still gets its VDDS answer in the file
    with open(exchange, "wb") as fh:
        fh.write(stage1("0921"))
    code, out, err = run_launch(daemon, "vdds", exchange, b"\xff")
    assert (code, out, err) == (
        ExitCode.INVALID,
        "",
        "pms-bridge vdds: argument '\\xff' is not UTF-8 text" + NOT_UTF8,
    )
    with open(exchange, "rb") as fh:
        answer = keys(fh.read(), "PATIENT")
    assert (answer["ERRORLEVEL"], answer["READY"]) == ("1", "1")
    assert "is not UTF-8 text" in answer["ERRORTEXT"]
    assert patients(daemon, "TESTPVS", "0921") == []


def test_a_line_the_console_cannot_encode_does_not_turn_success_into_failure(daemon: DaemonProcess) -> None:
    """A Windows PMS reading our redirected output in cp1252: the line is escaped, the exit code is true."""
    code, out, err = run_launch(daemon, "opp", "-p", "Ł1", "-l", "Wałęsa", PYTHONIOENCODING="cp1252")
    assert (code, out, err) == (ExitCode.OK, "OPP UPDATE_CREATE: patient \\u01411 created\n", "")
    [patient] = patients(daemon, "OPP", "Ł1")
    assert patient["last_name"] == "Wałęsa"
    code, out, err = run_launch(
        daemon, "opp", "-c", "UPDATE", "-p", "Ł2", "-l", "Wałęsa", PYTHONIOENCODING="cp1252"
    )
    assert (code, out, err) == (ExitCode.ERROR, "", "OPP UPDATE: no patient with id '\\u01412' from OPP\n")
    code, out, err = run_launch(
        daemon, "opp", "-c", "UPDATE", "-p", "Ł1", "-l", "Wałęsa", PYTHONIOENCODING="ascii:strict"
    )
    assert (code, out, err) == (ExitCode.OK, "OPP UPDATE: patient \\u01411 opened\n", "")


def test_a_file_that_cannot_be_read_is_exit_2(daemon: DaemonProcess, tmp_path: Path) -> None:
    """As the docs say: the message itself (2), not a refusal by the daemon (4); nothing reaches it."""
    (tmp_path / "folder").mkdir()
    large = tmp_path / "large.xml"
    large.write_bytes(b"<opp/>" + b" " * launch.MAX_FILE_BYTES)
    assert run_launch(daemon, "opp", str(tmp_path / "folder")) == (
        ExitCode.INVALID,
        "",
        f"pms-bridge opp: cannot read {tmp_path / 'folder'}: it is a directory\n",
    )
    assert run_launch(daemon, "opp", "/proc/self/mem") == (
        ExitCode.INVALID,
        "",
        "pms-bridge opp: cannot read /proc/self/mem: Input/output error\n",
    )
    assert run_launch(daemon, "opp", str(large)) == (
        ExitCode.INVALID,
        "",
        f"pms-bridge opp: {large} is larger than {launch.MAX_FILE_BYTES} bytes\n",
    )
    assert run_launch(daemon, "dexis", "@/dev/null") == (
        ExitCode.INVALID,
        "",
        "pms-bridge dexis: cannot read /dev/null: it is not a regular file\n",
    )
    exchange = tmp_path / "MME505F.tmp"
    exchange.write_bytes(stage1("0930") + b";" * launch.MAX_FILE_BYTES)
    assert run_launch(daemon, "vdds", str(exchange)) == (
        ExitCode.INVALID,
        "",
        f"pms-bridge vdds: {exchange} is larger than {launch.MAX_FILE_BYTES} bytes\n",
    )
    answer = keys(exchange.read_bytes(), "PATIENT")  # the too-large answer, as the watched folder's
    assert (answer["ERRORLEVEL"], answer["READY"], answer["PATID"]) == ("1", "1", "0930")
    assert answer["ERRORTEXT"].startswith("Die Übergabedatei ist zu groß")
    assert patients(daemon, "TESTPVS", "0930") == []
    status, body = daemon.request("GET", "/metrics")
    assert status == 200 and b'protocol="opp"' not in body  # the daemon got no launch at all


def test_a_flag_value_naming_a_file_is_not_read(daemon: DaemonProcess, tmp_path: Path) -> None:
    """`opp -p 4711` with a (large) file named 4711 where the PMS starts us: the patient, not a refusal."""
    (tmp_path / "4711").write_bytes(b"x" * (launch.MAX_FILE_BYTES + 1))
    (tmp_path / "Roe").write_bytes(b"<opp/>")
    code, out, err = run_launch(daemon, "opp", "-p", "4711", "-l", "Roe", cwd=tmp_path)
    assert (code, out, err) == (ExitCode.OK, "OPP UPDATE_CREATE: patient 4711 created\n", "")
    [patient] = patients(daemon, "OPP", "4711")
    assert patient["last_name"] == "Roe"
    assert (tmp_path / "Roe").read_bytes() == b"<opp/>"


PROBE = f"""
import json, sys
from bridge.handlers import HANDLERS
HANDLERS["probe"] = "nowhere:handle"
from bridge.cli import main
code = main(sys.argv[1:])
print(json.dumps({{"code": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def test_launches_are_audited_with_the_token_that_sent_them(daemon: DaemonProcess, tmp_path: Path) -> None:
    """The launch client and a DDE shim send the API token; the audit log says so, as for REST calls."""
    exchange = tmp_path / "s1.ini"
    exchange.write_bytes(stage1("0815"))
    assert run_launch(daemon, "vdds", str(exchange))[0] == ExitCode.OK
    assert (
        run_launch(daemon, "opp", "-p", "77", "-l", "Doe", "-f", "Jane", "-c", "UPDATE_CREATE")[0]
        == ExitCode.OK
    )
    assert run_launch(daemon, "opp", "-p", "77", "-c", "VIEW")[0] == ExitCode.OK
    assert run_launch(daemon, "cliniview", "-0816;Mary;Roe;;01/02/1975")[0] == ExitCode.OK
    status, _ = daemon.request(
        "POST", "/api/v1/launch/dexis", b'SET 4712 LN="Doe" FN="Ann" MI="" BD=19991231'
    )
    assert status == 200
    status, body = daemon.request("GET", "/api/v1/audit?limit=500")
    assert status == 200, body
    token_actor = "token:" + hmac.new(daemon.token.encode(), b"actor", "sha256").hexdigest()[:8]
    launched = [
        e for e in json.loads(body)["items"] if e["protocol"] in ("vdds", "opp", "cliniview", "dexis")
    ]
    assert {(e["action"], e["protocol"]) for e in launched} >= {
        ("patient.create", "vdds"),
        ("patient.create", "opp"),
        ("patient.open", "opp"),
        ("patient.create", "cliniview"),
        ("patient.create", "dexis"),
    }
    assert {e["actor"] for e in launched} == {token_actor}


def tls_daemon(tmp_path: Path, api: dict[str, str]) -> DaemonProcess:
    """A real daemon with `[api] tls = yes` (and `api`'s other keys) serving the self-signed certificate
    `init` would write, `tls/cert.pem` beside its config."""
    from bridge.install import write_self_signed

    home = tmp_path / "home"
    write_self_signed(home / "tls" / "cert.pem", home / "tls" / "key.pem")
    return start_daemon(write_config(home, f"sqlite:///{home / 'bridge.db'}", {"api": {"tls": "yes", **api}}))


def doctor(daemon: DaemonProcess, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*pms_bridge_command(), "doctor", "--config", str(daemon.config)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "certificate",
    [{}, {"tls_cert": "tls/cert.pem", "tls_key": "tls/key.pem"}],
    ids=["default-certificate", "relative-certificate"],
)
def test_launches_reach_a_tls_daemon_from_the_pms_working_folder(
    tmp_path: Path, certificate: dict[str, str]
) -> None:
    """`[api] tls = yes` as README's snippet has it (no tls_cert: the daemon serves its default
    `tls/cert.pem`), or with relative paths (they start at the config's folder): a launch started in the
    PMS's own working folder trusts the certificate the daemon serves, found as the daemon finds it, and
    doctor connects the same way."""
    pms_folder = tmp_path / "pms"
    pms_folder.mkdir()
    exchange = pms_folder / "MME.tmp"
    exchange.write_bytes(stage1("0815"))
    daemon = tls_daemon(tmp_path, certificate)
    try:
        checked = doctor(daemon, pms_folder)
        assert checked.returncode == 0, checked.stdout
        assert "ok   daemon answering: alive and ready" in checked.stdout
        assert run_launch(daemon, "vdds", str(exchange), cwd=pms_folder) == (
            0,
            "PATDATIMPORT: patient 0815 created\n",
            "",
        )
        answer = keys(exchange.read_bytes(), "PATIENT")
        assert (answer["ERRORLEVEL"], answer["READY"]) == ("0", "1")
        assert len(patients(daemon, "TESTPVS", "0815")) == 1
    finally:
        assert daemon.stop() == 0


def test_doctor_fails_when_launches_would_on_a_certificate_the_daemon_does_not_serve(tmp_path: Path) -> None:
    """The certificate files were replaced while the daemon runs (moved away and `init` run again): it
    still serves the old certificate, which launches no longer trust, and doctor says so instead of ok."""
    from bridge.install import write_self_signed

    exchange = tmp_path / "MME.tmp"
    exchange.write_bytes(stage1("0815"))
    daemon = tls_daemon(tmp_path, {})
    try:
        cert = daemon.config.parent / "tls" / "cert.pem"
        write_self_signed(cert, cert.with_name("key.pem"))
        code, out, err = run_launch(daemon, "vdds", str(exchange), cwd=tmp_path)
        assert (code, out) == (ExitCode.UNREACHABLE, "") and "certificate verify failed" in err
        assert keys(exchange.read_bytes(), "PATIENT")["ERRORLEVEL"] == "1"
        checked = doctor(daemon, tmp_path)
        assert checked.returncode == 1
        port = daemon.settings.api.port
        assert (
            f"FAIL daemon answering: the daemon answers at 127.0.0.1:{port} but its certificate {cert} fails"
            in (checked.stdout)
        )
    finally:
        assert daemon.stop() == 0
