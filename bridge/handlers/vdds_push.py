"""VDDS-media stage 6: pushing new images into the PVS (MMOINFIMPORT) through the persistent outbox.

When images are added for a patient whose link came from a VDDS PVS, the service writes an outbox message
in the same transaction (`push_channels` is this channel's TARGET_RULES entry). The channel's worker
writes a push exchange file (one per message, `MMOINF<id>.INI` in `[vdds] push_dir`), starts the PVS's
MMOINFIMPORT program registered in VDDS_MMI.INI with the file's path, and waits for READY=1. A refusal,
a non-zero exit or a timeout is retried with the outbox's backoff.

Exactly once across a crash: a message found "sending" at start-up is settled by `recover` from its push
file. READY=1 with ERRORLEVEL=0 (or a recorded exit code 0, with `push_trust_exit_code`) means the PVS
has it; READY=0 on a file younger than `push_timeout` means the PVS's program may still be running (it
outlives a killed daemon, and a stopping daemon leaves it running), so recover waits for it; only a push
that certainly did not arrive is sent again.

This module imports nothing from `bridge.outbox` at load time: the outbox imports `push_channels` from
here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import subprocess
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.atomic import write_atomic
from bridge.delivery import DeliveryError
from bridge.events import Event, ImagesAdded
from bridge.model import Origin
from protocols import vdds
from protocols.common import codepage

if TYPE_CHECKING:
    from bridge.config import Settings
    from bridge.outbox import OutboxItem
    from bridge.runtime import Runtime

log = logging.getLogger(__name__)

CHANNEL = "vdds-push"
EXIT_GRACE_SECONDS = 2.0  # after the program exits 0, how long READY=1 may still take to appear
POLL_SECONDS = 0.1
ORIGIN = Origin(protocol="vdds", transport="push", actor="outbox")


class PushFailed(DeliveryError):
    """The PVS did not take the push this time; the outbox retries it with backoff. Its text names the
    program and the push file, never the PVS's ERRORTEXT (a PVS may put the patient's name there): that
    stays in the push file."""


def push_channels(settings: Settings, protocol: str, _pms_system: str) -> Sequence[str]:
    """TARGET_RULES entry: links made by VDDS requests get pushes when `[vdds] push` is on."""
    return [CHANNEL] if protocol == "vdds" and settings.vdds.enabled and settings.vdds.push else []


def mmi_path(settings: Settings) -> Path:
    """VDDS_MMI.INI: `[vdds] mmi_ini`, else the Windows directory's, else /etc/vdds (one implementer)."""
    if settings.vdds.mmi_ini is not None:
        return settings.vdds.mmi_ini
    if os.name == "nt":
        return Path(os.environ.get("WINDIR", r"C:\Windows")) / "VDDS_MMI.INI"
    return Path("/etc/vdds/VDDS_MMI.INI")


def push_file(settings: Settings, item: OutboxItem) -> Path:
    """The push exchange file of one outbox message (its name is what recover looks for)."""
    return settings.vdds.push_dir / f"MMOINF{item.id}.INI"


def _exit_file(path: Path) -> Path:
    return path.with_suffix(".EXIT")


def command_line(program: str, path: Path) -> list[str]:
    """The registered command (it may carry arguments) with the push file appended, as PVSs call it.

    Windows programs get the registered string split as CreateProcess would see it (quotes kept off);
    elsewhere it is split as a shell would.
    """
    parts = shlex.split(program, posix=os.name != "nt")
    return [part.strip('"') for part in parts] + [str(path)]


async def send(rt: Runtime, item: OutboxItem) -> None:
    """Deliver one push or raise (PushFailed, OSError) so that the outbox retries it."""
    settings = rt.settings
    patient, images = await rt.service.images_for_push(
        ORIGIN,
        item.patient_id,
        int(item.payload["link_id"]),
        [int(i) for i in item.payload.get("image_ids", [])],
    )
    if patient is None or not images:
        log.info("push has nothing left to announce", extra={"outbox_id": item.id})
        return
    pvs = patient.pms_system or ""
    registry_path = mmi_path(settings)
    try:
        registry = await asyncio.to_thread(registry_path.read_bytes)
    except OSError as exc:  # retried: a share may come back, a PVS be installed; the error names the file
        raise PushFailed(
            f"VDDS_MMI.INI {registry_path} cannot be read ({exc.strerror or type(exc).__name__}):"
            " is a VDDS PVS installed on this computer? [vdds] mmi_ini names the file"
        ) from None
    target = vdds.push_target(registry, pvs)
    if target is None:
        log.warning(
            "the PVS registers no MMOINFIMPORT program in VDDS_MMI.INI; push skipped",
            extra={"pvs": pvs, "outbox_id": item.id},
        )
        return
    from bridge.handlers.vdds import export_copies, options, thumbnail_files

    opts = options(settings.vdds)
    thumbnails = await thumbnail_files(rt, images)
    if settings.vdds.thumbnail_key and len(thumbnails) < len(images):
        # A stage-6 push is sent once: one without its thumbnail would stay so in the PVS for good.
        raise PushFailed(f"{len(images) - len(thumbnails)} of {len(images)} thumbnails could not be written")
    copies: dict[int, str] = {}
    if target.direct_import:
        copies, failed = await export_copies(rt, images, opts.default_format, ORIGIN)
        if failed:
            raise PushFailed(
                f"{len(failed)} of {len(images)} copies for DIRECTIMAGEIMPORT could not be written"
            )
    prxnr = patient.practice_id or settings.vdds.push_prxnr
    objects = [
        vdds.object_pairs(
            image,
            opts,
            prxnr=prxnr,
            thumbnail=thumbnails.get(image.id, ""),
            imagedata=copies.get(image.id, ""),
        )
        for image in images
    ]
    data = vdds.push_bytes(
        pvs=target.section if settings.vdds.push_pvs == "archive" else pvs,
        from_pvs=pvs,
        bvs=settings.vdds.bvs_section,
        prxnr=prxnr,
        patid=patient.pms_id or "",
        objects=objects,
        codepage=codepage(settings.vdds.encoding),
    )
    path = push_file(settings, item)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        _exit_file(path).unlink()
    await asyncio.to_thread(write_atomic, path, data)
    await run_program(rt, command_line(target.program, path), path)


