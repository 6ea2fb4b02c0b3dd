"""`POST /api/v1/import`: DICOM media over HTTP, for viewers and PMSs that are not on the bridge's machine.

The body is multipart/form-data with parts named `file`: DICOM files, or zips of a file set (a DICOMDIR and
its folders, or plain files). Or it is one file as the whole body, `application/dicom` (as Orthanc's `POST
/instances` takes it, and as curl and upload tools send a file per request) or `application/zip`. Each such
request is a whole import (its report, its transaction, its folder flushes), so many files go faster as the
parts of one multipart request (docs/dicom.md, "Performance"). Parts and bodies are streamed to a private
temporary folder inside the image store (never held in memory; on the store's file system, so a stored file
is the received one moved in, not a second copy) under the `[dicom] max_upload_mb` budget, counted while
receiving and while unpacking; zips are unpacked with the path rules of `bridge.dicom.fileset`. Each part is
imported as soon as it is on disk, by the importer `pms-bridge import` runs, and the answer is its report:
every file imported, skipped or refused with the reason.

Or the body is JSON naming files and folders the server already has (`{"paths": [...]}`: a mounted CD, a
share an old system exported to), inside `[dicom] import_folders` (off when empty): the running daemon reads
them where they lie, as `pms-bridge import` does, and nothing outside those folders, links included.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.hdrs import CONTENT_TYPE
from aiohttp.helpers import parse_mimetype
from aiohttp.multipart import content_disposition_filename, parse_content_disposition

from bridge.dicom.fileset import Problem, ZipTooLarge, inside_any, unpack_zip
from bridge.dicom.importer import ImportAborted, Importer, ImportReport
from bridge.store import uncached
from bridge.store.files import UPLOADS
from bridge.web.api import json_object, json_response, origin_of
from bridge.web.keys import RUNTIME
from bridge.web.multipart import (
    BodyTooLarge,
    FormReader,
    MultipartError,
    boundary_of,
    next_chunk,
    read_in_large_pieces,
)
from bridge.web.problems import ProblemError, storage_status

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

MAX_PARTS = 10_000
MAX_PATHS = 1000  # of a JSON import of the server's folders (each may be a folder of any size)
MAX_PATH_CHARS = 4096
IMPORT_CONCURRENCY = 4
IN_FLIGHT = 4  # received files of one upload whose writes may still be finishing
_CHUNK = 4 << 20  # a DICOM file of a sensor in one or two writes: each is a thread hop
# Bodies that are one file; multipart/form-data carries any number.
SINGLE_FILE_TYPES = ("application/dicom", "application/zip")


MAX_NAME_BYTES = 100  # of UTF-8: file systems hold 255 bytes, and the name is a file of the store's disk
MAX_EXTENSION_BYTES = 16


def _part_name(raw: str | None, index: int) -> str:
    """A file name for reports and the temporary folder: the client's base name, printable, and cut to
    `MAX_NAME_BYTES` bytes, since a name the file system refuses (ENAMETOOLONG) would fail the upload."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable() and c not in '<>:"|?*').strip(" .")
    return _cut_name(name, MAX_NAME_BYTES) or f"part{index}"


def _cut_name(name: str, limit: int) -> str:
    """`name` within `limit` bytes of UTF-8, cut at a character boundary; a short extension is kept (it
    tells the reader of a report what the file was)."""
    if len(name.encode()) <= limit:
        return name
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem or len(extension.encode()) > MAX_EXTENSION_BYTES:
        stem, extension = name, ""
    else:
        extension = "." + extension
    room = limit - len(extension.encode())
    return (stem.encode()[:room].decode("utf-8", "ignore").rstrip(" .") + extension).strip(" .")


class TooLarge(Exception):
    """The upload went beyond `[dicom] max_upload_mb` while arriving; what came before was imported."""


ZIP_MAGIC = b"PK\x03\x04"


