"""Watched folders for PMSs that drop files on a share (VDDS exchange files, Dexis Integrator files).

Polling is the source of truth: change notifications do not fire for writes made by other hosts on SMB
shares and are unreliable on Windows shares, so native events (watchfiles) are only a hint to poll now.
A file is handed over only when it is complete: the protocol's `classify` says so from the bytes (e.g. a
VDDS file with its request section and READY=0), or its size and modification time were stable across two
scans. Each file version is handled once: it is claimed in the store first (by name, modification time
and content hash), so two daemons sharing a folder never both answer it, and a restart does not answer it
twice. A share that disappears is retried with backoff; the last successful scan shows in /readyz.
A folder that does not exist is never created here (on an unmounted share's mount point a created
folder would be local, and the PMS would never write into it): it is reported, once, naming its
setting, and looked for again at every poll interval until it appears.
Files over MAX_FILE_BYTES are never read whole: a protocol whose PMS waits on a flag in the file refuses
them from their first bytes (`Oversized`), others are only logged. Only regular files are read: a
symbolic link is never followed (it may lead out of the folder, to a file the PMS did not write) and a
folder is no request, but each such entry is logged once with the reason, since a PMS that wrote a
request there waits for an answer that never comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bridge.store import queries as q
from bridge.store.db import StoreFileLost, is_unique_violation
from bridge.store.models import ProcessedFile
from bridge.store.types import utcnow

if TYPE_CHECKING:
    from bridge.runtime import Runtime

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 4 * 1024 * 1024
STALE_CLAIM = timedelta(minutes=2)  # a claim without a result this old was cut off by a crash
FORGET_AFTER = timedelta(days=30)


class Verdict(enum.Enum):
    """What a protocol says about a file it sees in its folder."""

    HANDLE = "handle"  # complete and unanswered: hand it over now
    WAIT = "wait"  # maybe still being written: look again next scan
    IGNORE = "ignore"  # not ours, or already answered


Classify = Callable[[bytes, bool], Verdict]  # (content, size stable since last scan) -> verdict
Handle = Callable[[Path, bytes], Awaitable[str]]  # handles a file; returns a short result for the record


@dataclass(frozen=True)
class Oversized:
    """How a protocol answers a file larger than MAX_FILE_BYTES, which is never read whole.

    Once the file's size and time are stable, `classify` sees its first MAX_FILE_BYTES bytes (HANDLE:
    a request to refuse; anything else: leave it) and `handle` gets the path and those bytes; it streams
    the rest itself if it rewrites the file. Without it, such a file is only logged: a PMS that polls a
    flag in the file (VDDS READY) would wait forever, so protocols with such a flag provide one.
    """

    classify: Callable[[bytes], Verdict]
    handle: Handle


def handle_when_stable(_content: bytes, stable: bool) -> Verdict:
    """The default: a file is complete when its size and time did not change between two scans."""
    return Verdict.HANDLE if stable else Verdict.WAIT


@dataclass(frozen=True)
class _Seen:
    size: int
    mtime_ns: int


def missing_folder(setting: str, folder: Path) -> str:
    """What /readyz and the log say of a watched folder that does not exist (`setting`: its key, e.g.
    "[vdds] exchange_dir"): the likely cause first, since the usual one is a share not mounted yet."""
    return (
        f"{setting} {folder} does not exist: is the share mounted? (the daemon does not create it;"
        " it watches the folder as soon as it appears)"
    )


class FolderWatcher:
    """Polls one folder and hands complete, unhandled files to `handle`.

    `setting` names the folder's key in the config ("[vdds] exchange_dir"), for the admin who reads
    that the folder is missing.
    """

    def __init__(
        self,
        rt: Runtime,
        name: str,
        folder: Path,
        handle: Handle,
        *,
        setting: str,
        classify: Classify = handle_when_stable,
        accept_name: Callable[[str], bool] = lambda _name: True,
        poll_seconds: float = 1.0,
        oversized: Oversized | None = None,
    ) -> None:
        self.rt = rt
        self.name = name
        self.folder = folder
        self.setting = setting
        self.handle = handle
        self.classify = classify
        self.oversized = oversized
        self.accept_name = accept_name
        self.poll_seconds = poll_seconds
        self._seen: dict[str, _Seen] = {}
        self._skipped: set[str] = set()  # entries that are no regular file, already logged
        self._done: set[str] = set()  # claim keys handled by this process
        self._wake = asyncio.Event()
        self._failures = 0  # failed scans of a folder that exists but cannot be read: the backoff
        self._missing = False

    async def run(self) -> None:
        """Scan until cancelled: every poll interval, or sooner when a change notification arrives.

        A folder that cannot be read is retried with backoff (a share that is down answers slowly); one
        that does not exist is looked for at every poll interval (a cheap failing lookup), so that it is
        watched as soon as the share is mounted or the folder is made.
        """
        readiness = self.rt.readiness
        readiness.watched[self.name] = self.folder
        readiness.max_scan_age[self.name] = max(30.0, 10 * self.poll_seconds)
        hint: asyncio.Task[None] | None = None
        readable = False
        try:
            while True:
                was_readable, readable = readable, await self.scan()
                if readable and not was_readable:  # (again) a folder to be notified about
                    await _cancel(hint)
                    hint = asyncio.create_task(self._notifications(), name=f"watch-hint-{self.name}")
                delay = (
                    self.poll_seconds
                    if readable or self._missing
                    else min(60.0, self.poll_seconds * 2**self._failures)
                )
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
        finally:
            await _cancel(hint)

    async def _notifications(self) -> None:
        """Native change events as a hint only; their absence or failure changes nothing."""
        try:
            from watchfiles import awatch

            async for _changes in awatch(self.folder, debounce=50, step=20, recursive=False):
                self._wake.set()
        except Exception as exc:  # an unsupported file system, a vanished share: polling carries on
            log.debug("change notifications unavailable", extra={"watcher": self.name, "error": str(exc)})

    async def scan(self) -> bool:
        """One pass over the folder; False when the folder could not be read (or does not exist)."""
        try:
            entries, skipped = await asyncio.to_thread(self._list)
        except FileNotFoundError:
            self._failures = 0
            message = missing_folder(self.setting, self.folder)
            if not self._missing:
                log.warning(
                    "watched folder missing; not created",
                    extra={"watcher": self.name, "setting": self.setting, "path": str(self.folder)},
                )
            self._missing = True
            self.rt.readiness.scan_errors[self.name] = message
            return False
        except OSError as exc:
            self._failures += 1
            message = f"{self.folder}: {exc.strerror or exc}"
            if self.rt.readiness.scan_errors.get(self.name) != message:
                log.error("watched folder unreachable", extra={"watcher": self.name, "error": message})
            self._missing = False
            self.rt.readiness.scan_errors[self.name] = message
            return False
        if self._missing:
            log.info(
                "watched folder appeared; watching it",
                extra={"watcher": self.name, "setting": self.setting, "path": str(self.folder)},
            )
        elif self._failures or self.name in self.rt.readiness.scan_errors:
            log.info("watched folder reachable again", extra={"watcher": self.name})
        self._failures = 0
        self._missing = False
        self.rt.readiness.scanned(self.name)
        self.rt.metrics.last_scan.labels(self.name).set(time.time())
        self._log_skipped(skipped)
        current: dict[str, _Seen] = {}
        for name, seen in entries.items():
            current[name] = seen
            stable = self._seen.get(name) == seen
            await self._consider(name, seen, stable)
        self._seen = current
        return True

    def _list(self) -> tuple[dict[str, _Seen], dict[str, str]]:
        """The regular files of the folder, and the other entries it would accept with why they are not
        read (a symbolic link, a folder, a device or pipe)."""
        found: dict[str, _Seen] = {}
        skipped: dict[str, str] = {}
        with os.scandir(self.folder) as it:
            for entry in it:
                if entry.name.startswith(".") or not self.accept_name(entry.name):
                    continue  # our own and other writers' temporary files start with a dot
                try:
                    if not entry.is_file(follow_symlinks=False):
                        skipped[entry.name] = _not_a_file(entry)
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # deleted between listing and stat
                found[entry.name] = _Seen(st.st_size, st.st_mtime_ns)
        return found, skipped

    def _log_skipped(self, skipped: dict[str, str]) -> None:
        """One WARNING per entry that is no regular file, when it first appears (not on every scan); one
        that goes and comes back is logged again."""
        for name in skipped.keys() - self._skipped:
            log.warning(
                "watched folder entry skipped: never read or answered",
                extra={"watcher": self.name, "file": name, "reason": skipped[name]},
            )
        self._skipped = set(skipped)

    async def _consider(self, name: str, seen: _Seen, stable: bool) -> None:
        path = self.folder / name
        if seen.size > MAX_FILE_BYTES:
            await self._consider_oversized(name, seen, stable)
            return
        try:
            content = await asyncio.to_thread(path.read_bytes)
        except OSError:
            return  # gone, or locked by its writer: next scan
        verdict = self.classify(content, stable)
        if verdict is not Verdict.HANDLE:
            return
        digest = hashlib.sha256(f"{name}\0{seen.mtime_ns}\0".encode() + content).hexdigest()
        await self._handle_once(name, digest, self.handle, content)

    async def _consider_oversized(self, name: str, seen: _Seen, stable: bool) -> None:
        """A file over the limit: refused through `oversized` once stable, from its first bytes only."""
        if not stable:
            log.warning(
                "file too large; ignored"
                if self.oversized is None
                else "file too large; refused once stable",
                extra={"watcher": self.name, "file": name, "bytes": seen.size},
            )
            return
        if self.oversized is None:
            return
        try:
            head = await asyncio.to_thread(_read_head, self.folder / name, MAX_FILE_BYTES)
        except OSError:
            return
        if self.oversized.classify(head) is not Verdict.HANDLE:
            return
        key = f"{name}\0{seen.mtime_ns}\0{seen.size}\0".encode()
        await self._handle_once(name, hashlib.sha256(key + head).hexdigest(), self.oversized.handle, head)

    async def _handle_once(self, name: str, digest: str, handle: Handle, content: bytes) -> None:
        """Claim this file version, hand it to `handle` and record the result (once across daemons)."""
        path = self.folder / name
        if digest in self._done:
            return
        try:
            claimed = await self._claim(digest, path)
        except StoreFileLost:
            # Nothing can be claimed, and a PMS waiting on its file (VDDS READY) would wait for good: it is
            # handed over unclaimed, once by this process, so the protocol answers with its error.
            claimed = True
        if not claimed:
            return
        self._done.add(digest)
        started = time.perf_counter()
        try:
            result = await handle(path, content)
        except Exception:
            log.exception("handling a watched file failed", extra={"watcher": self.name, "file": name})
            result = "error"
        with contextlib.suppress(StoreFileLost):  # logged once where it was found
            await self._record(digest, result)
        log.info(
            "watched file handled",
            extra={
                "watcher": self.name,
                "file": name,
                "result": result,
                "ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )

    async def _claim(self, digest: str, path: Path) -> bool:
        """Claim a file version in the store; False if another daemon (or a previous run) handled it."""

        def work(session: Session) -> bool:
            existing = session.scalars(q.processed_file(self.name, digest)).first()
            if existing is not None:
                if existing.result or utcnow() - existing.processed_at < STALE_CLAIM:
                    return False
                session.delete(existing)  # a claim cut off by a crash: take it over
                session.flush()
            session.add(
                ProcessedFile(
                    watcher=self.name, content_sha256=digest, path=str(path)[:1000], processed_at=utcnow()
                )
            )
            return True

        try:
            return await self.rt.db.write(work, watched=False)
        except IntegrityError as exc:
            if is_unique_violation(exc):
                return False
            raise

    async def _record(self, digest: str, result: str) -> None:
        def work(session: Session) -> None:
            record = session.scalars(q.processed_file(self.name, digest)).first()
            if record is not None:
                record.result = (result or "done")[:200]
            session.execute(q.forget_processed_files(self.name, utcnow() - FORGET_AFTER))

        await self.rt.db.write(work, watched=False)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` and wait until it has ended. A cancellation of the caller meanwhile still reaches
    the caller (`asyncio.wait` does not raise the task's own CancelledError, which suppressing it would
    confuse with the caller's)."""
    if task is not None:
        task.cancel()
        await asyncio.wait([task])


def _not_a_file(entry: os.DirEntry[str]) -> str:
    """Why a folder entry is not read (raises OSError when it vanished meanwhile)."""
    if entry.is_symlink():
        return "a symbolic link, never followed: it may lead out of the folder"
    if entry.is_dir(follow_symlinks=False):
        return "a folder, not a file"
    return "not a regular file (a device, pipe or socket)"


def _read_head(path: Path, limit: int) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(limit)
