"""The watched-folder poller: complete files only, each version once, across daemons; a vanishing share."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from bridge.runtime import Runtime
from bridge.watch import FolderWatcher, Verdict
from tests.support.cancellation import assert_ends_when_cancelled_as_woken


def complete_when_ends_with_end(content: bytes, stable: bool) -> Verdict:
    if content.startswith(b"ANSWERED"):
        return Verdict.IGNORE
    return Verdict.HANDLE if content.endswith(b"END\n") else Verdict.WAIT


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []

    async def __call__(self, path: Path, content: bytes) -> str:
        self.seen.append((path.name, content))
        path.write_bytes(b"ANSWERED " + content)
        return "ok"


async def test_complete_files_are_handled_once_and_partial_ones_wait(
    runtime: Runtime, tmp_path: Path
) -> None:
    folder = tmp_path / "share"
    folder.mkdir()
    recorder = Recorder()
    watcher = FolderWatcher(
        runtime,
        "t",
        folder,
        recorder,
        setting="[t] dir",
        classify=complete_when_ends_with_end,
        poll_seconds=0.05,
    )
    (folder / "a.tmp").write_bytes(b"[PATIENT]\nhalf")  # still being written
    (folder / ".hidden").write_bytes(b"END\n")  # a writer's own temporary file
    assert await watcher.scan()
    assert recorder.seen == []
    (folder / "a.tmp").write_bytes(b"[PATIENT]\nEND\n")
    assert await watcher.scan()
    assert await watcher.scan()
    assert recorder.seen == [("a.tmp", b"[PATIENT]\nEND\n")]
    assert "t" in runtime.readiness.last_scan


async def test_links_and_folders_are_never_read_and_logged_once_each(
    runtime: Runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A symbolic link is not followed (it may lead out of the folder) and a folder is no request; each is
    logged once with the reason when it appears, not on every scan, since a PMS waits on it forever."""
    caplog.set_level(logging.WARNING, logger="bridge.watch")
    folder, outside = tmp_path / "share", tmp_path / "outside.tmp"
    folder.mkdir()
    outside.write_bytes(b"[PATIENT]\nEND\n")  # a complete request, but not in the folder
    (folder / "sym.tmp").symlink_to(outside)
    (folder / "sub.tmp").mkdir()
    recorder = Recorder()
    watcher = FolderWatcher(
        runtime, "v", folder, recorder, setting="[vdds] exchange_dir", classify=complete_when_ends_with_end
    )

    def warned() -> list[tuple[str, str]]:
        return [
            (r.__dict__["file"], r.__dict__["reason"]) for r in caplog.records if r.name == "bridge.watch"
        ]

    for _ in range(3):
        assert await watcher.scan()
    assert recorder.seen == [] and outside.read_bytes() == b"[PATIENT]\nEND\n"
    assert sorted(warned()) == [
        ("sub.tmp", "a folder, not a file"),
        ("sym.tmp", "a symbolic link, never followed: it may lead out of the folder"),
    ]
    (folder / "sym.tmp").unlink()
    assert await watcher.scan()
    (folder / "sym.tmp").symlink_to(outside)  # back again: logged again
    assert await watcher.scan() and await watcher.scan()
    assert [name for name, _reason in warned()].count("sym.tmp") == 2


async def test_a_watcher_cancelled_as_a_change_wakes_it_ends(runtime: Runtime, tmp_path: Path) -> None:
    """The daemon's stop cancels its watchers and waits for them: one woken by a change notification in
    the same turn of the event loop must end, not run on (tests/support/cancellation.py)."""
    folder = tmp_path / "share"
    folder.mkdir()

    def start() -> tuple[Any, asyncio.Event]:
        watcher = FolderWatcher(runtime, "c", folder, Recorder(), setting="[c] dir", poll_seconds=60)
        return watcher.run(), watcher._wake

    await assert_ends_when_cancelled_as_woken(start)


