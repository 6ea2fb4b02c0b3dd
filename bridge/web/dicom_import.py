"""`POST /api/v1/import`: DICOM media over HTTP, for viewers and PMSs that are not on the bridge's machine.

The body is multipart/form-data with parts named `file`: DICOM files, or zips of a file set (a DICOMDIR
and its folders, or plain files). Parts are streamed to a private temporary folder inside the image store
(never held in memory; on the store's file system, so a stored file is the received one moved in, not a
second copy) under the `[dicom] max_upload_mb` budget, counted while receiving and while unpacking; zips
are unpacked with the path rules of `bridge.dicom.fileset`. Each part is imported as soon as it is on disk,
by the importer `pms-bridge import` runs, and the answer is its report: every file imported, skipped or
refused with the reason.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import BinaryIO

from aiohttp import BodyPartReader, web

from bridge.dicom.fileset import Problem, ZipTooLarge, unpack_zip
from bridge.dicom.importer import ImportAborted, Importer
from bridge.web.api import json_response, origin_of
from bridge.web.keys import RUNTIME
from bridge.web.problems import ProblemError

routes = web.RouteTableDef()

MAX_PARTS = 10_000
IMPORT_CONCURRENCY = 4
_CHUNK = 4 << 20  # a DICOM file of a sensor in one or two chunks: each is a thread hop


def _part_name(raw: str | None, index: int) -> str:
    """A file name for reports and the temporary folder: the client's base name, printable, short."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable() and c not in '<>:"|?*')[:120].strip(" .")
    return name or f"part{index}"


class TooLarge(Exception):
    """The upload went beyond `[dicom] max_upload_mb` while arriving; what came before was imported."""


async def _write_part(part: BodyPartReader, out: BinaryIO, received: int, limit: int) -> int:
    """Write a part's content to `out`; the bytes received so far. The disk may throttle, so chunks are
    written in a thread, each while the next one arrives."""
    writing: asyncio.Future[int] | None = None
    try:
        while chunk := await part.read_chunk(_CHUNK):
            received += len(chunk)
            if received > limit:
                raise TooLarge(f"the import is larger than {limit // 2**20} MB ([dicom] max_upload_mb)")
            if writing is not None:
                await writing
            writing = asyncio.ensure_future(asyncio.to_thread(out.write, chunk))
    finally:
        if writing is not None:
            await writing
    return received


async def _receive(request: web.Request, folder: Path, limit: int, importer: Importer) -> list[Problem]:
    """Stream the `file` parts into `folder`, unpack zips, and hand each to `importer` as soon as it is
    on disk, so importing overlaps receiving; the problems of the zips."""
    reader = await request.multipart()
    problems: list[Problem] = []
    received = 0
    index = 0
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise ProblemError(400, "nested multipart bodies are not accepted")
        if part.name != "file":
            await part.release()
            continue
        index += 1
        if index > MAX_PARTS:
            raise TooLarge(f"at most {MAX_PARTS} files per import")
        name = _part_name(part.filename, index)
        target = folder / f"{index:05d}" / name
        target.parent.mkdir()
        with open(target, "wb") as out:
            received = await _write_part(part, out, received, limit)
        with open(target, "rb") as fh:
            is_zip = fh.read(4) == b"PK\x03\x04"
        if is_zip:
            unpacked = folder / f"{index:05d}.unzipped"
            unpacked.mkdir()
            try:
                problems += await asyncio.to_thread(unpack_zip, target, unpacked, name, limit - received)
            except ZipTooLarge as exc:
                raise TooLarge(str(exc)) from None
            target.unlink()
            await importer.add([(str(unpacked), name)])
        else:
            await importer.add([(str(target), name)])
    if index == 0:
        raise ProblemError(400, "no part named 'file' in the upload")
    return problems


@routes.post("/api/v1/import")
async def import_media(request: web.Request) -> web.Response:
    """Import DICOM files and zipped file sets; 201 when images were added, with the per-file report."""
    rt = request.app[RUNTIME]
    if not request.content_type.startswith("multipart/"):
        raise ProblemError(
            415, "send DICOM files or zipped file sets as multipart/form-data parts named 'file'"
        )
    limit = rt.settings.dicom.max_upload_mb * 2**20
    if (request.content_length or 0) > limit:
        raise ProblemError(413, f"the import is larger than {limit // 2**20} MB ([dicom] max_upload_mb)")
    importer = Importer(rt, origin_of(request, "dicom"), concurrency=IMPORT_CONCURRENCY, adopt=True)
    too_large = ""
    # Received into the image store's own file system, so a stored file is the received one, moved in.
    await asyncio.to_thread(rt.files.root.mkdir, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".import-", dir=rt.files.root) as tmp:
        try:
            problems = await _receive(request, Path(tmp), limit, importer)
        except ImportAborted as exc:
            raise ProblemError(500, f"the import cannot run: {exc}") from None
        except TooLarge as exc:
            problems, too_large = [], str(exc)
        finally:
            report = await importer.finish()  # what was handed over is imported, or its files removed
    report.errors[:0] = problems
    body = report.to_json()
    if too_large:
        detail = f"{too_large}; the files received before the limit are in the report"
        raise ProblemError(413, detail, kind="import-too-large", report=body)
    if report.imported:
        return json_response(body, 201)
    if report.errors:
        raise ProblemError(
            422, "no image was imported; the report says why for each file", kind="import-failed", report=body
        )
    return json_response(body, 200)
