"""Images another process stores are announced on a running daemon's event stream (bridge.announce)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import queue
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from bridge.announce import MAX_GAPS, OwnAdditions, Watcher, announce_stored_elsewhere
from bridge.config import Settings, load_settings
from bridge.events import Event, ImagesAdded
from bridge.model import Action, Demographics, Origin, PatientRequest
from bridge.runtime import Runtime
from tests.conftest import DaemonProcess, new_pg_database, pms_bridge_command, write_config
from tests.support.dicomfiles import dental_dataset, to_bytes, write

ORIGIN = Origin("test", "api", "WS1")
EVENT_WAIT = 15.0  # seconds to wait for an expected event (the worker looks every second)
QUIET = 3.5  # seconds in which a second announcement would have come (three of the worker's looks)


@contextmanager
def event_stream(daemon: DaemonProcess) -> Iterator[queue.Queue[tuple[str, dict[str, Any]]]]:
    """The daemon's /api/v1/events, read by a thread into a queue of (event name, data)."""
    connection = http.client.HTTPConnection("127.0.0.1", daemon.settings.api.port, timeout=60)
    connection.request("GET", "/api/v1/events", headers={"Authorization": f"Bearer {daemon.token}"})
    sock = connection.sock
    assert sock is not None
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline() == b": connected\n"
    events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()

    def read() -> None:
        name = ""
        try:
            while line := response.readline():
                if line.startswith(b"event: "):
                    name = line[7:].decode().strip()
                elif line.startswith(b"data: "):
                    events.put((name, json.loads(line[6:])))
        except (OSError, ValueError, AttributeError):
            pass  # the connection was closed under the read at the end of the test

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield events
    finally:
        sock.shutdown(socket.SHUT_RDWR)  # the reader's blocked read returns at once
        reader.join(10)
        connection.close()


def images_added(events: queue.Queue[tuple[str, dict[str, Any]]], timeout: float) -> list[dict[str, Any]]:
    """The images-added events that arrive within `timeout` seconds, once the first has arrived."""
    found: list[dict[str, Any]] = []
    wait = timeout
    while True:
        try:
            name, data = events.get(timeout=wait)
        except queue.Empty:
            return found
        if name == "images-added":
            found.append(data)
            wait = QUIET


