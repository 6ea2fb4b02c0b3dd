"""The real `pms-bridge` processes: init + serve from nothing, concurrency, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bridge.config import load_settings
from bridge.daemon import Daemon
from bridge.exits import ExitCode
from bridge.store.files import FileStore
from tests.conftest import DaemonProcess, pms_bridge_command, start_daemon, write_config
from tests.support.commands import one_line, pms_bridge, store_commands
from tests.support.dicomfiles import dental_dataset, write
from tests.support.ports import free_port
from tests.support.processes import alive, children


def test_readme_first_command_gives_a_daemon_that_answers(tmp_path: Path) -> None:
    home = tmp_path / "practice"
    init = subprocess.run(
        [*pms_bridge_command(), "init", "--home", str(home)], capture_output=True, text=True
    )
    assert init.returncode == 0, init.stderr
    config = home / "pms-bridge.ini"
    text = config.read_text(encoding="utf-8")
    port = free_port()
    config.write_text(
        text.replace("port = 4429", f"port = {port}").replace("port = 4435", f"port = {free_port()}")
    )
    daemon = start_daemon(config)
    try:
        assert daemon.request("GET", "/healthz", token=None)[0] == 200
        assert daemon.request("GET", "/api/v1/patients", token=None)[0] == 401
        status, body = daemon.request("GET", "/api/v1/patients")
        assert status == 200 and json.loads(body) == {"items": [], "next": None}
        assert daemon.settings.api.host == "127.0.0.1" and daemon.settings.opp_web.host == "127.0.0.1"
    finally:
        assert daemon.stop() == 0


def post_patient(daemon: DaemonProcess, pms_id: str, **fields: Any) -> tuple[int, bytes]:
    body = {"pms_system": "desk", "pms_id": pms_id, "last_name": "Nguyễn", "first_name": "An", **fields}
    return daemon.request(
        "POST", "/api/v1/patients", json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )


def test_fifty_concurrent_requests_for_one_new_patient_create_one(daemon: DaemonProcess) -> None:
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda _i: post_patient(daemon, "NEW-0001"), range(50)))
    statuses = sorted(status for status, _ in results)
    assert statuses.count(201) == 1 and statuses.count(200) == 49
    assert len({json.loads(body)["id"] for _, body in results}) == 1
    status, body = daemon.request("GET", "/api/v1/patients?pms_id=NEW-0001")
    assert status == 200 and len(json.loads(body)["items"]) == 1


def test_sigterm_under_load_lets_in_flight_requests_finish(daemon: DaemonProcess) -> None:
    outcomes: list[str] = []
    lock = threading.Lock()
    stop_sent = threading.Event()

    def client(n: int) -> None:
        while not stop_sent.is_set() or n % 2 == 0:
            try:
                status, _ = post_patient(daemon, f"LOAD-{n}-{time.monotonic_ns()}")
                result = str(status)
            except urllib.error.URLError as exc:
                reason = exc.reason
                result = "refused" if isinstance(reason, ConnectionRefusedError) else f"broken:{reason!r}"
            except (ConnectionResetError, ConnectionAbortedError, OSError) as exc:
                result = f"broken:{exc!r}"
            with lock:
                outcomes.append(result)
            if result == "refused" or stop_sent.is_set():
                return

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    daemon.proc.send_signal(signal.SIGTERM)
    stop_sent.set()
    for thread in threads:
        thread.join(60)
    code = daemon.proc.wait(60)
    assert code == 0, daemon.log()[-2000:]
    assert outcomes.count("201") > 20
    # Connections still in the kernel's accept queue when the listener closes are reset (TCP has no way to
    # refuse them politely); no request the daemon accepted may fail or go unanswered.
    assert [o for o in outcomes if o != "201" and o != "refused" and not o.startswith("broken:")] == []
    assert '"msg": "stopped"' in daemon.log()
    # nothing half-written: every stored patient is complete and linked
    restarted = start_daemon(daemon.config)
    try:
        status, body = restarted.request("GET", "/api/v1/patients?limit=500")
        patients = json.loads(body)["items"]
        # every answered request is stored, and nothing was stored without its answer reaching the client
        assert status == 200 and len(patients) == outcomes.count("201")
        assert all(p["pms_id"].startswith("LOAD-") and p["last_name"] == "Nguyễn" for p in patients)
    finally:
        assert restarted.stop() == 0


def test_an_open_event_stream_does_not_hold_the_shutdown(daemon_factory: Any) -> None:
    """A viewer following /api/v1/events must not keep the daemon from stopping: its stream ends, and
    the daemon stops long before `shutdown_timeout` (the time a service wrapper may give it)."""
    daemon = daemon_factory(daemon={"shutdown_timeout": 300})
    stream = http.client.HTTPConnection("127.0.0.1", daemon.settings.api.port, timeout=120)
    stream.request("GET", "/api/v1/events", headers={"Authorization": f"Bearer {daemon.token}"})
    response = stream.getresponse()
    assert response.status == 200 and response.readline() == b": connected\n"
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(150) == 0  # without the stream's end: 300 s, then a timeout here
    assert response.read() == b"\n"  # the rest of the "connected" comment, then the end of the stream
    stream.close()


def test_the_stop_file_stops_the_daemon_cleanly(daemon: DaemonProcess) -> None:
    daemon.settings.daemon.stop_file.write_text("", encoding="utf-8")
    assert daemon.proc.wait(30) == 0
    assert not daemon.settings.daemon.stop_file.exists()


def test_sigusr1_writes_every_threads_stack_and_the_daemon_serves_on(daemon: DaemonProcess) -> None:
    """An admin whose daemon no longer answers has no debugger on the practice's server: `kill -USR1`
    writes what each thread is doing to stderr (the service manager's log), and changes nothing else."""
    daemon.wait_for_records("imaging workers started", 60)
    daemon.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while "Current thread" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        time.sleep(0.05)
    time.sleep(0.5)  # the rest of the dump
    dump = daemon.log()[daemon.log().index("Current thread") :]
    assert "in run_forever" in dump and "bridge/cli.py" in dump  # the event loop's thread, where it waits
    assert daemon.request("GET", "/healthz", token=None)[0] == 200
    assert daemon.stop() == 0
    assert '"msg": "stopped"' in daemon.log()


def test_a_stop_that_cannot_end_writes_every_threads_stack_and_exits_after_its_deadline(
    tmp_path: Path, pg_server: str
) -> None:
    """A stop waiting on something that never ends (here the final audit flush, on a PostgreSQL table
    another session has locked; a share that hangs is the same) kept the daemon running for good, and its
    service manager killing it left no trace of why. After twice `shutdown_timeout` and a margin
    (bridge.stack_dumps) it writes every thread's stack and exits 1; the store is served again once the
    lock is gone, with nothing it had stored lost."""
    import sqlalchemy

    from bridge.stack_dumps import EXIT_AFTER_DEADLINE, stop_deadline
    from tests.conftest import new_pg_database

    url = new_pg_database(pg_server)
    config = write_config(tmp_path / "home", url, {"daemon": {"shutdown_timeout": 1}})
    daemon = start_daemon(config)
    status, body = post_patient(daemon, "KEPT")
    assert status == 201
    engine = sqlalchemy.create_engine(url)
    locker = engine.connect()
    try:
        locker.execute(sqlalchemy.text("LOCK TABLE audit_log IN ACCESS EXCLUSIVE MODE"))  # held until closed
        read = f"/api/v1/patients/{json.loads(body)['id']}/images"
        assert daemon.request("GET", read)[0] == 200  # a read the audit log queues: its flush will wait
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(stop_deadline(1) + 30) == EXIT_AFTER_DEADLINE
    finally:
        locker.close()
        engine.dispose()
    log = daemon.log()
    assert '"msg": "stopping"' in log and '"msg": "stopped"' not in log
    dump = log[log.index("Thread 0x") :]
    assert "bridge/audit.py" in dump  # the flush it waited on, named
    restarted = start_daemon(config)
    try:
        status, body = restarted.request("GET", "/api/v1/patients")
        assert status == 200 and [p["pms_id"] for p in json.loads(body)["items"]] == ["KEPT"]
    finally:
        assert restarted.stop() == 0


def test_a_store_server_that_stops_answering_makes_readyz_say_so_and_the_daemon_serves_on(
    tmp_path: Path, pg_server: str
) -> None:
    """/readyz gives each check 5 s. A PostgreSQL server that stopped answering (hung, or a network that
    drops its packets) timed the store check out, and the TimeoutError, which has no text, then broke the
    check's report: a 500 without JSON instead of "not ready". It is now a 503 saying the store did not
    answer, /healthz still answers, and /readyz is ready again once the server answers."""
    from sqlalchemy.engine import make_url

    from tests.conftest import new_pg_database
    from tests.support.tcp_proxy import stalling_proxy

    url = make_url(new_pg_database(pg_server))
    assert url.host is not None and url.port is not None
    with stalling_proxy((url.host, url.port)) as proxy:
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        daemon = start_daemon(write_config(tmp_path / "home", proxied))
        try:
            assert daemon.request("GET", "/readyz", token=None)[0] == 200
            proxy.stall()
            status, body = daemon.request("GET", "/readyz", token=None)
            assert status == 503, body
            assert json.loads(body)["checks"]["store"] == {"ok": False, "error": "no answer within 5 s"}
            assert daemon.request("GET", "/healthz", token=None)[0] == 200
            proxy.flow()
            assert daemon.request("GET", "/readyz", token=None)[0] == 200
        finally:
            proxy.flow()
            assert daemon.stop() == 0


def test_a_bad_config_stops_start_up_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "pms-bridge.ini"
    config.write_text("[pms]\nsingle_patient_mode = perhaps\n", encoding="utf-8")
    result = subprocess.run(
        [*pms_bridge_command(), "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "[pms] single_patient_mode = 'perhaps'" in result.stderr and "yes or no" in result.stderr


def test_doctor_exits_2_with_one_line_when_the_config_cannot_be_loaded(tmp_path: Path) -> None:
    """As docs/operations.md says: 2 (no check could run), not the 1 of a failed check."""
    bad = tmp_path / "pms-bridge.ini"
    bad.write_text("[pms]\nsingle_patient_mode = perhaps\n", encoding="utf-8")
    for config, reason in ((bad, "single_patient_mode = 'perhaps'"), (tmp_path / "none.ini", "not found")):
        result = subprocess.run(
            [*pms_bridge_command(), "doctor", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stdout
        [line] = result.stdout.splitlines()
        assert line.startswith(f"FAIL config: {config}: ") and reason in line


def test_doctor_checks_a_running_daemon(daemon: DaemonProcess) -> None:
    result = subprocess.run(
        [*pms_bridge_command(), "doctor", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stdout
    assert "FAIL" not in result.stdout and "ok   daemon answering: alive and ready" in result.stdout
    assert (
        "WARN" not in result.stdout
        and "ok   listen addresses: [api] 127.0.0.1, [opp_web] 127.0.0.1" in result.stdout
    )
    assert "listener open to the network" not in daemon.log()
    assert f"ok   image folder writable: {daemon.settings.store.images} (" in result.stdout
    assert " GB free)" in result.stdout
    daemon.stop()
    stopped = subprocess.run(
        [*pms_bridge_command(), "doctor", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stopped.returncode == 1 and "FAIL daemon answering" in stopped.stdout


def test_doctor_fails_an_image_folder_low_on_space(tmp_path: Path) -> None:
    from tests.conftest import write_config

    config = write_config(
        tmp_path / "home", f"sqlite:///{tmp_path / 'bridge.db'}", {"store": {"min_free_mb": 10**9}}
    )
    (tmp_path / "home" / "images").mkdir()
    result = subprocess.run(
        [*pms_bridge_command(), "doctor", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("FAIL image folder writable:")]
    assert "MB free (under [store] min_free_mb = 1000000000)" in line and "refused (507)" in line


def test_start_up_removes_what_a_crashed_import_left(tmp_path: Path, store_url: str) -> None:
    config = write_config(tmp_path / "home", store_url)
    images = load_settings(str(config)).store.images
    FileStore(images).create_root()
    staged = FileStore(images).staging_path()
    staged.write_bytes(b"half an import")
    past = time.time() - 2 * 86400
    os.utime(staged, (past, past))
    daemon = start_daemon(config)
    try:
        assert [r["count"] for r in daemon.wait_for_records("import leftovers removed")] == [1]
        assert not staged.exists()
    finally:
        daemon.stop()


def test_doctor_fails_a_missing_image_folder_and_does_not_create_it(tmp_path: Path) -> None:
    config = write_config(tmp_path / "home", f"sqlite:///{tmp_path / 'bridge.db'}")
    images = load_settings(str(config)).store.images
    result = subprocess.run(
        [*pms_bridge_command(), "doctor", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("FAIL image folder writable:")]
    assert line.startswith(
        f"FAIL image folder writable: the image folder {images} does not exist: is the share mounted?"
    )
    assert not images.exists()


def test_doctor_checks_the_dicom_import_folders(tmp_path: Path) -> None:
    media, missing = tmp_path / "media", tmp_path / "cd-not-inserted"
    media.mkdir()
    config = write_config(
        tmp_path / "home",
        f"sqlite:///{tmp_path / 'bridge.db'}",
        {"dicom": {"import_folders": f"{media}; {missing}"}},
    )
    result = subprocess.run(
        [*pms_bridge_command(), "doctor", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    (line,) = [line for line in result.stdout.splitlines() if "DICOM import folders readable" in line]
    assert line == (
        f"FAIL DICOM import folders readable: [dicom] import_folders: {missing} is not a folder here: is the"
        " share mounted? (mount it, or take it off the list)"
    )
    assert result.returncode == 1 and not missing.exists()
    missing.mkdir()
    result = subprocess.run(
        [*pms_bridge_command(), "doctor", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert f"ok   DICOM import folders readable: {media}; {missing}" in result.stdout.splitlines()


def serve_once(config: Path) -> subprocess.CompletedProcess[str]:
    """`pms-bridge serve` expected to stop at start-up."""
    return subprocess.run(
        [*pms_bridge_command(), "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )


def test_a_missing_or_corrupt_certificate_stops_start_up_with_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n", encoding="utf-8")
    for cert, expected in (
        ("/nonexist.pem", "[api] tls_cert = /nonexist.pem: no such file: run 'pms-bridge init'"),
        (str(garbage), f"[api] tls_cert = {garbage}, [api] tls_key = {garbage}: not a PEM certificate"),
    ):
        tls = {"api": {"tls": "yes", "tls_cert": cert, "tls_key": str(garbage)}}
        config = write_config(tmp_path / "home", f"sqlite:///{tmp_path / 'bridge.db'}", tls)
        result = serve_once(config)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"pms-bridge serve: {expected}")
        doctor = subprocess.run(
            [*pms_bridge_command(), "doctor", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert doctor.returncode == 1 and f"FAIL TLS certificate: {expected}" in doctor.stdout


def test_a_port_in_use_stops_start_up_with_one_line_naming_the_listener(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path / "home", f"sqlite:///{tmp_path / 'bridge.db'}", {"opp_web": {"port": port}}
        )
        result = serve_once(config)
    # the [api] listener bound first and logged it; then one line, no traceback
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"pms-bridge serve: [opp_web] host:port = 127.0.0.1:{port} is already in use (maybe by another"
    )


def test_an_unreachable_store_stops_start_up_with_one_line_and_doctor_says_why(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nodir' / 'x.db'}"
    config = write_config(tmp_path / "home", url)
    result = serve_once(config)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        f"pms-bridge serve: [store] url = {url}: the store cannot be reached (unable to open database file)"
    )
    doctor = subprocess.run(
        [*pms_bridge_command(), "doctor", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    (line,) = [line for line in doctor.stdout.splitlines() if "store reachable" in line]
    assert line.startswith(f"FAIL store reachable and up to date: [store] url = {url}: the store cannot be")
    assert "sqlalche.me" not in doctor.stdout


def test_an_unreachable_server_store_is_named_without_its_password(tmp_path: Path) -> None:
    config = write_config(tmp_path / "home", f"postgresql+psycopg://bob:s3cret@127.0.0.1:{free_port()}/x")
    result = serve_once(config)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "[store] url = postgresql+psycopg://bob:***@127.0.0.1:" in result.stderr
    assert "s3cret" not in result.stderr


def test_a_stop_file_left_behind_does_not_stop_the_next_start(tmp_path: Path, store_url: str) -> None:
    config = write_config(tmp_path / "home", store_url)
    stop_file = load_settings(str(config)).daemon.stop_file
    stop_file.write_text("", encoding="utf-8")
    daemon = start_daemon(config)
    try:
        time.sleep(1.5)  # three polls of the stop-file watch
        assert daemon.proc.poll() is None and daemon.request("GET", "/healthz", token=None)[0] == 200
        assert not stop_file.exists()
        records = daemon.records()
        assert [r["path"] for r in records if r.get("msg") == "stale stop file removed at start"] == [
            str(stop_file)
        ]
    finally:
        assert daemon.stop() == 0


async def test_doctor_names_a_certificate_that_does_not_cover_the_api_address(
    make_settings: Any, tmp_path: Path
) -> None:
    """[api] host is an address the certificate lacks (here 127.0.0.2): the daemon answers, and doctor
    says the certificate is the problem, not that the daemon is not running."""
    from bridge.doctor import CheckFailed, check_daemon
    from bridge.install import write_self_signed

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed(cert, key)
    tls = {"host": "127.0.0.2", "port": free_port(), "tls": "yes", "tls_cert": cert, "tls_key": key}
    settings = make_settings(api=tls)
    daemon = Daemon(settings)
    await daemon.start()
    try:
        with pytest.raises(CheckFailed) as caught:
            await asyncio.to_thread(check_daemon, settings)
    finally:
        await daemon.shutdown()
    message = str(caught.value)
    assert message.startswith(f"the daemon answers at 127.0.0.2:{tls['port']} but its certificate {cert}")
    assert "does not cover that address" in message and "'pms-bridge init --home' again" in message


async def test_init_writes_a_certificate_covering_the_configured_api_address(tmp_path: Path) -> None:
    from bridge.doctor import check_daemon
    from bridge.install import init_home

    home = tmp_path / "home"
    home.mkdir()
    (home / "pms-bridge.ini").write_text(
        f"[api]\nhost = 127.0.0.2\nport = {free_port()}\ntls = yes\ntoken = t\n"
        f"[opp_web]\nport = {free_port()}\n",
        encoding="utf-8",
    )
    settings, done = await asyncio.to_thread(init_home, home)
    assert f"wrote a self-signed certificate {home / 'tls' / 'cert.pem'}" in done
    daemon = Daemon(settings)
    await daemon.start()
    try:
        assert await asyncio.to_thread(check_daemon, settings) == "alive and ready"
    finally:
        await daemon.shutdown()


def raw_request(port: int, data: bytes) -> bytes:
    """Send `data` as it is (no client library would send a malformed request) and read the answer."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_malformed_request_line_keeps_its_names_out_of_the_log(daemon: DaemonProcess) -> None:
    # Browser-based PMSs build OPP web queries by hand; one that does not percent-encode its names sends
    # a request line aiohttp refuses, and its log line used to quote that line: the names went into the log.
    query = "/opp?command=VIEW&reference=77&lastName=Zwölfhaus&firstName=Kunigunde"
    bad_lines = [
        f"GET {query} HTTP/1.1".encode(),  # unencoded UTF-8
        f"GET {query} HTTP/1.1".encode("latin-1"),  # unencoded Latin-1
        b"GET /opp?command=VIEW&lastName=Zwolf haus&firstName=Kunigunde HTTP/1.1",  # a space
        b"GET /opp?command=VIEW&lastName=Zwolf\thaus&firstName=Kunigunde HTTP/1.1",  # a tab
        b"GET /opp?lastName=Zwolfhaus&firstName=Kunigunde&pad=" + b"x" * 9000 + b" HTTP/1.1",  # > 8190
    ]
    ports = (daemon.settings.api.port, daemon.settings.opp_web.port)
    for port in ports:
        for line in bad_lines:
            answer = raw_request(port, line + b"\r\nHost: 127.0.0.1\r\n\r\n")
            assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), answer[:200]
    deadline = time.monotonic() + 30
    while daemon.log().count("malformed HTTP request refused") < len(ports) * len(bad_lines):
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        time.sleep(0.1)
    log = daemon.log()
    for leaked in ("Kunigunde", "haus", "lastName", "xxxxxxxx", "Traceback"):
        assert leaked not in log, log[-3000:]
    refused = [r for r in daemon.records() if r["msg"] == "malformed HTTP request refused"]
    assert {(r["level"], r["client"]) for r in refused} == {("warning", "127.0.0.1")}
    assert {r["error"] for r in refused} >= {"InvalidURLError", "BadStatusLine", "LineTooLong"}


def test_a_token_that_is_not_utf8_is_a_wrong_token(daemon_factory: Any) -> None:
    daemon = daemon_factory(opp_web={"token": "opp-secret"})
    for port, path in (
        (daemon.settings.api.port, "/api/v1/patients"),
        (daemon.settings.opp_web.port, "/opp"),
    ):
        for token in (b"\xff\xfe", b"M\xfcller", daemon.token.encode() + b"\xe9"):
            request = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            answer = raw_request(port, request + b"Authorization: Bearer " + token + b"\r\n\r\n")
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 401"), answer[:300]
            assert b"application/problem+json" in head
            assert json.loads(body)["detail"].startswith("missing or wrong bearer token")
    assert "UnicodeEncodeError" not in daemon.log()


def test_listeners_open_to_the_network_are_warned_about_at_start_and_by_doctor(tmp_path: Path) -> None:
    # The API beyond loopback without TLS, OPP web beyond loopback without a token: both work (a practice
    # may mean it), so start-up logs a warning and doctor says WARN without failing the checklist.
    listen_all = "0.0.0.0"  # noqa: S104 - what the test is about; random ports, a random token, seconds
    config = write_config(
        tmp_path / "home",
        f"sqlite:///{tmp_path / 'bridge.db'}",
        {"api": {"host": listen_all}, "opp_web": {"host": listen_all}},
    )
    daemon = start_daemon(config)
    try:
        doctor = subprocess.run(
            [*pms_bridge_command(), "doctor", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        assert daemon.stop() == 0
    records = daemon.records()
    warned = [r["warning"] for r in records if r["msg"] == "listener open to the network"]
    assert [r["level"] for r in records if r["msg"] == "listener open to the network"] == ["warning"] * 2
    assert warned[0].startswith("[api] host = 0.0.0.0 listens beyond loopback without TLS")
    assert warned[1].startswith("[opp_web] host = 0.0.0.0 listens beyond loopback without a token")
    assert doctor.returncode == 0, doctor.stdout
    (line,) = [line for line in doctor.stdout.splitlines() if line.startswith("WARN ")]
    assert line == f"WARN listen addresses: {warned[0]}; {warned[1]}"
    assert "FAIL" not in doctor.stdout


def test_a_new_sqlite_store_is_readable_by_the_daemons_user_only(tmp_path: Path) -> None:
    # SQLite made the database (patient data) with the umask, 0644 under 022: every local account read it.
    def usual_umask() -> None:
        os.umask(0o022)

    home = tmp_path / "practice"
    init = subprocess.run(
        [*pms_bridge_command(), "init", "--home", str(home)], capture_output=True, preexec_fn=usual_umask
    )
    assert init.returncode == 0, init.stderr
    assert (home / "bridge.db").stat().st_mode & 0o777 == 0o600
    # A daemon started on a config whose store does not exist yet makes it the same way, WAL files too.
    config = write_config(tmp_path / "fresh", f"sqlite:///{tmp_path / 'fresh' / 'bridge.db'}")
    old = os.umask(0o022)
    try:
        daemon = start_daemon(config)
    finally:
        os.umask(old)
    try:
        assert post_patient(daemon, "0815")[0] == 201
        store_files = sorted((tmp_path / "fresh").glob("bridge.db*"))
        assert [p.name for p in store_files] == ["bridge.db", "bridge.db-shm", "bridge.db-wal"]
        assert {p.stat().st_mode & 0o777 for p in store_files} == {0o600}
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_database_file_deleted_or_replaced_under_the_daemon_is_reported_and_writes_refused(
    tmp_path: Path, how: str
) -> None:
    """SQLite goes on writing into a file that was deleted (or replaced) under it, and all of it is lost
    at the next start. The daemon notices, says so once, and refuses writes in every protocol's way."""
    db = tmp_path / "bridge.db"
    exchange = tmp_path / "exchange"
    exchange.mkdir()
    config = write_config(
        tmp_path / "home",
        f"sqlite:///{db}",
        {"vdds": {"exchange_dir": str(exchange), "poll_seconds": 0.2, "language": "en"}},
    )
    daemon = start_daemon(config)
    try:
        patient = {"pms_system": "rest", "pms_id": "D1", "last_name": "Dahl", "first_name": "Ada"}
        json_body = {"Content-Type": "application/json"}
        assert (
            daemon.request("POST", "/api/v1/patients", json.dumps(patient).encode(), headers=json_body)[0]
            == 201
        )
        if how == "deleted":
            db.unlink()
        else:  # another file moved to the path (a rename: a new file); a copy written into the
            # file itself is not noticed (docs/operations.md, "A copy written over the database file")
            copy = tmp_path / "copy.db"
            copy.write_bytes(db.read_bytes())
            copy.replace(db)
        what = "was deleted" if how == "deleted" else "was replaced by another file"
        expected = (
            f"the store's database file {db} {what} while the daemon had it open: nothing can be saved"
            ' until it is restored and the daemon restarted (docs/operations.md, "Troubleshooting")'
        )

        status, body = daemon.request("GET", "/readyz", token=None)
        assert status == 503 and json.loads(body)["checks"]["store"] == {"ok": False, "error": expected}
        assert daemon.request("GET", "/healthz", token=None)[0] == 200  # alive: a restart would lose more

        patient["pms_id"] = "D2"
        status, body = daemon.request(
            "POST", "/api/v1/patients", json.dumps(patient).encode(), headers=json_body
        )
        problem = json.loads(body)
        assert (status, problem["type"], problem["detail"]) == (
            503,
            "urn:pms-bridge:problem:store-file-lost",
            expected,
        )

        status, body = daemon.request("GET", "/api/v1/patients?pms_id=D1")  # reads too, once it is known
        assert (status, json.loads(body)["type"]) == (503, "urn:pms-bridge:problem:store-file-lost")

        store_lost = (
            "The imaging system cannot save anything at the moment (its database is missing). Please call IT."
            f" (database file {db} {what})"
        )
        request = tmp_path / "MME505F.tmp"
        request.write_bytes(
            b"[PATIENT]\r\nPVS=TESTPVS\r\nPATID=D3\r\nLASTNAME=Dahl\r\nREADY=0\r\nERRORLEVEL=0\r\nERRORTEXT=\r\n"
        )
        module = subprocess.run(
            [*pms_bridge_command(), "vdds", str(request)],
            env={**os.environ, "PMS_BRIDGE_CONFIG": str(config)},
            capture_output=True,
            timeout=60,
        )
        answer = request.read_bytes().decode("cp1252")
        assert module.returncode == 1 and "READY=1" in answer and "ERRORLEVEL=1" in answer
        assert f"ERRORTEXT={store_lost}\r\n" in answer

        dropped = exchange / "NNT0001.tmp"  # the claim is a write too: answered unclaimed, with the error
        dropped.write_bytes(
            b"[PATIENT]\r\nPVS=TESTPVS\r\nPATID=D4\r\nLASTNAME=Dahl\r\nREADY=0\r\nERRORLEVEL=0\r\nERRORTEXT=\r\n"
        )
        deadline = time.monotonic() + 30
        while "READY=1" not in (folder_answer := dropped.read_bytes().decode("cp1252")):
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        assert "ERRORLEVEL=1" in folder_answer and f"ERRORTEXT={store_lost}\r\n" in folder_answer

        dexis = subprocess.run(
            [*pms_bridge_command(), "dexis", "SET", "D5", "LN=Dahl", "FN=Ada"],
            env={**os.environ, "PMS_BRIDGE_CONFIG": str(config)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (dexis.returncode, dexis.stderr.strip()) == (1, f"pms-bridge dexis: {expected}")

        opp_launch = subprocess.run(
            [*pms_bridge_command(), "opp", "-p", "D7", "-l", "Dahl"],
            env={**os.environ, "PMS_BRIDGE_CONFIG": str(config)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (opp_launch.returncode, opp_launch.stderr.strip()) == (
            ExitCode.ERROR,
            f"pms-bridge opp: {expected}",
        )

        opp = urllib.request.Request(
            f"http://127.0.0.1:{daemon.settings.opp_web.port}/opp?command=UPDATE_CREATE&reference=D6"
            "&software=WebPMS&lastName=Dahl"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(opp, timeout=30)
        assert refused.value.code == 503
        assert json.loads(refused.value.read())["type"] == "urn:pms-bridge:problem:store-file-lost"

        doctor = subprocess.run(
            [*pms_bridge_command(), "doctor", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert doctor.returncode == 1
        assert f"FAIL daemon answering: not ready: store ({expected})" in doctor.stdout.splitlines()
        assert (
            f"FAIL API token: accepted, but the daemon answered 503: {expected}" in doctor.stdout.splitlines()
        )
        if how == "deleted":
            assert (
                f"FAIL store reachable and up to date: [store] url = sqlite:///{db}: the database file {db}"
                " does not exist: put it back, or restore it from the backup"
            ) in doctor.stdout
            assert not db.exists()  # nothing made a new, empty store at the path
    finally:
        assert daemon.stop() == 0
    errors = [(r["msg"], r.get("path")) for r in daemon.records() if r["level"] == "error"]
    assert errors == [
        ("store database file lost; store requests refused", str(db))
    ]  # once, and nothing crashed


def sqlite_store(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A SQLite store's home in `tmp_path`, its database file, its config, and a DICOM file of patient 0815
    to import."""
    home = tmp_path / "home"
    config = write_config(home, f"sqlite:///{home / 'bridge.db'}")
    return home, home / "bridge.db", config, write(dental_dataset(patient_id="0815"), tmp_path / "IO1.dcm")


def import_one(config: Path, media: Path) -> None:
    """`pms-bridge import` of one file into the store of `config` (the config named by the environment)."""
    env = {**os.environ, "PMS_BRIDGE_CONFIG": str(config)}
    imported = subprocess.run(
        [*pms_bridge_command(), "import", str(media)], capture_output=True, text=True, env=env
    )
    assert imported.returncode == 0, imported.stderr


def test_commands_refuse_a_missing_database_file_and_leave_what_is_left_of_the_store(tmp_path: Path) -> None:
    """`mv bridge.db` away under a running daemon: `pms-bridge import` (and every other command that
    opens the store) made a new, empty store at the path, imported into it, exited 0, and SQLite deleted
    the -wal and -shm that the recovery needs. Now each refuses in one line naming the file and what to
    do, and changes nothing; `init` and `serve` make no new store beside those files, nor beside stored
    images once the daemon's stop has removed them; the file moved back is the store again."""
    home, db, config, media = sqlite_store(tmp_path)
    daemon = start_daemon(config)
    import_one(config, media)
    away = home / "bridge.db.away"
    try:
        db.rename(away)
        assert daemon.request("GET", "/readyz", token=None)[0] == 503  # the daemon reads nothing more now
        wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
        left = (wal.read_bytes(), shm.stat().st_ino)
        missing = (
            f"[store] url = sqlite:///{db}: the database file {db} does not exist: put it back, or restore it"
            " from the backup (a daemon that had it open cannot save anything until then: docs/operations.md,"
            f" \"Troubleshooting\"); for a new store, run 'pms-bridge init --home {home}'"
        )
        commands = store_commands(config, tmp_path)
        serve = commands.pop("serve")
        commands["import"][-1] = str(media)
        commands["outbox retry"] = ["outbox", "retry", "--config", str(config)]
        for name, args in commands.items():
            assert one_line(pms_bridge(*args), name) == f"pms-bridge {args[0]}: {missing}"
        remains = (
            f"[store] url = sqlite:///{db}: the database file {db} does not exist, but what is left of a"
            f" store is there ({{}}): put the file back, or restore it from the backup (docs/operations.md,"
            ' "Troubleshooting"); for a new, empty store there, move them away first'
        )
        images = home / "images"
        for name, args in {"serve": serve, "init": ["init", "--home", str(home)]}.items():
            line = one_line(pms_bridge(*args), name)
            assert line == f"pms-bridge {name}: " + remains.format(
                f"{wal}, {shm}, the images stored in {images}"
            )
        assert not db.exists() and (wal.read_bytes(), shm.stat().st_ino) == left
    finally:
        assert daemon.stop() == 0
    # SQLite does not checkpoint a moved file at close: the -wal keeps what was written last (the import)
    assert wal.exists() and not db.exists()
    away.rename(db)
    daemon = start_daemon(config)
    try:
        status, body = daemon.request("GET", "/api/v1/patients?pms_id=0815")
        [patient] = json.loads(body)["items"]
        status, body = daemon.request("GET", f"/api/v1/patients/{patient['id']}/images")
        assert status == 200 and len(json.loads(body)["items"]) == 1
    finally:
        assert daemon.stop() == 0
    assert not wal.exists()  # checkpointed into the file at a clean stop
    db.rename(away)  # gone while no daemon runs: only the stored images tell
    for name, args in {"serve": serve, "init": ["init", "--home", str(home)]}.items():
        line = one_line(pms_bridge(*args), name)
        assert line == f"pms-bridge {name}: " + remains.format(f"the images stored in {images}")
    assert sorted(p.name for p in home.iterdir()) == [
        "bridge.db.away",
        "daemon.log",
        "images",
        "pms-bridge.ini",
    ]


def test_a_backup_restored_as_documented_is_the_store_again(tmp_path: Path) -> None:
    """docs/operations.md, "Restoring a backup (SQLite)": a copy written over the database file under a
    running daemon is not noticed, so a backup is restored with the daemon stopped, after the store's
    files are moved aside. A killed daemon leaves its -wal, which SQLite would apply to the restored
    copy as if it were its own. Restored this way, the store holds what the backup held and nothing
    later, and SQLite's integrity check, doctor and reconcile pass."""
    home, db, config, media = sqlite_store(tmp_path)
    daemon = start_daemon(config)
    import_one(config, media)
    assert daemon.stop() == 0
    backup = tmp_path / "backup"
    backup.mkdir()
    for name in ("bridge.db", "bridge.db-wal"):  # taken with the daemon stopped: it left no -wal
        if (home / name).exists():
            shutil.copyfile(home / name, backup / name)
    assert sorted(p.name for p in backup.iterdir()) == ["bridge.db"]
    daemon = start_daemon(config)
    assert post_patient(daemon, "LATER")[0] == 201
    daemon.stop(signal.SIGKILL)  # killed (or crashed): its -wal holds LATER
    wal = Path(f"{db}-wal")
    assert wal.exists()

    stale = tmp_path / "stale"  # what step 2 prevents, tried on a copy: the backup beside the old -wal
    stale.mkdir()
    shutil.copyfile(backup / "bridge.db", stale / "bridge.db")
    shutil.copyfile(wal, stale / "bridge.db-wal")
    with contextlib.closing(sqlite3.connect(stale / "bridge.db")) as conn:
        assert conn.execute("SELECT count(*) FROM pms_links WHERE pms_id = 'LATER'").fetchone() == (1,)

    aside = tmp_path / "aside"  # the procedure: every daemon stopped, the store's files moved aside,
    aside.mkdir()
    for found in home.glob("bridge.db*"):
        found.rename(aside / found.name)
    shutil.copyfile(backup / "bridge.db", db)  # the backup copied into place
    db.chmod(0o600)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    daemon = start_daemon(config)
    try:
        assert json.loads(daemon.request("GET", "/api/v1/patients?pms_id=LATER")[1])["items"] == []
        [patient] = json.loads(daemon.request("GET", "/api/v1/patients?pms_id=0815")[1])["items"]
        status, body = daemon.request("GET", f"/api/v1/patients/{patient['id']}/images")
        assert status == 200 and len(json.loads(body)["items"]) == 1
        doctor = pms_bridge("doctor", "--config", str(config))
        assert doctor.returncode == 0 and "FAIL" not in doctor.stdout, doctor.stdout
        reconcile = pms_bridge("reconcile", "--config", str(config))
        assert reconcile.returncode == 0 and reconcile.stdout.splitlines() == [
            "1 images checked, 0 with a missing or damaged file"
        ]
    finally:
        assert daemon.stop() == 0


def test_a_started_daemon_forks_its_imaging_workers_before_the_first_request(daemon: DaemonProcess) -> None:
    # The pool forked its workers one by one as work arrived: the first thumbnail after a restart waited
    # for the fork server's start-up, and the first import's files for the second worker.
    [started] = daemon.wait_for_records("imaging workers started", 60)
    assert started["workers"] == 2
    # real processes: the fork server below the daemon, the two workers below it, named in the log
    workers = [pid for child in children(daemon.proc.pid) for pid in children(child)]
    assert sorted(workers) == started["pids"]


def test_a_killed_daemon_leaves_no_imaging_processes_behind(daemon_factory: Any) -> None:
    # Its pool's workers held the pipes of the pool's queues and of the fork server, so a daemon killed
    # (SIGKILL, a crash) left the fork server and both workers running for good: one CI run of the tests
    # left hundreds, 14 GB of memory. The workers now end when the process that made the pool is gone.
    daemon = daemon_factory()
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while len(workers) < 2 and time.monotonic() < deadline:
        servers = [child for child in children(daemon.proc.pid) if children(child)]
        workers = [pid for server in servers for pid in children(server)]
        time.sleep(0.05)
    [server] = servers
    assert len(workers) == 2
    daemon.proc.kill()
    daemon.proc.wait(30)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in [server, *workers]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in [server, *workers] if alive(pid)] == []
