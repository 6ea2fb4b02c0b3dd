"""`pms-bridge replay`: every sample passes; a broken expectation fails with a readable difference."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.config import settings_from_raw
from bridge.config_file import read_raw
from bridge.handlers.vdds_push import mmi_path
from bridge.replay import write_fresh_config
from tests.conftest import DaemonProcess, pms_bridge_command

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def replay(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*pms_bridge_command(), "replay", *args],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        env=env,
    )


def copy_case(tmp_path: Path, name: str) -> Path:
    """A sample case copied under tmp_path/samples (the replay's SAMPLES_DIR), to be altered."""
    case = tmp_path / "samples" / name
    shutil.copytree(SAMPLES / name, case)
    return case


def table_row(result: subprocess.CompletedProcess[str], case: str) -> str:
    return next(line for line in result.stdout.splitlines() if line.startswith(case + " "))


def test_all_samples_replay() -> None:
    result = replay(str(SAMPLES))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    cases = [line for line in lines[1:-1] if line.strip()]
    assert cases and all("  pass  " in line for line in cases), result.stdout
    assert len(cases) == len(list(SAMPLES.rglob("case.json")))


def test_a_broken_expected_reply_fails_with_a_readable_difference(tmp_path: Path) -> None:
    case = tmp_path / "rest" / "create-patient-leading-zeros"
    shutil.copytree(SAMPLES / "rest" / "create-patient-leading-zeros", case)
    reply = case / "reply.json"
    reply.write_text(reply.read_text(encoding="utf-8").replace('"Groß"', '"Gross"'), encoding="utf-8")
    result = replay(str(tmp_path))
    assert result.returncode == 1
    row = next(
        line for line in result.stdout.splitlines() if line.startswith("rest/create-patient-leading-zeros")
    )
    assert "FAIL" in row and "reply.json" in row
    assert '"Gross"' in row and '"Groß"' in row


def test_a_broken_expected_effect_fails_too(tmp_path: Path) -> None:
    case = tmp_path / "rest" / "conflict-other-birth-date"
    shutil.copytree(SAMPLES / "rest" / "conflict-other-birth-date", case)
    effect = case / "effect.json"
    effect.write_text(
        effect.read_text(encoding="utf-8").replace("1990-01-03", "1990-03-01"), encoding="utf-8"
    )
    result = replay(str(tmp_path))
    assert result.returncode == 1
    assert (
        "effect: patient" in result.stdout
        and "birth_date is '1990-01-03', expected '1990-03-01'" in result.stdout
    )


def test_a_fresh_replay_ignores_the_environment_overrides_of_the_real_daemon(tmp_path: Path) -> None:
    # Overrides meant for the practice's daemon: its store, and its API (the launch commands' target).
    copy_case(tmp_path, "vdds/stage1-new-patient-cp1252")
    real_store = tmp_path / "real" / "bridge.db"
    real_store.parent.mkdir()
    with socket.socket() as real_api:  # a port nobody answers on: the practice's daemon is not running
        real_api.bind(("127.0.0.1", 0))
        env = {
            **os.environ,
            "PMS_BRIDGE__STORE__URL": f"sqlite:///{real_store.as_posix()}",
            "PMS_BRIDGE__API__PORT": str(real_api.getsockname()[1]),
            "PMS_BRIDGE_CONFIG": str(tmp_path / "real" / "pms-bridge.ini"),
        }
        result = replay(str(tmp_path / "samples"), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "  pass  " in table_row(result, "vdds/stage1-new-patient-cp1252")
    assert not real_store.exists()


def test_a_fresh_replay_never_pushes_through_the_machines_vdds_registry(tmp_path: Path) -> None:
    # VDDS push is on by default; the machine's VDDS_MMI.INI would start the practice's real PMS.
    home = tmp_path / "home"
    home.mkdir()
    config = write_fresh_config(home, {})
    settings = settings_from_raw(read_raw(str(config), environ={}), config)
    assert settings.vdds.push
    assert mmi_path(settings).parent == home
    own = write_fresh_config(home, {"vdds": {"mmi_ini": "{HOME}/case/VDDS_MMI.INI"}})
    assert mmi_path(settings_from_raw(read_raw(str(own), environ={}), own)) == home / "case" / "VDDS_MMI.INI"


def test_a_step_name_with_a_path_is_a_bad_case_and_writes_nothing_outside(tmp_path: Path) -> None:
    # The replay's temporary folders go under tmp_path/tmp, so '../..' from them is tmp_path.
    (tmp_path / "tmp").mkdir()
    escapes = {
        "vdds/stage1-new-patient-cp1252": "../../CLI-ESCAPED.ini",
        "vdds/folder-stage1-cp1252": "../../../FOLDER-ESCAPED.ini",
        "vdds/stage1-update-existing": str(tmp_path / "ABSOLUTE-ESCAPED.ini"),
    }
    for name, escape in escapes.items():
        case = copy_case(tmp_path, name)
        spec = json.loads((case / "case.json").read_text(encoding="utf-8"))
        spec["steps"][0]["name"] = escape
        (case / "case.json").write_text(json.dumps(spec), encoding="utf-8")
    result = replay(str(tmp_path / "samples"), env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    assert result.returncode == 1, result.stdout + result.stderr
    for name in escapes:
        row = table_row(result, name)
        assert "ERROR" in row and "not a plain file name" in row, result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples", "tmp"]


def test_update_never_writes_an_expected_answer_outside_the_case_folder(tmp_path: Path) -> None:
    case = copy_case(tmp_path, "vdds/stage1-new-patient-cp1252")
    spec = json.loads((case / "case.json").read_text(encoding="utf-8"))
    spec["steps"][0]["expect"]["file"] = "../../../UPDATED-OUTSIDE.ini"  # tmp_path/UPDATED-OUTSIDE.ini
    (case / "case.json").write_text(json.dumps(spec), encoding="utf-8")
    result = replay(str(tmp_path / "samples"), "--update")
    assert result.returncode == 1, result.stdout + result.stderr
    row = table_row(result, "vdds/stage1-new-patient-cp1252")
    assert "ERROR" in row and "outside the case folder" in row
    assert not (tmp_path / "UPDATED-OUTSIDE.ini").exists()


def test_a_malformed_case_json_is_an_error_row_and_the_other_cases_still_run(tmp_path: Path) -> None:
    broken = copy_case(tmp_path, "vdds/stage1-new-patient-cp1252")
    (broken / "case.json").write_text((broken / "case.json").read_text(encoding="utf-8") + "}\n")
    copy_case(tmp_path, "vdds/stage1-no-birth-date")
    result = replay(str(tmp_path / "samples"))
    assert result.returncode == 1, result.stdout + result.stderr
    row = table_row(result, "vdds/stage1-new-patient-cp1252")
    assert "ERROR" in row and "case.json" in row
    assert "  pass  " in table_row(result, "vdds/stage1-no-birth-date")
    assert "Traceback" not in result.stderr


@pytest.fixture
def listener() -> Iterator[tuple[int, list[str]]]:
    """A plain HTTP server on a loopback port that records every request it gets (line and headers)."""
    received: list[str] = []

    class Record(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            received.append(f"{self.requestline}\n{self.headers}")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Record)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()
        server.server_close()


def write_case(root: Path, name: str, steps: list[dict[str, object]], files: dict[str, bytes]) -> None:
    case = root / name
    case.mkdir(parents=True)
    (case / "case.json").write_text(json.dumps({"steps": steps}), encoding="utf-8")
    for file_name, data in files.items():
        (case / file_name).write_bytes(data)


def test_a_case_cannot_send_the_daemons_token_to_another_host(
    daemon: DaemonProcess, tmp_path: Path, listener: tuple[int, list[str]]
) -> None:
    # A case is someone else's capture; its requests go out with the daemon's token, so each must stay on
    # the daemon: "@host:port/x" pasted onto "http://127.0.0.1:4435" named the host as a user name before.
    port, received = listener
    samples = tmp_path / "samples"
    http_step: dict[str, object] = {"transport": "http", "request": "request.http", "expect": {"status": 200}}
    elsewhere = {
        "oppweb/userinfo": f"GET @127.0.0.1:{port}/loot HTTP/1.1\r\nX-Note: {{token}}\r\n\r\n",
        "rest/userinfo": f"GET @127.0.0.1:{port}/loot HTTP/1.1\r\nX-Note: {{token}}\r\n\r\n",
        "rest/scheme-relative": f"GET //127.0.0.1:{port}/loot HTTP/1.1\r\n\r\n",
        "rest/absolute": f"GET http://127.0.0.1:{port}/loot HTTP/1.1\r\n\r\n",
    }
    for name, request in elsewhere.items():
        step = {**http_step, "listener": "opp_web" if name.startswith("oppweb/") else "api"}
        write_case(samples, name, [step], {"request.http": request.encode()})
    write_case(samples, "rest/api-step", [{"transport": "api", "path": f"@127.0.0.1:{port}/loot"}], {})
    write_case(samples, "rest/given", [], {})  # a given step is sent with the token as well
    given = json.loads((samples / "rest/given/case.json").read_text(encoding="utf-8"))
    given["given"] = [{"transport": "api", "path": f"//127.0.0.1:{port}/loot"}]
    (samples / "rest/given/case.json").write_text(json.dumps(given), encoding="utf-8")
    write_case(samples, "rest/healthz", [http_step], {"request.http": b"GET /healthz HTTP/1.1\r\n\r\n"})

    result = replay(str(samples), "--config", str(daemon.config))
    assert result.returncode == 1, result.stdout + result.stderr
    for name in [*elsewhere, "rest/api-step", "rest/given"]:
        row = table_row(result, name)
        assert "ERROR" in row and "/loot" in row, result.stdout
    assert "  pass  " in table_row(result, "rest/healthz")  # a path on the daemon still runs
    assert received == []
    assert daemon.token not in result.stdout


def test_a_fresh_target_gets_two_different_ports_that_can_be_bound(tmp_path: Path) -> None:
    """The fresh daemon's API and OPP web ports are chosen together, never the same port twice (chosen one
    after the other, the kernel may hand the first one out again: CI once saw the fresh CLINIVIEW target fail
    with "[opp_web] ... already in use"). A guard over many configs, each port then bound for real."""
    for round_ in range(40):
        home = tmp_path / f"h{round_}"
        home.mkdir()
        config = write_fresh_config(home, {})
        settings = settings_from_raw(read_raw(str(config), environ={}), config)
        ports = (settings.api.port, settings.opp_web.port)
        assert ports[0] != ports[1]
        with socket.socket() as api, socket.socket() as opp_web:
            api.bind(("127.0.0.1", ports[0]))
            opp_web.bind(("127.0.0.1", ports[1]))
