"""Shared fixtures: real SQLite and PostgreSQL stores, settings, a runtime, and the real daemon process.

PostgreSQL: `PMS_BRIDGE_TEST_PG_URL` (a server URL whose user may CREATE DATABASE; `.ci/run` sets it)
or, when it is unset, a throwaway cluster started here with the machine's initdb/pg_ctl. Each test gets
a fresh database. Set `PMS_BRIDGE_TEST_NO_PG=1` to run without PostgreSQL (the PostgreSQL variants are
then skipped, loudly); CI never sets it.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.config import Settings, load_settings
from tests.support.pg import create_database, throwaway_cluster
from tests.support.ports import free_port

# ------------------------------------------------------------------------------------------------
# PostgreSQL


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL server URL (without database) for the whole session."""
    if os.environ.get("PMS_BRIDGE_TEST_NO_PG") == "1":
        pytest.skip("PMS_BRIDGE_TEST_NO_PG=1: PostgreSQL variants skipped on request")
    url = os.environ.get("PMS_BRIDGE_TEST_PG_URL")
    if url:
        yield url.rstrip("/")
        return
    with throwaway_cluster() as server:
        yield server


def new_pg_database(server: str) -> str:
    return create_database(server, "t_" + secrets.token_hex(6))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store URL on each supported server kind that runs here."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bridge.db'}"
    return new_pg_database(request.getfixturevalue("pg_server"))


# ------------------------------------------------------------------------------------------------
# Settings and runtime


def write_config(home: Path, store_url: str, sections: dict[str, dict[str, Any]] | None = None) -> Path:
    """A config file under `home` with a token, free ports and the given section overrides."""
    values: dict[str, dict[str, Any]] = {
        "store": {"url": store_url, "images": str(home / "images")},
        "api": {"port": free_port(), "token": "test-token-" + secrets.token_hex(8)},
        "opp_web": {"port": free_port()},
        "daemon": {"log_format": "json", "shutdown_timeout": 20},
    }
    for section, keys in (sections or {}).items():
        values.setdefault(section, {}).update(keys)
    lines = []
    for section, keys in values.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value}" for key, value in keys.items()]
    home.mkdir(parents=True, exist_ok=True)
    path = home / "pms-bridge.ini"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def make_settings(tmp_path: Path, store_url: str) -> Any:
    """Factory: Settings for a fresh home on the parametrised store, with section overrides."""
    counter = iter(range(1000))

    def make(**sections: dict[str, Any]) -> Settings:
        home = tmp_path / f"home{next(counter)}"
        return load_settings(str(write_config(home, store_url, sections)))

    return make


@pytest.fixture
def settings(make_settings: Any) -> Settings:
    result: Settings = make_settings()
    return result


@pytest.fixture
async def runtime(settings: Settings) -> Any:
    from bridge.runtime import Runtime

    rt = Runtime.build(settings)
    yield rt
    await rt.audit.flush()
    rt.close()


@pytest.fixture
async def api_client(runtime: Any) -> Any:
    """An aiohttp test client on the real API application over loopback HTTP."""
    from aiohttp.test_utils import TestClient, TestServer

    from bridge.web.app import build_api_app

    client = TestClient(TestServer(build_api_app(runtime)))
    await client.start_server()
    client.session.headers["Authorization"] = f"Bearer {runtime.settings.api.token}"
    yield client
    await client.close()


# ------------------------------------------------------------------------------------------------
# The real daemon process


