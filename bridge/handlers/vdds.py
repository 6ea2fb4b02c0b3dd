"""VDDS-media in the daemon: the `vdds` launch handler, the watched exchange folder, exported files.

One exchange file (from `pms-bridge vdds FILE` or dropped in `[vdds] exchange_dir`) or one MMOID (stage 3,
`pms-bridge vdds MMOID`) is parsed by `protocols.vdds`, served by the service, and answered in the same
file. Stage 2 writes a watermarked thumbnail per image and stage 4 a copy per image into `[vdds]
export_dir`; both are deleted after `export_max_age_hours`. Every failure, including a bug here, becomes
an answer with ERRORLEVEL=1 and READY=1: a PVS waiting on READY would hang otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge import atomic
from bridge.atomic import write_atomic
from bridge.config import VddsSettings, watched_folders
from bridge.handlers.base import Launch, LaunchReply
from bridge.model import ImageView, Origin, Outcome, PatientRequest, Status
from bridge.store.db import StoreFileLost
from bridge.watch import MAX_FILE_BYTES, Classify, FolderWatcher, Handle, Oversized, Verdict
from protocols import vdds, vdds_exchange

if TYPE_CHECKING:
    from bridge.runtime import Runtime

log = logging.getLogger(__name__)

PROTOCOL = "vdds"
THUMBNAIL_FOLDER = "thumbnails"
PARALLEL_RENDERS = 4
CLEANUP_EVERY_SECONDS = 600.0


def options(settings: VddsSettings) -> vdds.Options:
    """The protocol module's options from `[vdds]`."""
    return vdds.Options(
        language=settings.language,
        default_pvs=settings.default_pvs,
        practice_key=settings.practice_id_key,
        stage5=settings.stage5,
        stage5_key=settings.stage5_key,
        thumbnail_key=settings.thumbnail_key,
        default_format=settings.export_format.upper(),
        require_ready=settings.require_ready,
        type_names={**vdds.DEFAULT_TYPE_NAMES, **settings.type_names},
        type_numbers={**vdds.DEFAULT_TYPE_NUMBERS, **settings.type_numbers},
    )


async def handle(rt: Runtime, launch: Launch) -> LaunchReply:
    """Answer one VDDS launch; never raises (the answer says what went wrong)."""
    settings = rt.settings.vdds
    opts = options(settings)
    if not launch.content and not launch.filename:
        return await _view(rt, launch, opts)
    exchange = vdds_exchange.read_exchange(launch.content, vdds_exchange.read_codepage(settings.encoding))
    if exchange.answered:
        return _already_answered(exchange)
    trace = _Trace()
    try:
        if not settings.enabled:
            raise vdds.VddsError("disabled")
        async with asyncio.timeout(settings.answer_timeout):
            level, text, sections, summary = await _serve(rt, launch, exchange, opts, trace)
    except vdds.VddsError as exc:
        level, text, sections, summary = 1, exc.text(opts.language), [], ""
    except StoreFileLost as exc:  # logged once where it was found; the path is for IT
        level, text = 1, f"{vdds_exchange.message(opts.language, 'store_lost')} ({exc.brief})"
        sections, summary = [], ""
    except TimeoutError:
        log.error("VDDS request timed out", extra={"kind": exchange.kind.value})
        level, text, sections, summary = 1, vdds_exchange.message(opts.language, "timeout"), [], ""
    except Exception as exc:  # a bug must still become an answer, never a hanging PVS
        log.exception("VDDS request failed", extra={"kind": exchange.kind.value})
        level, text, sections, summary = (
            1,
            f"{vdds_exchange.message(opts.language, 'internal')} ({exc!r})"[:200],
            [],
            "",
        )
    content = vdds_exchange.answer(exchange, level, text, sections)
    return LaunchReply(level, text or summary, content, request=trace.request, outcome=trace.outcome)


def _already_answered(exchange: vdds_exchange.Exchange) -> LaunchReply:
    """A file whose every request section has READY=1: nothing is served and the file stays as it is.

    Serving its request again would repeat an old request (the previous patient, an old export) in a
    file the PVS reuses; rewriting the answer would overwrite the one the PVS may be reading (a PVS that
    calls the module again while waiting). The exit code repeats the recorded ERRORLEVEL.
    """
    assert exchange.request is not None  # answered means the request section has READY=1
    level = 0 if vdds_exchange.errorlevel_ok(exchange.request.get("ERRORLEVEL")) else 1
    return LaunchReply(level, f"{exchange.kind.value}: already answered (READY=1); nothing served")