async def run_program(rt: Runtime, argv: list[str], path: Path) -> None:
    """Start the PVS's import program and wait for READY=1 in `path`, the program's exit or the timeout.

    A program that overruns `push_timeout` is killed (a hung import must not pile up). One still running
    when the daemon stops (cancellation) is left to finish, as after a crash: killed mid-import, it
    never writes READY=1, and the next start's `recover` would wait `push_timeout` for it before sending
    the push again. The same holds when the outbox cuts the send off because its claim was lost: the
    message's new holder settles it through `recover`, from the file the program answers in. The
    program runs in a session of its own, so that a console's Ctrl+C, which reaches the whole process
    group, stops the daemon but not the PVS's import.
    """
    settings = rt.settings.vdds
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=str(path.parent),
            start_new_session=True,
        )
    except OSError as exc:
        raise PushFailed(f"cannot start {argv[0]}: {exc.strerror or exc}") from exc
    deadline = time.monotonic() + settings.push_timeout
    exited_at: float | None = None
    stopping = False
    try:
        while True:
            reply = await _reply(path)
            if reply is not None and reply.ready:
                if reply.accepted:
                    return
                raise PushFailed(
                    f"the PVS refused the push: ERRORLEVEL={reply.errorlevel} (its ERRORTEXT is in {path})"
                )
            if exited_at is None and proc.returncode is not None:
                exited_at = time.monotonic()
                await asyncio.to_thread(_exit_file(path).write_text, str(proc.returncode))
                if proc.returncode != 0:
                    raise PushFailed(f"{argv[0]} exited with {proc.returncode} without READY=1")
            now = time.monotonic()
            if (
                exited_at is not None
                and settings.push_trust_exit_code
                and now - exited_at >= EXIT_GRACE_SECONDS
            ):
                log.info(
                    "push program exited 0 without READY=1; taken as delivered", extra={"file": str(path)}
                )
                return
            if now >= deadline:
                raise PushFailed(f"no READY=1 from {argv[0]} within {settings.push_timeout:g} s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_SECONDS):
                    await proc.wait()
    except asyncio.CancelledError:
        stopping = True
        log.info(
            "push cut off (the daemon stops, or lost its claim): the PVS's import program is left to finish",
            extra={"file": str(path)},
        )
        raise
    finally:
        if not stopping and proc.returncode is None:  # a hung import program must not pile up
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _reply(path: Path) -> vdds.PushReply | None:
    try:
        data = await asyncio.to_thread(path.read_bytes)
    except OSError:
        return None  # being replaced by the PVS right now: look again
    return vdds.push_reply(data)


async def recover(rt: Runtime, item: OutboxItem) -> bool:
    """After a crash: True when the PVS already has this push, so it is not sent twice.

    No push file: the program was never started. READY=1: the PVS answered (accepted or not). A
    recorded exit code 0 counts as delivered when `push_trust_exit_code`. Otherwise the program may
    still be running, so wait for READY=1 until the file is `push_timeout` old.
    """
    settings = rt.settings
    path = push_file(settings, item)
    while True:
        try:
            modified = path.stat().st_mtime
        except FileNotFoundError:
            return False
        reply = await _reply(path)
        if reply is not None and reply.ready:
            return reply.accepted
        with contextlib.suppress(OSError, ValueError):
            if settings.vdds.push_trust_exit_code and _exit_file(path).read_text().strip() == "0":
                return True
        if time.time() - modified >= settings.vdds.push_timeout:
            return False
        await asyncio.sleep(POLL_SECONDS)


def push_worker(rt: Runtime) -> Coroutine[Any, Any, None] | None:
    """The stage-6 outbox worker, woken as soon as images are added."""
    if not push_channels(rt.settings, "vdds", ""):
        return None
    from bridge.outbox import OutboxWorker

    worker = OutboxWorker(rt, CHANNEL, send, recover=recover)

    def wake(event: Event) -> None:
        if isinstance(event, ImagesAdded) and event.may_concern(CHANNEL):
            worker.wake.set()

    rt.bus.subscribe(wake)
    return worker.run()