@dataclass
class DaemonProcess:
    """A running `pms-bridge serve` and what a test needs to talk to it."""

    proc: subprocess.Popen[bytes]
    config: Path
    settings: Settings
    log_path: Path

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.api.tls else "http"
        return f"{scheme}://127.0.0.1:{self.settings.api.port}"

    @property
    def token(self) -> str:
        return self.settings.api.token

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        token: str | None = "default",  # noqa: S107 - "default" means the daemon's own token
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if token is not None:
            req.add_header("Authorization", f"Bearer {self.token if token == 'default' else token}")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        # with [api] tls = yes, trusting the daemon's own certificate
        context = (
            ssl.create_default_context(cafile=self.settings.api.tls_cert) if self.settings.api.tls else None
        )
        try:
            with urllib.request.urlopen(req, timeout=30, context=context) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send `sig` and wait for the exit status. A daemon still running after `timeout` is asked for its
        threads' stacks (SIGUSR1, bridge.stack_dumps), killed, and the test fails with the end of its log:
        the hang is then explained in CI's output, and no daemon is left running into later tests."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            self.kill()
            tail = self.log()[-12000:]
            raise AssertionError(f"daemon did not stop within {timeout} s; its log ends:\n{tail}") from None

    def kill(self) -> None:
        """SIGKILL, and wait for the process (a daemon left over by a failed test)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """The JSON log records written so far (a line still being written is left for the next look)."""
        return [
            json.loads(line)
            for line in self.log().splitlines(keepends=True)
            if line.startswith("{") and line.endswith("\n")
        ]

    def wait_for_records(self, msg: str, timeout: float = 30) -> list[dict[str, Any]]:
        """The log records whose message is `msg`, once there is one: the daemon answers /healthz while it
        still works at its start-up (it removes an interrupted import's files after its listeners are up)
        and logs what it did after doing it."""
        deadline = time.monotonic() + timeout
        while not (found := [r for r in self.records() if r.get("msg") == msg]):
            assert time.monotonic() < deadline, f"no {msg!r} logged: {self.log()[-3000:]}"
            time.sleep(0.05)
        return found


def pms_bridge_command() -> list[str]:
    """The installed `pms-bridge` console script next to this interpreter (what a PMS calls)."""
    script = Path(sys.executable).with_name("pms-bridge")
    if not script.exists():
        raise RuntimeError(f"{script} is missing: install the project (pip install -e '.[test]')")
    return [str(script)]


def start_daemon(
    config: Path, *, env: dict[str, str] | None = None, file_size_limit: int | None = None
) -> DaemonProcess:
    """A real `pms-bridge serve` once /healthz answers; `file_size_limit`: no file it writes may grow beyond
    that many bytes (RLIMIT_FSIZE: a store whose disk is full, for real, without filling a disk)."""
    settings = load_settings(str(config))
    log_path = config.parent / "daemon.log"
    with open(log_path, "ab") as log_file:  # the child keeps its own handle
        proc = subprocess.Popen(
            [*pms_bridge_command(), "serve", "--config", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=None if file_size_limit is None else functools.partial(_limit_files, file_size_limit),
        )
    daemon = DaemonProcess(proc, config, settings, log_path)
    _started.append(daemon)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}:\n{daemon.log()}")
        try:
            status, _ = daemon.request("GET", "/healthz", token=None)
            if status == 200:
                return daemon
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"daemon did not come up:\n{daemon.log()}")


# Every daemon started, so that one a test left running (it failed before stopping it) is killed after it.
_started: list[DaemonProcess] = []


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test() -> Iterator[None]:
    """A test failing before it stopped its daemon left it running into the later tests, which then counted
    its processes as their own; it is killed once the test's own fixtures are done."""
    yield
    while _started:
        _started.pop().kill()


def _limit_files(size: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


@pytest.fixture
def daemon_factory(tmp_path: Path, store_url: str) -> Iterator[Any]:
    """Factory starting real daemons (section overrides as keyword args); all are stopped afterwards."""
    started: list[DaemonProcess] = []
    counter = iter(range(1000))

    def start(**sections: dict[str, Any]) -> DaemonProcess:
        home = tmp_path / f"daemon{next(counter)}"
        daemon = start_daemon(write_config(home, store_url, sections))
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:  # stopped as a service manager stops it: a killed daemon leaves its pool's
        if daemon.proc.poll() is None:  # temporary folder (pymp-*) behind, one per daemon and test
            daemon.proc.terminate()
            try:
                daemon.proc.wait(10)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait(10)


@pytest.fixture
def daemon(daemon_factory: Any) -> DaemonProcess:
    result: DaemonProcess = daemon_factory()
    return result
