"""An import of DICOM media into the store: `pms-bridge import PATH...` and `POST /api/v1/import`.

1. The files are found (fileset) in the imaging process pool; then each file's job runs in a pool worker
   (prepare; up to `FILES_PER_TASK` files per pool task): the file is read once, its header mapped (read),
   its pixel data checked (pixels: native grey data by its length, everything else decoded completely), its
   bytes hashed and written to the store's staging folder. Only facts come back: moving a file's bytes
   between processes costs more than checking them. The daemon flushes each file, renames it into place
   and flushes the folders holding its new name in a thread while the workers go on, so that a row never
   references a file a power cut would lose.
2. Each distinct patient (PMS id and demographics as the files carry them) goes through the service as an
   IMPORT request: found by the identity rules, created only under `allow_patient_creation`, never
   updated from a file, a conflict refused with the service's reason. A new patient is created together
   with its first images (`service.import_images`, one transaction): a patient none of whose images is
   added never exists (nothing half-imported remains).
3. A SOP Instance UID already stored is "already imported" when the bytes are the same, and refused when
   they differ (another object must not hide under a stored UID).
4. A patient's images are added through `service.add_images` in batches, one transaction each; a
   batch the store refuses is retried image by image, so one refused image does not hold back the others.
   An image is added completely or not at all: the files of images that were not added are removed again
   (unless a stored image has the same bytes).
5. A CT series of single-slice files is stacked into one volume (volume) in a worker; a series whose slices
   do not form one volume is imported slice by slice, and a series with a damaged slice is not imported.

Every file ends in the report: imported, skipped (with the reason) or refused (with the reason).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import IntegrityError

from bridge.dicom import read, volume
from bridge.dicom.fileset import Candidate, Problem, discover
from bridge.dicom.prepare import Stored, Unreadable, prepare_many, prepare_volume, store_file
from bridge.model import Action, Category, Demographics, ImageView, NewImage, Origin, PatientRequest, Status
from bridge.service import Refused
from bridge.store.db import is_unique_violation

if TYPE_CHECKING:
    from bridge.runtime import Runtime

log = logging.getLogger(__name__)
T = TypeVar("T")

BATCH = 50  # images per transaction
# Files per pool task when many are found at once (a folder, a DICOMDIR): a task per file spent about 1 ms
# of the daemon's CPU per file on the round trip to the pool, and each task's worker waits for its last
# file's write to the disk before it answers; four files per task was 9-15 % faster than one, sixteen
# (with the last tasks smaller, `task_bounds`) 3-4 % faster than four, in alternating runs of 100 files
# (docs/dicom.md, "Performance"). A worker that ends abruptly takes its task's files with it: they are
# reported, and imported when the import runs again.
FILES_PER_TASK = 16


def task_bounds(count: int, slots: int) -> list[tuple[int, int]]:
    """How `count` files found at once are cut into pool tasks, (start, end) each, dispatched in order to
    `slots` tasks at a time: a slot's share of the files left, at most `FILES_PER_TASK` and at least one.
    With tasks of one size to the end, one worker sat idle while the other finished its last task (11 ms
    of a 100-file import with tasks of four, median of 25 runs; 4 ms tapered: docs/dicom.md)."""
    bounds: list[tuple[int, int]] = []
    start = 0
    while start < count:
        size = max(1, min(FILES_PER_TASK, (count - start) // slots))
        bounds.append((start, start + size))
        start += size
    return bounds


class ImportAborted(Exception):
    """The import cannot start (a setting is wrong); nothing was read or stored."""


class _PatientRefused(Exception):
    """A new patient was refused when its first images came (its identity changed since the look-up:
    a conflict, creation switched off); the message is the problem its files are reported with."""


@dataclass(frozen=True)
class Imported:
    """One image added to the store; `files` > 1 for a CT volume stacked from that many slices."""

    path: str
    image_id: int
    patient_id: int
    pms_id: str
    category: str
    frames: int
    files: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "image_id": self.image_id,
            "patient_id": self.patient_id,
            "pms_id": self.pms_id,
            "category": self.category,
            "frames": self.frames,
            "files": self.files,
        }


@dataclass
class ImportReport:
    """Every file of an import: imported, skipped on purpose, or refused; notes explain choices made."""

    imported: list[Imported] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def problems(items: list[Problem]) -> list[dict[str, str]]:
            return [{"path": p.path, "reason": p.reason} for p in items]

        return {
            "imported": [i.to_json() for i in self.imported],
            "skipped": problems(self.skipped),
            "errors": problems(self.errors),
            "notes": problems(self.notes),
            "summary": {
                "images": len(self.imported),
                "files": sum(i.files for i in self.imported),
                "skipped": len(self.skipped),
                "errors": len(self.errors),
            },
        }


# `[dicom] patient_id_tag` values already checked against the DICOM dictionary, by the pool (where pydicom is
# imported): an upload a file per request would otherwise pay a round trip to a pool worker for each.
_RESOLVED_ID_TAGS: dict[str, int] = {}


@dataclass
class _Patient:
    """A file's patient as this import knows it: `patient_id` once it is in the store (found, or created
    with images of this import: never the id of a rolled-back creation), `problem` when it is refused,
    neither while it is new (to be created with its first images)."""

    patient_id: int | None = None
    problem: str = ""


class Importer:
    """One import run against a runtime (the daemon's, or one a CLI command built).

    `adopt`: the files are the bridge's own temporary copies on the image store's file system (an
    upload), so they are moved into the store rather than copied. Never for a user's files.
    """

    def __init__(
        self,
        rt: Runtime,
        origin: Origin,
        *,
        concurrency: int = 4,
        adopt: bool = False,
        within: tuple[str, ...] = (),
    ) -> None:
        """`adopt`: the files are uploads of ours, moved into the store (not copied); `within`: the only
        folders (resolved) files may be read from (`fileset.discover`)."""
        self.rt = rt
        self.origin = origin
        self.adopt = adopt
        self.within = within
        self.settings = rt.settings.dicom
        self.report = ImportReport()
        self._concurrency = max(1, concurrency)
        self._slots = asyncio.Semaphore(self._concurrency)
        self._patients: dict[tuple[str, Demographics], _Patient] = {}
        self._patient_lock = asyncio.Lock()
        self._pending: dict[tuple[str, Demographics], list[Stored]] = defaultdict(list)
        self._flush_locks: dict[tuple[str, Demographics], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._series: dict[tuple[str, str], list[read.DicomFacts]] = defaultdict(list)
        self._damaged: dict[str, str] = {}  # series UID -> a damaged file of it
        self._id_tag: int | None = None
        self._discoveries: list[asyncio.Task[None]] = []
        self._files: list[asyncio.Task[None]] = []
        self._committing: set[asyncio.Future[Path]] = set()  # files being flushed and renamed into place

    async def run(self, sources: list[tuple[str, str]]) -> ImportReport:
        """Import `sources` (path, name to report it by); the report says what became of every file."""
        await self.add(sources)
        return await self.finish()

    async def add(self, sources: list[tuple[str, str]]) -> None:
        """Start importing the files of `sources` while more may come (an upload still arriving): the
        caller goes on at once (its next part need not wait for this one's files to be found)."""
        if self._id_tag is None:
            self._id_tag = await self._resolve_id_tag()
        self._discoveries.append(asyncio.create_task(self._discover(sources)))

    async def _resolve_id_tag(self) -> int:
        """The tag of `[dicom] patient_id_tag`; ImportAborted when the setting names no usable attribute."""
        name = self.settings.patient_id_tag
        known = _RESOLVED_ID_TAGS.get(name)
        if known is not None:
            return known
        try:
            tag, _keyword = await self.rt.imaging.run_in_pool(read.resolve_id_tag, name)
        except ValueError as exc:
            raise ImportAborted(str(exc)) from None
        _RESOLVED_ID_TAGS[name] = tag
        return tag

    async def _discover(self, sources: list[tuple[str, str]]) -> None:
        found = await self.rt.imaging.run_in_pool(discover, sources, self.within)
        self.report.errors.extend(found.errors)
        self.report.skipped.extend(found.skipped)
        found_files = found.candidates
        self._files += [
            asyncio.create_task(self._prepare(found_files[start:end]))
            for start, end in task_bounds(len(found_files), self._concurrency)
        ]

    async def finish(self) -> ImportReport:
        """Wait for every file added, add what waits in batches, stack the CT series; the report."""
        try:
            await asyncio.gather(*self._discoveries)
            await asyncio.gather(*self._files)
        except asyncio.CancelledError:
            await self._abandon()
            raise
        await asyncio.gather(*(self._flush(key) for key in list(self._pending)))
        await asyncio.gather(*(self._volume(group) for group in self._series.values()))
        for problems in (self.report.skipped, self.report.errors, self.report.notes):
            problems.sort(key=lambda item: item.path)
        self.report.imported.sort(key=lambda item: item.path)
        return self.report

    async def _abandon(self) -> None:
        """An import cancelled while its files were still being read (Ctrl-C on `pms-bridge import`): the
        files already put in place for images not added yet are removed again (unless a stored image has
        the same bytes), so the store keeps no file that no image references. What a pool task still
        running stages stays in the staging folder, which `pms-bridge serve` sweeps."""
        tasks = [*self._discoveries, *self._files]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._committing, return_exceptions=True)  # renames still running in threads
        waiting = [stored for batch in self._pending.values() for stored in batch]
        self._pending.clear()
        self.rt.imaging.release([stored.sha256 for stored in waiting])
        await self._discard(waiting)

    async def _prepare(self, candidates: list[Candidate]) -> None:
        """Prepare files in one pool task and queue what each became."""
        max_bytes = self.settings.max_file_mb * 1024 * 1024
        root = str(self.rt.files.root)
        assert self._id_tag is not None  # add() resolves it before any file is scheduled
        results = await self._in_pool(
            [c.display for c in candidates],
            prepare_many,
            candidates,
            self._id_tag,
            max_bytes,
            root,
            self.adopt,
        )
        # at once: each stored file waits for the disk while it is flushed and put in place (`_commit`)
        await asyncio.gather(*(self._take(result) for result in results or []))

    async def _in_pool(self, paths: Sequence[str], fn: Callable[..., T], *args: Any) -> T | None:
        """`fn(*args)` in the imaging pool for the files `paths`, in one of this import's slots; None, with
        each file reported, when the task fails in a way no check foresees: its worker out of memory, or
        ended abruptly (the system's out-of-memory killer, a decoder crashing). The import's other files go
        on and are added; the task removed what it had staged. A CT volume's own errors are raised."""
        try:
            async with self._slots:
                return await self.rt.imaging.run_in_pool(fn, *args)
        except volume.VolumeError:
            raise
        except Exception as exc:
            log.error("import task failed", exc_info=exc, extra={"files": len(paths)})
            reason = f"could not be checked: {_unforeseen(exc)}"
            self.report.errors.extend(Problem(path, reason) for path in paths)
            return None

    async def _take(self, result: read.DicomFacts | Stored | Unreadable) -> None:
        """Report a file that cannot be imported, queue a stored one, keep a CT slice for its volume."""
        if isinstance(result, Unreadable):
            (self.report.skipped if result.skipped else self.report.errors).append(result.problem)
            if result.series_uid:
                self._damaged.setdefault(result.series_uid, result.problem.path)
        elif isinstance(result, Stored):
            if await self._commit(result):
                await self._queue(result)
        else:
            self._series[(result.series_uid, result.pms_id)].append(result)

    async def _commit(self, stored: Stored) -> bool:
        """Flush a worker's file to disk, rename it into place and flush the folders that hold its name,
        in a thread while the workers read on (an fsync in a worker would leave its core idle), so that no
        row can reference a file a power cut would lose; False, with the file reported and whatever was
        put in place removed again, when that fails."""
        await self.rt.imaging.claim([stored.sha256])  # released when its batch is added or given up
        staged, ext = Path(stored.pending), stored.analysis.file_ext
        commit = asyncio.ensure_future(asyncio.to_thread(self.rt.files.commit, staged, stored.sha256, ext))
        self._committing.add(commit)
        commit.add_done_callback(self._committing.discard)
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            # the thread goes on to put the file in place: queued, so that `_abandon` removes it
            self._pending[(stored.facts.pms_id, stored.facts.demographics)].append(stored)
            raise
        except OSError as exc:
            self.rt.imaging.release([stored.sha256])
            reason = f"cannot be stored: {exc.strerror or exc}"
            self.report.errors.extend(Problem(path, reason) for path in stored.paths)
            await self._discard([stored])  # renamed into place, its name not flushed: removed
            return False
        return True

    async def _queue(self, stored: Stored) -> None:
        key = (stored.facts.pms_id, stored.facts.demographics)
        self._pending[key].append(stored)
        if len(self._pending[key]) >= BATCH:
            await self._flush(key)

    def _request(self, facts: read.DicomFacts) -> PatientRequest:
        """The IMPORT request of a file's patient."""
        return PatientRequest(
            action=Action.IMPORT,
            origin=self.origin,
            pms_system=self.settings.pms_system,
            pms_id=facts.pms_id,
            practice_id=self.settings.practice_id,
            demographics=facts.demographics,
            silent=True,
        )

    async def _patient(self, facts: read.DicomFacts) -> _Patient:
        """The patient a file belongs to, looked up once per (PMS id, demographics) through the service."""
        key = (facts.pms_id, facts.demographics)
        async with self._patient_lock:
            known = self._patients.get(key)
            if known is None:
                known = self._patients[key] = await self._look_up(facts)
        return known

    async def _look_up(self, facts: read.DicomFacts) -> _Patient:
        """Find a file's patient without creating it: an IMPORT request is NOT_FOUND for a new patient
        that the import may create (with its first images)."""
        outcome = await self.rt.service.handle(self._request(facts))
        if outcome.status.ok and outcome.patient is not None:
            return _Patient(outcome.patient.id)
        if outcome.status is Status.NOT_FOUND:
            return _Patient()
        return _Patient(None, self._problem(facts, outcome.message))

    @staticmethod
    def _problem(facts: read.DicomFacts, message: str) -> str:
        return f"patient {facts.pms_id!r}: {message}"

    async def _owner(self, patient: _Patient, facts: read.DicomFacts) -> int | None:
        """The id to tell this import's own stored instances from another patient's. A patient still new
        to this import is looked up again first: another import may have created it (and stored the
        same files) meanwhile, which makes them "already imported", not another patient's."""
        if patient.patient_id is None and not patient.problem:
            found = await self._look_up(facts)
            patient.patient_id, patient.problem = found.patient_id, found.problem
        return patient.patient_id

    async def _insert(
        self, patient: _Patient, facts: read.DicomFacts, new: list[NewImage]
    ) -> list[ImageView]:
        """Add images to their patient; a new one is created in the same transaction (and known from then
        on). Raises as `service.add_images`; `_PatientRefused` when the patient is refused (a conflict
        since the look-up, or one met while the images before these were added)."""
        if patient.problem:
            raise _PatientRefused(patient.problem)
        if patient.patient_id is not None:
            return await self.rt.service.add_images(self.origin, patient.patient_id, new)
        outcome, views = await self.rt.service.import_images(self._request(facts), new)
        if not outcome.status.ok or outcome.patient is None:
            patient.problem = self._problem(facts, outcome.message)
            raise _PatientRefused(patient.problem)
        patient.patient_id = outcome.patient.id  # committed with `views`
        return views

    async def _flush(self, key: tuple[str, Demographics]) -> None:
        """Add a patient's waiting images to the store; remove the files of those that were not added."""
        async with self._flush_locks[key]:
            batch, self._pending[key] = self._pending[key], []
            if not batch:
                return
            patient = await self._patient(batch[0].facts)
            added: list[Stored] = []
            try:
                if patient.problem:
                    self._refuse(batch, patient.problem)
                else:
                    added = await self._add(patient, batch)
            finally:
                self.rt.imaging.release([s.sha256 for s in batch])
                kept = {id(s) for s in added}
                await self._discard([s for s in batch if id(s) not in kept])

    def _refuse(self, stored: Sequence[Stored], reason: str) -> None:
        """Report the files of images not added for `reason`."""
        self.report.errors.extend(Problem(path, reason) for s in stored for path in s.paths)

    async def _add(self, patient: _Patient, batch: list[Stored]) -> list[Stored]:
        """Add the images of one patient that are not stored yet; the ones added."""
        facts = batch[0].facts
        known = await self.rt.service.stored_instances([s.facts.sop_instance_uid for s in batch])
        patient_id = await self._owner(patient, facts) if known else patient.patient_id
        if patient.problem:
            self._refuse(batch, patient.problem)
            return []
        fresh: dict[str, Stored] = {}
        for stored in batch:
            uid = stored.facts.sop_instance_uid
            if uid in known:
                owner, stored_sha = known[uid]
                self._duplicate(stored.paths, uid, owner != patient_id, stored_sha, stored.sha256)
            elif uid in fresh:  # the same instance twice in one import
                self._duplicate(stored.paths, uid, False, fresh[uid].sha256, stored.sha256)
            else:
                fresh[uid] = stored
        todo = list(fresh.values())
        if not todo:
            return []
        try:
            views = await self._insert(patient, facts, [s.new_image() for s in todo])
        except _PatientRefused as refused:
            self._refuse(todo, str(refused))
            return []
        except (Refused, IntegrityError) as exc:
            if isinstance(exc, IntegrityError) and not is_unique_violation(exc):
                raise
            # one at a time: a new patient is created with the first image added, never by a refused one
            return [s for s in todo if await self._add_one(patient, s)]
        await self._added(todo, views)
        return todo

    async def _add_one(self, patient: _Patient, stored: Stored) -> bool:
        """Add one image on its own (its batch was refused); True when it was added."""
        try:
            views = await self._insert(patient, stored.facts, [stored.new_image()])
        except _PatientRefused as refused:
            self._refuse([stored], str(refused))
            return False
        except Refused as refused:
            self.report.errors.append(Problem(stored.facts.display, refused.outcome.message))
            return False
        except IntegrityError as exc:  # stored meanwhile by another import
            if not is_unique_violation(exc):
                raise
            uid = stored.facts.sop_instance_uid
            found = await self.rt.service.stored_instances([uid])
            if uid not in found:
                raise
            owner, stored_sha = found[uid]
            another = owner != await self._owner(patient, stored.facts)
            self._duplicate(stored.paths, uid, another, stored_sha, stored.sha256)
            return False
        await self._added([stored], views)
        return True

    async def _added(self, stored: list[Stored], views: list[ImageView]) -> None:
        for item, view in zip(stored, views, strict=True):
            self.report.imported.append(
                Imported(
                    path=item.facts.display,
                    image_id=view.id,
                    patient_id=view.patient_id,
                    pms_id=item.facts.pms_id,
                    category=view.category.value,
                    frames=view.frames,
                    files=len(item.paths),
                )
            )
            if self.settings.render_at_import:  # the cached renderings a PMS asks for first
                await self.rt.imaging.thumbnail(view)
                await self.rt.imaging.preview(view)

    def _duplicate(
        self, paths: Sequence[str], uid: str, another_patient: bool, stored_sha: str, sha256: str | None
    ) -> None:
        """Report an instance already stored (for `another_patient`, or for this file's patient, with
        `stored_sha`): skipped when it is the same, refused otherwise. `sha256` None: the bytes need no
        comparing (a volume is the same whenever its slices are)."""
        if another_patient:
            reason = f"SOP Instance UID {uid} is already stored for another patient"
        elif sha256 is not None and stored_sha != sha256:
            reason = f"SOP Instance UID {uid} is already stored with other content"
        else:
            self.report.skipped.extend(Problem(path, "already imported") for path in paths)
            return
        self.report.errors.extend(Problem(path, reason) for path in paths)

    async def _discard(self, stored: Sequence[Stored]) -> None:
        """Remove the files of images that were not added, unless a stored image has the same bytes."""
        if not stored:
            return
        await self.rt.imaging.discard(self.rt.service, [s.new_image() for s in stored])

    async def _volume(self, group: list[read.DicomFacts]) -> None:
        """Stack a CT series into one volume and import it; slice by slice when it is not one volume."""
        first = min(group, key=lambda f: f.display)
        if first.series_uid in self._damaged:
            damaged = self._damaged[first.series_uid]
            self.report.errors.extend(
                Problem(f.display, f"not imported: a slice of its CT series is damaged ({damaged})")
                for f in group
            )
            return
        uid = volume.volume_uid([f.sop_instance_uid for f in group])
        patient = await self._patient(first)
        stored = None if patient.problem else (await self.rt.service.stored_instances([uid])).get(uid)
        another = stored is not None and stored[0] != await self._owner(patient, first)
        if patient.problem:
            self.report.errors.extend(Problem(f.display, patient.problem) for f in group)
            return
        if stored is not None:  # the same slices always make the same volume: no need to stack them again
            self._duplicate([f.display for f in group], uid, another, stored[1], None)
            return
        times = [f.captured_at for f in group if f.captured_at is not None]
        merged = replace(
            first,
            sop_instance_uid=uid,
            category=Category.CBCT,
            frames=len(group),
            captured_at=min(times) if times else None,
            attributes={**first.attributes, "source_series": first.series_uid, "source_files": len(group)},
        )
        slices = [(f.path, f.display) for f in group]
        root = str(self.rt.files.root)
        try:
            result = await self._in_pool(
                [f.display for f in group], prepare_volume, slices, merged, root, self.within
            )
        except volume.NotOneVolume as exc:
            self.report.notes.append(
                Problem(
                    exc.path,
                    f"CT series {first.series_uid}: this slice {exc.reason}, so the series' {len(group)}"
                    " slices are imported one by one rather than as one volume",
                )
            )
            await asyncio.gather(*(self._slice(facts) for facts in group))
            return
        except volume.VolumeError as exc:
            self.report.errors.append(Problem(exc.path, exc.reason))
            self.report.errors.extend(
                Problem(f.display, f"not imported: a slice of its CT series is damaged ({exc.path})")
                for f in group
                if f.display != exc.path
            )
            return
        if result is None:
            return
        if isinstance(result, Unreadable):
            self.report.errors.extend(Problem(f.display, result.problem.reason) for f in group)
            return
        if not await self._commit(result):
            return
        key = (merged.pms_id, merged.demographics)
        self._pending[key].append(result)
        await self._flush(key)

    async def _slice(self, facts: read.DicomFacts) -> None:
        """A CT slice imported on its own: decoded and stored in the pool like any other file."""
        result = await self._in_pool(
            [facts.display], store_file, facts, str(self.rt.files.root), self.adopt, self.within
        )
        if result is None:
            return
        if isinstance(result, Unreadable):
            self.report.errors.append(result.problem)
            return
        if not await self._commit(result):
            return
        key = (facts.pms_id, facts.demographics)
        self._pending[key].append(result)
        await self._flush(key)


def _unforeseen(exc: Exception) -> str:
    """What a report says of a pool task that failed in a way no check foresees."""
    if isinstance(exc, BrokenProcessPool):
        return (
            "its imaging worker ended abruptly (out of memory, or a decoder crashed on this file or on one"
            " checked beside it); import it again"
        )
    if isinstance(exc, MemoryError):
        return "out of memory while it was checked; import it again, or with fewer files at once"
    return f"{type(exc).__name__}: {exc}"