@dataclass
class _Trace:
    """What a request was parsed into and how it ended, for record mode (which pseudonymises PHI)."""

    request: PatientRequest | None = None
    outcome: Outcome | None = None


async def _serve(
    rt: Runtime, launch: Launch, exchange: vdds_exchange.Exchange, opts: vdds.Options, trace: _Trace
) -> tuple[int, str, list[vdds_exchange.Section], str]:
    """(ERRORLEVEL, ERRORTEXT, answer sections, a line for the log and the PVS's console)."""
    request = trace.request = vdds.patient_request(
        exchange, launch.origin(), opts, launch.args, today=date.today()
    )
    outcome = trace.outcome = await rt.service.handle(request)
    level, text = vdds.outcome_error(outcome, exchange.kind, opts, request.pms_id)
    summary = f"{exchange.kind.value}: {outcome.message}"
    if exchange.kind is vdds_exchange.Kind.MMOINFEXPORT:
        if outcome.status is Status.NOT_FOUND and rt.settings.vdds.unknown_patient == "empty":
            return 0, "", vdds.info_sections([], opts, {}), f"{summary} (answered as no images)"
        if not outcome.status.ok:
            return level, text, [], summary
        thumbnails = await thumbnail_files(rt, outcome.images)
        return 0, "", vdds.info_sections(outcome.images, opts, thumbnails, request.practice_id), summary
    if exchange.kind is vdds_exchange.Kind.MMOEXPORT and outcome.images:
        assert exchange.request is not None  # a MMOEXPORT kind always has its [MMOIDS] section
        slots = vdds.export_slots(exchange.request, opts.max_mmoids)
        found_refs = [ref for ref in request.image_refs if ref not in outcome.missing_refs]
        paths, failed = await export_copies(rt, outcome.images, request.export_format, launch.origin())
        by_ref = {
            ref: paths[image.id]
            for ref, image in zip(found_refs, outcome.images, strict=True)
            if image.id in paths
        }
        if failed:
            failed_text = vdds_exchange.message(
                opts.language, "export_failed", ids=", ".join(map(str, failed))
            )
            level, text = 1, f"{text} {failed_text}".strip()
        return level, text, vdds.export_sections(slots, by_ref), summary
    return level, text, [], summary


async def _view(rt: Runtime, launch: Launch, opts: vdds.Options) -> LaunchReply:
    """Stage 3 MMOVIEW: `pms-bridge vdds MMOID`; no file to answer in, so an exit code and a line.

    The MMOID is the last argument: the PVS appends it to the registered command line, as it appends an
    exchange file's path, and what the registration carries before it is not the MMOID.
    """
    try:
        if not rt.settings.vdds.enabled:
            raise vdds.VddsError("disabled")
        args = [arg for arg in launch.args if arg.strip()]
        if not args:
            raise vdds.VddsError("no_request")
        mmoid = args[-1]
        if any(sep in mmoid for sep in ("/", "\\")):
            # A path that named no readable file: the PVS's exchange file is gone or not shared.
            raise vdds.VddsError("unknown_request")
        outcome = await rt.service.handle(vdds.view_request(mmoid, launch.origin()))
    except vdds.VddsError as exc:
        return LaunchReply(1, exc.text(opts.language))
    except StoreFileLost as exc:
        return LaunchReply(1, f"{vdds_exchange.message(opts.language, 'store_lost')} ({exc.brief})")
    except Exception as exc:
        log.exception("MMOVIEW failed")
        return LaunchReply(1, f"{vdds_exchange.message(opts.language, 'internal')} ({type(exc).__name__})")
    level, text = vdds.outcome_error(outcome, vdds_exchange.Kind.MMOVIEW, opts)
    return LaunchReply(level, text or f"image {mmoid} shown ({outcome.viewer_url})")


# --------------------------------------------------------------------------------------------------
# Files for the PVS: thumbnails (stage 2, push) and copies (stage 4, push with DIRECTIMAGEIMPORT)