async def test_stable_size_is_complete_by_default(runtime: Runtime, tmp_path: Path) -> None:
    folder = tmp_path / "share"
    folder.mkdir()
    recorder = Recorder()
    watcher = FolderWatcher(runtime, "d", folder, recorder, setting="[d] dir", poll_seconds=0.05)
    (folder / "Patient_WS1.txt").write_bytes(b"PN=1\n")
    await watcher.scan()
    assert recorder.seen == []  # seen once: maybe still growing
    await watcher.scan()
    assert recorder.seen == [("Patient_WS1.txt", b"PN=1\n")]


async def test_two_daemons_sharing_a_folder_answer_a_file_once(runtime: Runtime, tmp_path: Path) -> None:
    other = Runtime.build(runtime.settings, migrate=False)
    try:
        folder = tmp_path / "share"
        folder.mkdir()
        first, second = Recorder(), Recorder()
        w1 = FolderWatcher(
            runtime, "v", folder, first, setting="[v] dir", classify=complete_when_ends_with_end
        )
        w2 = FolderWatcher(
            other, "v", folder, second, setting="[v] dir", classify=complete_when_ends_with_end
        )
        (folder / "x.ini").write_bytes(b"req END\n")
        await asyncio.gather(w1.scan(), w2.scan())
        assert len(first.seen) + len(second.seen) == 1
    finally:
        other.close()


async def test_a_vanished_share_is_reported_and_recovered(runtime: Runtime, tmp_path: Path) -> None:
    folder = tmp_path / "share"
    folder.mkdir()
    recorder = Recorder()
    watcher = FolderWatcher(
        runtime,
        "s",
        folder,
        recorder,
        setting="[s] dir",
        classify=complete_when_ends_with_end,
        poll_seconds=0.05,
    )
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.sleep(0.2)
        assert "s" not in runtime.readiness.scan_errors
        shutil.rmtree(folder)
        await asyncio.sleep(0.3)
        assert "s" in runtime.readiness.scan_errors
        folder.mkdir()
        (folder / "late.ini").write_bytes(b"req END\n")
        for _ in range(100):
            if recorder.seen:
                break
            await asyncio.sleep(0.05)
        assert recorder.seen == [("late.ini", b"req END\n")]
        assert "s" not in runtime.readiness.scan_errors
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_missing_folder_is_reported_once_not_created_and_watched_once_it_appears(
    runtime: Runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A share not mounted yet: its mount point holds no folder. Creating it would make a local folder
    the PMS never writes into; the watcher reports it and picks it up once it is there."""
    caplog.set_level(logging.INFO, logger="bridge.watch")
    folder = tmp_path / "mnt" / "share"
    recorder = Recorder()
    watcher = FolderWatcher(
        runtime,
        "m",
        folder,
        recorder,
        setting="[m] dir",
        classify=complete_when_ends_with_end,
        poll_seconds=0.05,
    )
    task = asyncio.create_task(watcher.run())
    try:
        while runtime.readiness.scan_errors.get("m") is None:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # several more polls: still one warning
        assert runtime.readiness.scan_errors["m"] == (
            f"[m] dir {folder} does not exist: is the share mounted? (the daemon does not create it; it"
            " watches the folder as soon as it appears)"
        )
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert [(r.getMessage(), r.__dict__["setting"], r.__dict__["path"]) for r in warnings] == [
            ("watched folder missing; not created", "[m] dir", str(folder))
        ]
        assert not folder.parent.exists()
        folder.mkdir(parents=True)
        (folder / "late.ini").write_bytes(b"req END\n")
        for _ in range(200):
            if recorder.seen:
                break
            await asyncio.sleep(0.05)
        assert recorder.seen == [("late.ini", b"req END\n")]
        assert "m" not in runtime.readiness.scan_errors
        assert "watched folder appeared; watching it" in [r.getMessage() for r in caplog.records]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