class _Received:
    """A received file written in threads: created with its first batch of pieces, closed with its last
    (so a file of up to `_CHUNK` bytes is one thread hop), and removed again if anything fails."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self._out: uncached.NewFile | None = None

    def write(self, pieces: list[bytes | memoryview], last: bool) -> None:
        try:
            if self._out is None:
                self.target.parent.mkdir()
                self._out = uncached.NewFile(self.target)
            for piece in pieces:
                self._out.write(piece)
            if last:
                self._out.close()
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        if self._out is not None:
            self._out.abort()


async def _receive_file(
    read: Callable[[], Awaitable[bytes | memoryview]], target: Path, received: int, limit: int
) -> tuple[int, bool, asyncio.Future[None]]:
    """Write what `read` returns until it returns nothing to a new file `target` (its folder created too);
    the bytes received so far, whether the file is a zip, and the write's completion, which comes after
    this returns (the next file may be received meanwhile) and raises what the disk raised, the partial
    file then removed. The disk may throttle, so the file is written in threads, in batches of `_CHUNK`
    bytes (each is a thread hop) while the next pieces arrive: the event loop never waits on the disk. It
    is written past the page cache (bridge.store.uncached): a pool worker reads it once, the same way."""
    file = _Received(target)
    writing: asyncio.Future[None] | None = None
    batch: list[bytes | memoryview] = []
    batched = 0
    head = b""
    try:
        while piece := await read():
            received += len(piece)
            if received > limit:
                raise TooLarge(f"the import is larger than {limit // 2**20} MB ([dicom] max_upload_mb)")
            if len(head) < len(ZIP_MAGIC):
                head += bytes(piece[: len(ZIP_MAGIC) - len(head)])
            batch.append(piece)
            batched += len(piece)
            if batched >= _CHUNK:
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(asyncio.to_thread(file.write, batch, False))
                batch, batched = [], 0
    except BaseException:
        if writing is not None:
            await asyncio.gather(writing, return_exceptions=True)
        await asyncio.to_thread(file.abandon)
        raise
    return received, head == ZIP_MAGIC, asyncio.ensure_future(_complete(file, writing, batch))


async def _complete(
    file: _Received, writing: asyncio.Future[None] | None, rest: list[bytes | memoryview]
) -> None:
    """Write the rest of a received file and close it (on failure it is removed)."""
    if writing is not None:
        await writing
    await asyncio.to_thread(file.write, rest, True)


async def _hand_over(
    written: Awaitable[None],
    target: Path,
    name: str,
    is_zip: bool,
    received: int,
    limit: int,
    importer: Importer,
) -> list[Problem]:
    """Give one received file to `importer` once it is written; a zip is unpacked beside it first (its
    problems returned)."""
    await written
    if not is_zip:
        await importer.add([(str(target), name)])
        return []
    unpacked = target.parent.with_name(target.parent.name + ".unzipped")
    try:
        problems = await asyncio.to_thread(_unpack, target, unpacked, name, limit - received)
    except ZipTooLarge as exc:
        raise TooLarge(str(exc)) from None
    await importer.add([(str(unpacked), name)])
    return problems


def _unpack(target: Path, unpacked: Path, name: str, budget: int) -> list[Problem]:
    """Unpack a received zip into the new folder `unpacked` and remove the zip."""
    unpacked.mkdir()
    problems = unpack_zip(target, unpacked, name, budget)
    target.unlink()
    return problems


async def _receive_body(request: web.Request, folder: Path, limit: int, importer: Importer) -> list[Problem]:
    """Stream a single-file body into `folder` and hand it to `importer`; the problems of a zip."""
    disposition = request.headers.get("Content-Disposition")
    filename = None
    if disposition:
        filename = content_disposition_filename(parse_content_disposition(disposition)[1])
    name = _part_name(filename, 1)
    target = folder / "00001" / name
    received, is_zip, written = await _receive_file(lambda: next_chunk(request.content), target, 0, limit)
    if received == 0:
        await written
        raise ProblemError(400, "the body is empty: send the DICOM file (or the zip) as the body")
    return await _hand_over(written, target, name, is_zip, received, limit, importer)


async def _receive(request: web.Request, folder: Path, limit: int, importer: Importer) -> list[Problem]:
    """Stream the `file` parts into `folder`, unpack zips, and hand each to `importer` as soon as it is
    on disk, so importing overlaps receiving: the next part is received while the last one's write
    finishes (at most `IN_FLIGHT` files at once). The problems of the zips."""
    boundary = boundary_of(parse_mimetype(request.headers[CONTENT_TYPE]).parameters)
    form = FormReader(request.content, boundary, max_bytes=limit)  # the parts' headers count too
    handing: list[asyncio.Future[list[Problem]]] = []
    received = 0
    index = 0
    try:
        while (part := await form.next_part()) is not None:
            if part.name != "file":
                continue
            index += 1
            if index > MAX_PARTS:
                raise TooLarge(f"at most {MAX_PARTS} files per import")
            name = _part_name(part.filename, index)
            target = folder / f"{index:05d}" / name
            received, is_zip, written = await _receive_file(form.read, target, received, limit)
            handing.append(
                asyncio.ensure_future(_hand_over(written, target, name, is_zip, received, limit, importer))
            )
            while len(waiting := [h for h in handing if not h.done()]) >= IN_FLIGHT:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:  # nothing may still write into `folder` when the caller removes it
        outcomes = await asyncio.gather(*handing, return_exceptions=True)
    problems: list[Problem] = []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        problems += outcome
    if index == 0:
        raise ProblemError(400, "no part named 'file' in the upload")
    return problems


def _private_folder(root: Path) -> str:
    """A new folder for one upload's files inside the image store (created with the store if need be)."""
    root.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=UPLOADS, dir=root)


