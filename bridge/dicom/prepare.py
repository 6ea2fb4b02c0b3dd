"""The pool worker's side of an import: one file read once, its header mapped, its pixel data checked,
its bytes hashed and written next to their place in the store; only facts go back (bridge.dicom.importer
runs the rest). Moving a file's bytes between processes would cost more than checking them.

Every pool process imports this module when it starts, so it imports nothing of the daemon's (no
database, no service): a worker that starts during an import delays the files waiting for it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from bridge.dicom import pixels, read, volume
from bridge.dicom.fileset import Candidate, Problem
from bridge.imaging.analyze import Analysis, ImagingError, analyze_dicom, new_image
from bridge.model import NewImage
from bridge.store.files import FileStore


@dataclass(frozen=True)
class Unreadable:
    """A file that cannot be imported: the problem, whether it is only skipped, its series if known."""

    problem: Problem
    skipped: bool = False
    series_uid: str = ""


@dataclass(frozen=True)
class Stored:
    """A file a pool worker checked completely and wrote next to its place in the store: what the main
    process puts in place and adds to the store. `pending` is the file to flush and rename into place
    (staged by the worker, or the received upload itself); empty when the store holds the bytes already.
    """

    facts: read.DicomFacts
    sha256: str
    analysis: Analysis
    size: int
    pending: str = ""
    sources: tuple[str, ...] = ()  # the slices of a CT volume

    @property
    def paths(self) -> tuple[str, ...]:
        """The files this image came from, as reports name them."""
        return self.sources or (self.facts.display,)

    def new_image(self) -> NewImage:
        return new_image(self.analysis, self.sha256, self.size, self.facts.ingest_metadata())


def _stage(
    facts: read.DicomFacts, data: bytes, analysis: Analysis, store_root: str, adopt: bool
) -> Stored | Unreadable:
    """Hash checked bytes and write them next to their place in the store (not flushed yet: the main
    process does that, off this worker); `adopt`: the file itself is an upload of ours, moved in later."""
    sha256 = hashlib.sha256(data).hexdigest()
    if adopt:
        return Stored(facts, sha256, analysis, len(data), facts.path)
    try:
        staged = FileStore(Path(store_root)).stage(data, sha256, analysis.file_ext)
    except OSError as exc:
        return Unreadable(Problem(facts.display, f"cannot be stored: {exc.strerror or exc}"))
    return Stored(facts, sha256, analysis, len(data), str(staged or ""))


def _decode_and_stage(
    facts: read.DicomFacts, data: bytes, store_root: str, adopt: bool = False
) -> Stored | Unreadable:
    """Decode `data` completely (the check of what was not read as a file: a volume, a lone CT slice)."""
    try:
        analysis = analyze_dicom(data)
    except ImagingError as exc:
        return Unreadable(Problem(facts.display, str(exc)))
    return _stage(facts, data, analysis, store_root, adopt)


def prepare(
    candidate: Candidate, id_tag: int, max_bytes: int, store_root: str, adopt: bool = False
) -> read.DicomFacts | Stored | Unreadable:
    """One file's work in a pool worker: the file is read once, its header mapped, its pixel data checked
    (pixels), and its bytes hashed and staged; or its facts only (a CT slice: it is stacked later); or
    why it cannot be imported. Only facts go back to the main process, never the bytes."""
    try:
        file = read.read_file(candidate.path, candidate.display, id_tag, max_bytes, direct=adopt)
    except read.DicomError as exc:
        problem = Problem(candidate.display, str(exc))
        return Unreadable(problem, isinstance(exc, read.NotAnImage), exc.series_uid)
    if file.facts.is_ct_slice:
        return file.facts
    try:
        analysis = pixels.check(file)
    except ImagingError as exc:
        return Unreadable(Problem(candidate.display, str(exc)))
    return _stage(file.facts, file.data, analysis, store_root, adopt)


def store_file(facts: read.DicomFacts, store_root: str, adopt: bool = False) -> Stored | Unreadable:
    """A described file (a CT slice imported on its own) read, decoded and staged by a pool worker."""
    try:
        data = Path(facts.path).read_bytes()
    except OSError as exc:
        return Unreadable(Problem(facts.display, f"cannot be read: {exc.strerror or exc}"))
    return _decode_and_stage(facts, data, store_root, adopt)


def prepare_volume(
    slices: list[tuple[str, str]], merged: read.DicomFacts, store_root: str
) -> Stored | Unreadable:
    """A CT series stacked into one volume, decoded and staged, in a pool worker (VolumeError when it
    cannot be stacked)."""
    stored = _decode_and_stage(merged, volume.build_volume(slices), store_root)
    return (
        replace(stored, sources=tuple(display for _path, display in slices))
        if isinstance(stored, Stored)
        else stored
    )