def _inside(folder: Path, name: str) -> Path:
    """`folder/name`, refused unless it stays inside `folder` (names are ours, but never trust a path)."""
    path = folder / name
    if path.resolve().parent != folder.resolve():
        raise ValueError(f"{name!r} leaves {folder}")
    return path


def _place(data: bytes, target: Path) -> None:
    """Write `data` atomically unless `target` already holds exactly it (PVSs may move files away)."""
    with contextlib.suppress(OSError):
        if target.stat().st_size == len(data) and target.read_bytes() == data:
            return
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, data)


async def thumbnail_files(rt: Runtime, images: Sequence[ImageView]) -> dict[int, str]:
    """Image id -> path of its watermarked thumbnail in the export folder (none when the key is off).

    A thumbnail that cannot be rendered (a damaged file) is logged and left out: the list itself is
    still worth answering.
    """
    if not rt.settings.vdds.thumbnail_key:
        return {}
    folder = rt.settings.vdds.export_dir / THUMBNAIL_FOLDER
    limit = asyncio.Semaphore(PARALLEL_RENDERS)

    async def one(image: ImageView) -> tuple[int, str] | None:
        async with limit:
            try:
                cached = await rt.imaging.thumbnail(image)
                target = _inside(folder, f"{image.id}.jpg")
                await asyncio.to_thread(lambda: _place(cached.read_bytes(), target))
            except Exception:
                log.warning("thumbnail for the PVS failed", exc_info=True, extra={"image_id": image.id})
                return None
            return image.id, str(target)

    found = await asyncio.gather(*(one(image) for image in images))
    return dict(item for item in found if item is not None)


async def export_copies(
    rt: Runtime, images: Sequence[ImageView], fmt: str, origin: Origin
) -> tuple[dict[int, str], list[int]]:
    """Copies of `images` in `fmt` in a folder of their own: (image id -> path, ids that failed)."""
    folder = rt.settings.vdds.export_dir / f"x{secrets.token_hex(6)}"
    paths: dict[int, str] = {}
    failed: list[int] = []
    for image in images:
        try:
            data = await export_bytes(rt, image, fmt, origin)
            target = _inside(folder, f"{image.id}.{fmt.lower()}")
            await asyncio.to_thread(_place, data, target)
        except Exception:
            log.warning("export for the PVS failed", exc_info=True, extra={"image_id": image.id})
            failed.append(image.id)
            continue
        paths[image.id] = str(target)
    return paths, failed


async def export_bytes(rt: Runtime, image: ImageView, fmt: str, origin: Origin) -> bytes:
    """One exported copy: JPG, PNG or TIF rendered by imaging (display mapping, orientation, and the
    watermark when `[vdds] export_watermark`); DCM the original when it is DICOM, else the object
    `export-dicom` would write for it."""
    if fmt == "DCM":
        from bridge.dicom.export import instance_bytes

        return await instance_bytes(rt, origin, image)
    return await rt.imaging.export_bytes(image, fmt, watermark=rt.settings.vdds.export_watermark)


def classifier(settings: VddsSettings) -> Classify:
    """The watched folder's `classify`: complete unanswered requests now, others once stable."""
    fallback = vdds_exchange.read_codepage(settings.encoding)

    def classify(content: bytes, stable: bool) -> Verdict:
        state = vdds_exchange.folder_state(content, fallback)
        if state is vdds_exchange.FolderState.COMPLETE and (stable or not settings.folder_wait_stable):
            return Verdict.HANDLE
        if state in (vdds_exchange.FolderState.COMPLETE, vdds_exchange.FolderState.INCOMPLETE):
            return Verdict.HANDLE if stable else Verdict.WAIT
        return Verdict.IGNORE

    return classify


def folder_handler(rt: Runtime) -> Handle:
    """What the watched folder does with a complete request: answer it in place, unless the PVS has
    replaced the file meanwhile (then the new request is the next one)."""

    async def on_file(path: Path, content: bytes) -> str:
        launch = Launch(PROTOCOL, filename=str(path), content=content, transport="folder")
        reply = await handle(rt, launch)
        rt.metrics.launches.labels(PROTOCOL, str(reply.exit_code)).inc()
        if reply.content is None:
            return f"exit {reply.exit_code}"
        try:
            current = await asyncio.to_thread(path.read_bytes)
        except OSError:
            return "gone before the answer"
        if current != content:  # the PVS replaced its request meanwhile; that one is answered next
            return "replaced before the answer"
        await asyncio.to_thread(write_atomic, path, reply.content)
        if rt.recorder is not None:
            await rt.recorder.folder(PROTOCOL, PROTOCOL, path.name, content, reply.content, reply)
        return f"errorlevel {reply.exit_code}"

    return on_file