def test_a_command_line_import_is_announced_once_and_the_daemons_own_import_once(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    for number in (1, 2):
        write(dental_dataset(patient_id="0815", name="Weiß^Jörg"), media / f"IO{number}.dcm")
    env = {**os.environ, "PMS_BRIDGE_CONFIG": str(daemon.config)}
    with event_stream(daemon) as events:
        done = subprocess.run(
            [*pms_bridge_command(), "import", "--json", str(media)], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr
        imported = sorted(item["image_id"] for item in json.loads(done.stdout)["imported"])
        (announced,) = images_added(events, EVENT_WAIT)
        assert announced["origin_protocol"] == "store"
        assert sorted(announced["image_ids"]) == imported
        status, body = daemon.request(
            "POST",
            "/api/v1/import",
            to_bytes(dental_dataset(patient_id="0815", name="Weiß^Jörg")),
            headers={"Content-Type": "application/dicom"},
        )
        assert status == 201, body
        (own_image,) = [item["image_id"] for item in json.loads(body)["imported"]]
        # the daemon's own import: its own announcement, and the watcher does not repeat it
        (own,) = images_added(events, EVENT_WAIT)
        assert own["origin_protocol"] != "store" and own["image_ids"] == [own_image]
        assert own["patient_id"] == announced["patient_id"]


async def watch(rt: Runtime) -> tuple[Watcher, list[Event]]:
    """A watcher on `rt` as the daemon's worker starts it, and the events its bus publishes."""
    published: list[Event] = []
    rt.bus.subscribe(published.append)
    rt.service.own_additions.active = True
    high = await rt.db.read(lambda session: session.scalar(text("SELECT max(id) FROM images")) or 0)
    return Watcher(rt, high), published


async def open_patient(rt: Runtime, pms_id: str) -> int:
    request = PatientRequest(Action.OPEN, ORIGIN, "PVS", pms_id=pms_id, demographics=Demographics("Roe"))
    outcome = await rt.service.handle(request)
    assert outcome.patient is not None
    return outcome.patient.id


async def add_image(rt: Runtime, patient_id: int, number: int) -> int:
    from bridge.imaging.analyze import analyze_dicom, new_image

    data = to_bytes(dental_dataset(patient_id=str(patient_id), InstanceNumber=number))
    sha256, _path = rt.files.put(data, "dcm")
    image = new_image(analyze_dicom(data), sha256, len(data), {})
    (view,) = await rt.service.add_images(ORIGIN, patient_id, [image])
    return view.id


async def test_images_of_another_runtime_are_announced_and_ours_are_not(
    runtime: Runtime, settings: Any
) -> None:
    watcher, published = await watch(runtime)
    other = Runtime.build(settings)  # another process on the same store
    try:
        patient = await open_patient(runtime, "4711")
        ours = await add_image(runtime, patient, 1)
        theirs = [await add_image(other, patient, n) for n in (2, 3)]
        assert not await watcher.look()
        announced = [e for e in published if isinstance(e, ImagesAdded)]
        assert [(e.origin_protocol, list(e.image_ids)) for e in announced] == [
            ("test", [ours]),  # published by our service when it added it
            ("store", theirs),  # found by the watcher, once
        ]
        assert not await watcher.look()
        assert len([e for e in published if isinstance(e, ImagesAdded)]) == 2
    finally:
        await other.audit.flush()
        other.close()


def test_own_additions_rolled_back_are_forgotten_and_nothing_is_kept_while_off() -> None:
    own = OwnAdditions()
    own.adding([1, 2])  # off: a command-line import keeps nothing
    assert own.others([1, 2]) == [1, 2]
    own.active = True
    own.adding([3, 4, 5])
    own.not_added([5])  # its transaction rolled back; SQLite may give id 5 to another process next
    assert own.others([3, 5]) == [5]
    own.passed(4)
    assert own.others([4]) == [4]


@pytest.fixture
def pg_settings(tmp_path: Path, pg_server: str) -> Settings:
    """Settings of a fresh PostgreSQL store: only there can ids commit out of order (SQLite has one writer
    at a time)."""
    return load_settings(str(write_config(tmp_path / "pg", new_pg_database(pg_server))))


async def test_an_id_committed_after_a_higher_one_is_announced_on_postgresql(pg_settings: Settings) -> None:
    runtime = Runtime.build(pg_settings)
    watcher, published = await watch(runtime)
    patient = await open_patient(runtime, "4713")
    first_in, second_in = Runtime.build(pg_settings), Runtime.build(pg_settings)
    try:
        # first_in inserts (taking the lower id) and holds its transaction open while second_in commits
        holding = asyncio.Event()
        release = asyncio.Event()
        loop = asyncio.get_running_loop()
        original_write = first_in.db.write

        async def slow_write(work: Any, **kwargs: Any) -> Any:
            def held(session: Any) -> Any:
                result = work(session)
                loop.call_soon_threadsafe(holding.set)
                asyncio.run_coroutine_threadsafe(release.wait(), loop).result(30)
                return result

            return await original_write(held, **kwargs)

        first_in.db.write = slow_write  # type: ignore[method-assign]
        lower = asyncio.create_task(add_image(first_in, patient, 1))
        async with asyncio.timeout(10):
            await holding.wait()
        higher = await add_image(second_in, patient, 2)
        await watcher.look()
        assert [list(e.image_ids) for e in published if isinstance(e, ImagesAdded)] == [[higher]]
        assert watcher.gaps, "the lower id, not committed yet, is kept as a gap"
        release.set()
        lower_id = await lower
        assert lower_id < higher
        await watcher.look()
        assert [list(e.image_ids) for e in published if isinstance(e, ImagesAdded)] == [[higher], [lower_id]]
        assert not watcher.gaps
        # a sequence moved on by thousands (a restore, a rolled-back bulk insert) leaves a bounded gap list
        await second_in.db.write(
            lambda session: session.execute(
                text("SELECT setval(pg_get_serial_sequence('images', 'id'), :at)"), {"at": higher + 5000}
            )
        )
        far = await add_image(second_in, patient, 3)
        await watcher.look()
        assert far > higher + 5000 and list(published[-1].image_ids) == [far]  # type: ignore[attr-defined]
        assert len(watcher.gaps) == MAX_GAPS and max(watcher.gaps) == far - 1
    finally:
        for rt in (first_in, second_in, runtime):
            await rt.audit.flush()
            rt.close()


async def until(condition: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds * 10)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the condition did not come true in time")


async def test_the_announcer_waits_out_a_store_that_is_away(
    runtime: Runtime, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.announce")
    published: list[Event] = []
    runtime.bus.subscribe(published.append)

    def rename(old: str, new: str) -> Any:
        return lambda session: session.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))

    await runtime.db.write(rename("images", "images_away"), watched=False)
    task = asyncio.create_task(announce_stored_elsewhere(runtime))
    try:
        await until(lambda: any("highest image id" in r.getMessage() for r in caplog.records))
        assert not task.done()
        await runtime.db.write(rename("images_away", "images"), watched=False)
        await until(
            lambda: any(r.getMessage() == "watching for images stored elsewhere" for r in caplog.records)
        )
        other = Runtime.build(settings)
        try:
            theirs = await add_image(other, await open_patient(other, "4714"), 1)
        finally:
            await other.audit.flush()
            other.close()
        await until(lambda: any(isinstance(e, ImagesAdded) for e in published))
        assert [(e.origin_protocol, list(e.image_ids)) for e in published if isinstance(e, ImagesAdded)] == [
            ("store", [theirs])
        ]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert runtime.service.own_additions.active is False
