"""An import of DICOM media into the store: `pms-bridge import PATH...` and `POST /api/v1/import`.

1. Find the files (fileset) and read their headers (read), in the imaging process pool.
2. Each distinct patient (PMS id and demographics as the files carry them) goes through the service as an
   IMPORT request: found by the identity rules, created only under `allow_patient_creation`, never
   updated from a file, a conflict refused with the service's reason.
3. A SOP Instance UID already stored is "already imported" when the bytes are the same, and refused when
   they differ (another object must not hide under a stored UID).
4. Each image goes through `Imaging.ingest_all`: decoded completely, stored byte for byte, added to the
   patient in one transaction, or not at all. A CT series of single-slice files is stacked into one volume
   first (volume); a series whose slices do not form one volume is imported slice by slice, and a series
   with a damaged slice is not imported.

Every file ends in the report: imported, skipped (with the reason) or refused (with the reason).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError

from bridge.dicom import read, volume
from bridge.dicom.fileset import Candidate, Problem, discover
from bridge.imaging.analyze import ImagingError
from bridge.model import Action, Category, Demographics, Origin, PatientRequest
from bridge.service import Refused
from bridge.store.db import is_unique_violation

if TYPE_CHECKING:
    from bridge.runtime import Runtime

log = logging.getLogger(__name__)

HEADERS_PER_TASK = 32
UID_BATCH = 500


class ImportAborted(Exception):
    """The import cannot start (a setting is wrong); nothing was read or stored."""


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


@dataclass(frozen=True)
class Unreadable:
    """A file whose header was refused: the problem, whether it is only skipped, its series if known."""

    problem: Problem
    skipped: bool = False
    series_uid: str = ""


def read_headers(
    candidates: list[Candidate], id_tag: int, max_bytes: int
) -> list[read.DicomFacts | Unreadable]:
    """The facts of each candidate, or why it cannot be imported; runs in the pool."""
    results: list[read.DicomFacts | Unreadable] = []
    for candidate in candidates:
        try:
            results.append(read.read_header(candidate.path, candidate.display, id_tag, max_bytes))
        except read.DicomError as exc:
            problem = Problem(candidate.display, str(exc))
            results.append(Unreadable(problem, isinstance(exc, read.NotAnImage), exc.series_uid))
    return results


@dataclass
class _Patient:
    patient_id: int | None
    problem: str = ""


class Importer:
    """One import run against a runtime (the daemon's, or one a CLI command built)."""

    def __init__(self, rt: Runtime, origin: Origin, *, concurrency: int = 4) -> None:
        self.rt = rt
        self.origin = origin
        self.settings = rt.settings.dicom
        self.report = ImportReport()
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._volume_slot = asyncio.Semaphore(1)  # volumes hold a whole series in memory
        self._patients: dict[tuple[str, Demographics], _Patient] = {}
        self._patient_lock = asyncio.Lock()
        self._stored: dict[str, tuple[int, str]] = {}

    async def run(self, sources: list[tuple[str, str]]) -> ImportReport:
        """Import `sources` (path, name to report it by); the report says what became of every file."""
        imaging = self.rt.imaging
        try:
            id_tag, _keyword = await imaging.run_in_pool(read.resolve_id_tag, self.settings.patient_id_tag)
        except ValueError as exc:
            raise ImportAborted(str(exc)) from None
        found = await imaging.run_in_pool(discover, sources)
        self.report.errors.extend(found.errors)
        self.report.skipped.extend(found.skipped)
        chunks = [
            found.candidates[i : i + HEADERS_PER_TASK]
            for i in range(0, len(found.candidates), HEADERS_PER_TASK)
        ]
        max_bytes = self.settings.max_file_mb * 1024 * 1024
        results = await asyncio.gather(
            *(imaging.run_in_pool(read_headers, c, id_tag, max_bytes) for c in chunks)
        )
        singles: list[read.DicomFacts] = []
        series: dict[tuple[str, str], list[read.DicomFacts]] = defaultdict(list)
        damaged: dict[str, str] = {}  # series UID -> a damaged file of it
        for result in (item for chunk in results for item in chunk):
            if isinstance(result, read.DicomFacts):
                if result.is_ct_slice:
                    series[(result.series_uid, result.pms_id)].append(result)
                else:
                    singles.append(result)
            else:
                (self.report.skipped if result.skipped else self.report.errors).append(result.problem)
                if result.series_uid:
                    damaged.setdefault(result.series_uid, result.problem.path)
        for key in [key for key in series if key[0] in damaged]:
            self.report.errors.extend(
                Problem(f.display, f"not imported: a slice of its CT series is damaged ({damaged[key[0]]})")
                for f in series.pop(key)
            )
        uids = [f.sop_instance_uid for f in singles]
        uids += [volume.volume_uid([f.sop_instance_uid for f in group]) for group in series.values()]
        await self._load_stored(uids)
        await asyncio.gather(
            *(self._single(facts) for facts in singles),
            *(self._series(group) for group in series.values()),
        )
        for problems in (self.report.skipped, self.report.errors, self.report.notes):
            problems.sort(key=lambda item: item.path)
        self.report.imported.sort(key=lambda item: item.path)
        return self.report

    async def _load_stored(self, uids: list[str]) -> None:
        for start in range(0, len(uids), UID_BATCH):
            self._stored.update(await self.rt.service.stored_instances(uids[start : start + UID_BATCH]))

    async def _patient(self, facts: read.DicomFacts) -> _Patient:
        """The patient a file belongs to, resolved once per (PMS id, demographics) through the service."""
        key = (facts.pms_id, facts.demographics)
        async with self._patient_lock:
            known = self._patients.get(key)
            if known is None:
                request = PatientRequest(
                    action=Action.IMPORT,
                    origin=self.origin,
                    pms_system=self.settings.pms_system,
                    pms_id=facts.pms_id,
                    practice_id=self.settings.practice_id,
                    demographics=facts.demographics,
                    silent=True,
                )
                outcome = await self.rt.service.handle(request)
                if outcome.status.ok and outcome.patient is not None:
                    known = _Patient(outcome.patient.id)
                else:
                    known = _Patient(None, f"patient {facts.pms_id!r}: {outcome.message}")
                self._patients[key] = known
        return known

    def _duplicate(self, facts: read.DicomFacts, sop_uid: str, patient_id: int, sha256: str | None) -> bool:
        """True when the instance is already stored (reported); a conflicting copy is an error."""
        stored = self._stored.get(sop_uid)
        if stored is None:
            return False
        stored_patient, stored_sha = stored
        if stored_patient != patient_id:
            self.report.errors.append(
                Problem(facts.display, f"SOP Instance UID {sop_uid} is already stored for another patient")
            )
        elif sha256 is not None and stored_sha != sha256:
            self.report.errors.append(
                Problem(facts.display, f"SOP Instance UID {sop_uid} is already stored with other content")
            )
        else:
            self.report.skipped.append(Problem(facts.display, "already imported"))
        return True

    async def _single(self, facts: read.DicomFacts) -> None:
        async with self._slots:
            patient = await self._patient(facts)
            if patient.patient_id is None:
                self.report.errors.append(Problem(facts.display, patient.problem))
                return
            try:
                data = await asyncio.to_thread(Path(facts.path).read_bytes)
            except OSError as exc:
                self.report.errors.append(Problem(facts.display, f"cannot be read: {exc.strerror or exc}"))
                return
            sha256 = hashlib.sha256(data).hexdigest()
            if self._duplicate(facts, facts.sop_instance_uid, patient.patient_id, sha256):
                return
            await self._ingest(facts, patient.patient_id, data, files=1)

    async def _series(self, group: list[read.DicomFacts]) -> None:
        """Stack a CT series into one volume and import it; slice by slice when it is not one volume."""
        first = min(group, key=lambda f: f.display)
        patient = await self._patient(first)
        if patient.patient_id is None:
            self.report.errors.extend(Problem(f.display, patient.problem) for f in group)
            return
        uid = volume.volume_uid([f.sop_instance_uid for f in group])
        if self._duplicate(first, uid, patient.patient_id, None):
            self.report.skipped.extend(
                Problem(f.display, "already imported") for f in group if f is not first
            )
            return
        async with self._volume_slot:
            try:
                data = await self.rt.imaging.run_in_pool(
                    volume.build_volume, [(f.path, f.display) for f in group]
                )
            except volume.NotOneVolume as exc:
                self.report.notes.append(
                    Problem(
                        exc.path,
                        f"CT series {first.series_uid}: this slice {exc.reason}, so the series' {len(group)}"
                        " slices are imported one by one rather than as one volume",
                    )
                )
                await asyncio.gather(*(self._single(facts) for facts in group))
                return
            except volume.VolumeError as exc:
                self.report.errors.append(Problem(exc.path, exc.reason))
                self.report.errors.extend(
                    Problem(f.display, f"not imported: a slice of its CT series is damaged ({exc.path})")
                    for f in group
                    if f.display != exc.path
                )
                return
            times = [f.captured_at for f in group if f.captured_at is not None]
            merged = replace(
                first,
                sop_instance_uid=uid,
                category=Category.CBCT,
                frames=len(group),
                captured_at=min(times) if times else None,
                attributes={
                    **first.attributes,
                    "source_series": first.series_uid,
                    "source_files": len(group),
                },
            )
            await self._ingest(merged, patient.patient_id, data, files=len(group))

    async def _ingest(self, facts: read.DicomFacts, patient_id: int, data: bytes, *, files: int) -> None:
        """Store one image through the imaging pipeline; a lost race on a new study is retried once."""
        imaging = self.rt.imaging
        for attempt in (1, 2):
            try:
                added = await imaging.ingest_all(
                    self.rt.service,
                    self.origin,
                    patient_id,
                    [(facts.display, data)],
                    render=self.settings.render_at_import,
                    **facts.ingest_metadata(),
                )
            except ImagingError as exc:
                reason = str(exc).removeprefix(f"{facts.display}: ")
                self.report.errors.append(Problem(facts.display, reason))
                return
            except Refused as refused:
                self.report.errors.append(Problem(facts.display, refused.outcome.message))
                return
            except IntegrityError as exc:
                # Two images of one new study or series arrived at once and the other created it first;
                # or the same instance sits in the import twice. Look again and retry once.
                if attempt == 2 or not is_unique_violation(exc):
                    raise
                await self._load_stored([facts.sop_instance_uid])
                if self._duplicate(
                    facts, facts.sop_instance_uid, patient_id, hashlib.sha256(data).hexdigest()
                ):
                    return
                continue
            view = added[0]
            self._stored[view.sop_instance_uid] = (patient_id, view.sha256)
            self.report.imported.append(
                Imported(
                    path=facts.display,
                    image_id=view.id,
                    patient_id=patient_id,
                    pms_id=facts.pms_id,
                    category=view.category.value,
                    frames=view.frames,
                    files=files,
                )
            )
            return
