"""The pool worker's side of an import: one file read once, its header mapped, its pixel data checked,
its bytes hashed and written to the store's staging folder; only facts go back (bridge.dicom.importer
runs the rest). Moving a file's bytes between processes would cost more than checking them.

The file is read into a block-aligned buffer and written from it (bridge.store.uncached.Held: no copy
between the read and the write). The write goes past the page cache and waits for the disk, so it runs
in a thread of the worker while the worker checks and hashes the same bytes, and, when a task holds
several files, while the worker reads and checks the next one: measured in docs/dicom.md
("Performance"), that wait would otherwise leave the worker's core idle for about half of each file. A
worker holds two files' bytes at once so (two of uncached's kept buffers), and a file over
OVERLAP_BELOW is written before the next one is read.

Every pool process imports this module when it starts, so it imports nothing of the daemon's (no
database, no service): a worker that starts during an import delays the files waiting for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from bridge.dicom import pixels, read, volume
from bridge.dicom.fileset import Candidate, OutsideFolders, Problem, open_inside
from bridge.imaging.analyze import Analysis, ImagingError, analyze_dicom, new_image
from bridge.model import NewImage
from bridge.store import uncached
from bridge.store.files import FileStore


@dataclass(frozen=True)
class Unreadable:
    """A file that cannot be imported: the problem, whether it is only skipped, its series if known."""

    problem: Problem
    skipped: bool = False
    series_uid: str = ""


@dataclass(frozen=True)
class Stored:
    """A file a pool worker checked completely and wrote to the store's staging folder: what the main
    process puts in place and adds to the store. `pending` is the file to flush and rename into place
    (staged by the worker, or the received upload itself).
    """

    facts: read.DicomFacts
    sha256: str
    analysis: Analysis
    size: int
    pending: str
    sources: tuple[str, ...] = ()  # the slices of a CT volume

    @property
    def paths(self) -> tuple[str, ...]:
        """The files this image came from, as reports name them."""
        return self.sources or (self.facts.display,)

    def new_image(self) -> NewImage:
        return new_image(self.analysis, self.sha256, self.size, self.facts.ingest_metadata())


Prepared = read.DicomFacts | Stored | Unreadable  # what a file became, as the main process gets it
OVERLAP_BELOW = 64 << 20  # bytes of a file whose write may run while the next file is read

_writer: ThreadPoolExecutor | None = None


def _write_behind(data: bytes | uncached.Held, store_root: str) -> tuple[Path, Future[None]]:
    """Start writing `data` to a new file of the store's staging folder in this worker's writer thread;
    the file and the write (its result raises the OSError of a failed write, the file then removed)."""
    global _writer
    if _writer is None:
        _writer = ThreadPoolExecutor(1, thread_name_prefix="stage")
    path = FileStore(Path(store_root)).staging_path()
    return path, _writer.submit(uncached.write_new, path, data)


@dataclass(frozen=True)
class _Writing:
    """A file checked and hashed whose write to the staging folder may still run: what it becomes is known
    once the write ended (`settle`), which also gives back the buffer the file was held in."""

    stored: Stored
    write: Future[None]
    held: uncached.Held | None = None

    def wait(self) -> None:
        """Wait for the write however it ends; its buffer is free then."""
        with contextlib.suppress(Exception):
            self.write.result()
        if self.held is not None:
            self.held.release()

    def settle(self) -> Stored | Unreadable:
        try:
            self.write.result()
        except OSError as exc:
            return Unreadable(Problem(self.stored.facts.display, f"cannot be stored: {exc.strerror or exc}"))
        finally:
            if self.held is not None:
                self.held.release()
        return self.stored


def _settled(result: Prepared | _Writing) -> Prepared:
    return result.settle() if isinstance(result, _Writing) else result


def _remove_staged(results: list[Prepared | _Writing], adopt: bool) -> None:
    """Remove the staged files of a task that failed midway, once their writes ended however they ended
    (an upload's own file stays: its request removes it)."""
    for result in results:
        if isinstance(result, _Writing):
            result.wait()
            result = result.stored
        if isinstance(result, Stored) and not adopt:
            with contextlib.suppress(OSError):
                Path(result.pending).unlink()


def _check_and_stage(
    facts: read.DicomFacts,
    data: bytes | uncached.Held,
    check: Callable[[], Analysis],
    store_root: str,
    adopt: bool,
) -> Stored | Unreadable | _Writing:
    """Check `data` (`check` raises ImagingError), hash it and write it to the store's staging folder,
    the write running beside the check and the hash and possibly still running when this returns (the
    _Writing then holds a Held `data` until it is settled); not flushed: the main process does that, off
    this worker. `adopt`: the file itself is an upload of ours, moved in later, so nothing is written."""
    content = data.view if isinstance(data, uncached.Held) else data
    if adopt:
        try:
            analysis = check()
        except ImagingError as exc:
            return Unreadable(Problem(facts.display, str(exc)))
        return Stored(facts, hashlib.sha256(content).hexdigest(), analysis, len(content), facts.path)
    try:
        staged, writing = _write_behind(data, store_root)
    except OSError as exc:
        return Unreadable(Problem(facts.display, f"cannot be stored: {exc.strerror or exc}"))
    try:
        analysis = check()
        sha256 = hashlib.sha256(content).hexdigest()
    except BaseException as exc:  # refused, or a decoder failing oddly: the staged file goes either way
        with contextlib.suppress(OSError):
            writing.result()
            staged.unlink()
        if isinstance(exc, ImagingError):
            return Unreadable(Problem(facts.display, str(exc)))
        raise
    held = data if isinstance(data, uncached.Held) else None
    return _Writing(Stored(facts, sha256, analysis, len(content), str(staged)), writing, held)


def _decode_and_stage(
    facts: read.DicomFacts, data: bytes, store_root: str, adopt: bool = False
) -> Stored | Unreadable:
    """Decode `data` completely (the check of what was not read as a file: a volume, a lone CT slice)."""
    stored = _check_and_stage(facts, data, lambda: analyze_dicom(data), store_root, adopt)
    return stored.settle() if isinstance(stored, _Writing) else stored


def _prepare(
    candidate: Candidate, id_tag: int, max_bytes: int, store_root: str, adopt: bool
) -> Prepared | _Writing:
    """One file's work in a pool worker: the file is read once, its header mapped, its pixel data checked
    (pixels), and its bytes hashed and staged (the write possibly still running, the file's buffer then
    released when it is settled); or its facts only (a CT slice: it is stacked later); or why it cannot be
    imported. Only facts go back to the main process, never the bytes."""
    try:
        file = read.read_file(
            candidate.path, candidate.display, id_tag, max_bytes, direct=adopt, within=candidate.within
        )
    except read.DicomError as exc:
        problem = Problem(candidate.display, str(exc))
        return Unreadable(problem, isinstance(exc, read.NotAnImage), exc.series_uid)
    result: Prepared | _Writing = file.facts
    try:
        if not file.facts.is_ct_slice:
            result = _check_and_stage(file.facts, file.held, lambda: pixels.check(file), store_root, adopt)
    finally:
        if not isinstance(result, _Writing):  # else released once the write has ended
            file.held.release()
    return result


def prepare_many(
    candidates: list[Candidate], id_tag: int, max_bytes: int, store_root: str, adopt: bool = False
) -> list[Prepared]:
    """`_prepare` for several files in one pool task, in order: each task costs the daemon a round trip to
    the pool (the executor's threads, a future, a wake-up of the event loop), which a few files share.
    A file's write runs on while the next file is read, checked and hashed (one write at a time)."""
    results: list[Prepared | _Writing] = []
    try:
        for candidate in candidates:
            results.append(_prepare(candidate, id_tag, max_bytes, store_root, adopt))
            last = results[-1]
            if isinstance(last, _Writing) and last.stored.size >= OVERLAP_BELOW:
                results[-1] = last.settle()
            if len(results) > 1:  # the write before this file's ends before the next file is read
                results[-2] = _settled(results[-2])
        return [_settled(result) for result in results]
    except BaseException:
        _remove_staged(results, adopt)
        raise


def store_file(
    facts: read.DicomFacts, store_root: str, adopt: bool = False, within: tuple[str, ...] = ()
) -> Stored | Unreadable:
    """A described file (a CT slice imported on its own) read, decoded and staged by a pool worker;
    `within` as in fileset.Candidate."""
    try:
        with os.fdopen(open_inside(facts.path, within), "rb") as file:
            data = file.read()
    except OSError as exc:
        return Unreadable(Problem(facts.display, f"cannot be read: {exc.strerror or exc}"))
    except OutsideFolders as exc:
        return Unreadable(Problem(facts.display, str(exc)))
    return _decode_and_stage(facts, data, store_root, adopt)


def prepare_volume(
    slices: list[tuple[str, str]], merged: read.DicomFacts, store_root: str, within: tuple[str, ...] = ()
) -> Stored | Unreadable:
    """A CT series stacked into one volume, decoded and staged, in a pool worker (VolumeError when it
    cannot be stacked); `within` as in fileset.Candidate."""
    stored = _decode_and_stage(merged, volume.build_volume(slices, within), store_root)
    return (
        replace(stored, sources=tuple(display for _path, display in slices))
        if isinstance(stored, Stored)
        else stored
    )