# What the watched folder logs for an oversized file, by `atomic.rewrite_head`'s result.
_OVERSIZED_RESULTS = {
    atomic.REWRITTEN: "errorlevel 1 (file too large)",
    atomic.CHANGED: "replaced before the answer",
    atomic.GONE: "gone before the answer",
}


def oversized(rt: Runtime) -> Oversized:
    """The watched folder's answer to an exchange file over the size limit (4 MB).

    Left alone, the PVS would wait on READY forever. So a request (a request section in its first 4 MB,
    unanswered) gets ERRORLEVEL=1, an ERRORTEXT and READY=1 in its request section, in its own encoding;
    everything after the first 4 MB is copied unchanged, never held in memory. A large file without a
    request (a picture someone dropped) is left alone.
    """
    settings = rt.settings.vdds
    fallback = vdds_exchange.read_codepage(settings.encoding)

    def classify(head: bytes) -> Verdict:
        state = vdds_exchange.folder_state(vdds_exchange.whole_lines(head, fallback), fallback)
        if state in (vdds_exchange.FolderState.COMPLETE, vdds_exchange.FolderState.INCOMPLETE):
            return Verdict.HANDLE
        return Verdict.IGNORE

    async def on_file(path: Path, head: bytes) -> str:
        def answer(size: int) -> tuple[bytes, int]:
            return vdds_exchange.too_large_answer(head, size, MAX_FILE_BYTES, settings.language, fallback)

        result = await asyncio.to_thread(atomic.rewrite_head, path, head, answer)
        rt.metrics.launches.labels(PROTOCOL, "1").inc()
        return _OVERSIZED_RESULTS[result]

    return Oversized(classify, on_file)


def folder_worker(rt: Runtime) -> Coroutine[Any, Any, None] | None:
    """The watched exchange folder (`[vdds] exchange_dir`), when bridge.config.watched_folders lists
    it (configured, and VDDS enabled). A missing folder is not created: the watcher reports it and
    watches it once it appears (bridge.watch)."""
    folder = next((found for found in watched_folders(rt.settings) if found.section == PROTOCOL), None)
    if folder is None:
        return None
    settings = rt.settings.vdds
    watcher = FolderWatcher(
        rt,
        folder.watcher,
        folder.path,
        folder_handler(rt),
        setting=folder.setting,
        classify=classifier(settings),
        poll_seconds=settings.poll_seconds,
        oversized=oversized(rt),
    )
    rt.readiness.watched[folder.watcher] = folder.path  # /readyz: unready until its first scan
    return watcher.run()


def remove_old_files(folder: Path, max_age_seconds: float, now: float) -> int:
    """Delete files under `folder` older than `max_age_seconds`, and folders left empty; never follows
    links out of it. Returns how many files went."""
    removed = 0
    if not folder.is_dir():
        return 0
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = Path(root) / name
            with contextlib.suppress(OSError):
                if now - path.lstat().st_mtime > max_age_seconds:
                    path.unlink()
                    removed += 1
        for name in dirs:
            path = Path(root) / name
            with contextlib.suppress(OSError):
                if not path.is_symlink() and not any(path.iterdir()):
                    path.rmdir()
    return removed


def cleanup_worker(rt: Runtime) -> Coroutine[Any, Any, None] | None:
    """Deletes exported files and push files after `export_max_age_hours` (PVSs copy them away)."""
    settings = rt.settings.vdds
    if not settings.enabled:
        return None
    max_age = settings.export_max_age_hours * 3600

    async def run() -> None:
        while True:
            for folder in (settings.export_dir, settings.push_dir):
                removed = await asyncio.to_thread(remove_old_files, folder, max_age, time.time())
                if removed:
                    log.info("old VDDS files removed", extra={"folder": str(folder), "files": removed})
            await asyncio.sleep(min(CLEANUP_EVERY_SECONDS, max_age / 4))

    return run()