async def _server_paths(
    request: web.Request, folders: tuple[Path, ...]
) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """The `paths` of a JSON import, each resolved (symbolic links followed) and inside one of `folders`,
    with the path as the client named it for the report, and the folders resolved; a 4xx problem for the
    whole request otherwise. Nothing outside the folders is looked at, so the answer tells nothing about
    what exists there. Paths are resolved in threads: a folder may be a share that is slow to answer."""
    if not folders:
        raise ProblemError(
            403,
            "importing the server's own folders is off: list them in [dicom] import_folders",
            kind="import-folders-off",
        )
    body = await json_object(request)
    paths = body.get("paths")
    if set(body) != {"paths"} or not isinstance(paths, list) or not paths:
        raise ProblemError(422, 'send {"paths": [...]}: the files and folders to import', field="paths")
    if len(paths) > MAX_PATHS:
        raise ProblemError(413, f"at most {MAX_PATHS} paths per import", field="paths")
    roots = tuple(await asyncio.to_thread(lambda: [os.path.realpath(f) for f in folders]))
    sources = []
    for path in paths:
        if (
            not isinstance(path, str)
            or not path
            or len(path) > MAX_PATH_CHARS
            or not Path(path).is_absolute()
        ):
            raise ProblemError(422, "each path must be an absolute path on the server", field="paths")
        if "\0" in path:
            raise ProblemError(422, "a path holds a NUL character", field="paths")
        try:
            os.fsencode(path)
        except UnicodeEncodeError:  # a lone surrogate in the JSON text names no file
            raise ProblemError(422, "a path holds a character no file name can", field="paths") from None
        resolved = await asyncio.to_thread(os.path.realpath, path)
        if not inside_any(resolved, roots):
            raise ProblemError(
                403, f"{path!r} is not inside [dicom] import_folders", kind="outside-import-folders"
            )
        sources.append((resolved, path))
    return sources, roots


async def _import_server_paths(request: web.Request) -> web.Response:
    """A JSON import: the named files and folders read where they lie, inside `[dicom] import_folders`."""
    rt = request.app[RUNTIME]
    folders = rt.settings.dicom.import_folders
    sources, roots = await _server_paths(request, folders)
    importer = Importer(rt, origin_of(request, "dicom"), concurrency=IMPORT_CONCURRENCY, within=roots)
    try:
        report = await importer.run(sources)
    except ImportAborted as exc:
        raise ProblemError(500, f"the import cannot run: {exc}") from None
    return _answer(report)


def _answer(report: ImportReport) -> web.Response:
    """201 when images were added, 200 when nothing was new, 422 when nothing could be imported."""
    body = report.to_json()
    if report.imported:
        return json_response(body, 201)
    if report.errors:
        raise ProblemError(
            422, "no image was imported; the report says why for each file", kind="import-failed", report=body
        )
    return json_response(body, 200)


@routes.post("/api/v1/import")
async def import_media(request: web.Request) -> web.Response:
    """Import DICOM files and zipped file sets; 201 when images were added, with the per-file report."""
    rt = request.app[RUNTIME]
    if request.content_type == "application/json":
        return await _import_server_paths(request)
    single = request.content_type in SINGLE_FILE_TYPES
    if not single and not request.content_type.startswith("multipart/"):
        raise ProblemError(
            415,
            "send DICOM files or zipped file sets as multipart/form-data parts named 'file',"
            " or one of them as an application/dicom or application/zip body, or JSON naming"
            " files and folders inside [dicom] import_folders",
        )
    limit = rt.settings.dicom.max_upload_mb * 2**20
    if (request.content_length or 0) > limit:
        raise ProblemError(413, f"the import is larger than {limit // 2**20} MB ([dicom] max_upload_mb)")
    read_in_large_pieces(request.transport)
    importer = Importer(rt, origin_of(request, "dicom"), concurrency=IMPORT_CONCURRENCY, adopt=True)
    too_large = malformed = ""
    not_stored: OSError | None = None
    # Received into the image store's own file system, so a stored file is the received one, moved in.
    tmp = Path(await asyncio.to_thread(_private_folder, rt.files.root))
    try:
        receive = _receive_body if single else _receive
        problems = await receive(request, tmp, limit, importer)
    except ImportAborted as exc:
        raise ProblemError(500, f"the import cannot run: {exc}") from None
    except TooLarge as exc:
        problems, too_large = [], str(exc)
    except BodyTooLarge:
        problems, too_large = [], f"the import is larger than {limit // 2**20} MB ([dicom] max_upload_mb)"
    except MultipartError as exc:
        problems, malformed = [], str(exc)
    except ConnectionResetError:
        raise  # the client is gone: nobody to answer (bridge.web.middleware logs it)
    except OSError as exc:  # the store's disk or share: full, gone
        problems, not_stored = [], exc
    finally:
        try:
            report = await importer.finish()  # what was handed over is imported, or its files removed
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
    report.errors[:0] = problems
    body = report.to_json()
    if too_large:
        detail = f"{too_large}; the files received before the limit are in the report"
        raise ProblemError(413, detail, kind="import-too-large", report=body)
    if malformed:
        detail = (
            f"the upload is not well-formed multipart/form-data: {malformed}; the files received before"
            " are in the report"
        )
        raise ProblemError(400, detail, kind="import-malformed", report=body)
    if not_stored is not None:
        log.error("upload not stored", extra={"errno": not_stored.errno, "reason": not_stored.strerror})
        detail = (
            f"the upload cannot be stored in the image store ({not_stored.strerror or not_stored}); the files"
            " received before are in the report"
        )
        raise ProblemError(storage_status(not_stored), detail, kind="import-not-stored", report=body)
    return _answer(report)
