"""Thumbnails back to the PMS through a folder: per patient, a watermarked JPEG and its metadata.

PMSs that read images from a folder (TigerView-style thumbnail folders; Dentrix Smart Image, whose SDK is
not public) get, when images are added for one of their patients, one sub-folder per patient named by the
id the profile's `id_field` names (its PMS id, or the current chart number), and in it for each image:

    <yyyyMMdd-HHmmss>_<image id>.jpg    the watermarked thumbnail the API serves (24-bit JPEG)
    <yyyyMMdd-HHmmss>_<image id>.json   patient keys, image metadata, API links (UTF-8)
    <yyyyMMdd-HHmmss>_<image id>.csv    the same as one header and one row, in the profile's code page

Each file is written atomically, the CSV last, so a PMS import that picks up CSV files finds the JPEG and
the JSON already complete. The work is driven by the persistent outbox: the service queues one message
per batch of new images in the transaction that stores them, a worker per profile writes the files and
retries with backoff while the share is down, and a restart resends what was cut off (writing the same
files again is harmless). Ids come from PMS messages: a folder name is used only when it is one plain
name that stays inside the configured folder, otherwise the message fails with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.atomic import write_atomic
from bridge.config import LaunchProfile, Settings, launch_profiles
from bridge.delivery import DeliveryError, Undeliverable
from bridge.model import ImageView, Origin, PatientView
from bridge.service import CHART_KEYED
from protocols import thumbfolder
from protocols.common import codepage

if TYPE_CHECKING:
    from bridge.outbox import OutboxItem, OutboxWorker, Sender
    from bridge.runtime import Runtime

log = logging.getLogger(__name__)

MAX_FOLDER_NAME = 100
MAX_JSON_BYTES = 1 << 20  # an image's JSON is a few kB; more is not ours
_FORBIDDEN = frozenset('<>:"/\\|?*')
# Windows device names, whatever the extension: COM and LPT take 0-9 and the superscript digits ¹ ² ³
# too (Windows reads those as digits), and CONIN$ / CONOUT$ open the console.
_RESERVED = frozenset(
    {
        "CON",
        "PRN",
        "AUX",
        "NUL",
        "CONIN$",
        "CONOUT$",
        *(f"{port}{digit}" for port in ("COM", "LPT") for digit in "0123456789\u00b9\u00b2\u00b3"),
    }
)


class UnsafeName(ValueError):
    """An id that cannot be a folder name inside the thumbnail folder. Its text says why without quoting
    the id: it is logged and recorded, and the id is a patient's PMS id or chart number."""


def channel_name(profile: str) -> str:
    return f"{profile}-thumbnails"


def enabled_profiles(settings: Settings) -> Iterator[tuple[str, LaunchProfile]]:
    """The profiles whose thumbnail folder is switched on."""
    for name, profile in launch_profiles(settings).items():
        if profile.thumbnails and profile.thumbnail_dir is not None:
            yield name, profile


def folder_targets(settings: Settings, protocol: str, pms_system: str) -> Sequence[str]:
    """The outbox target rule: which thumbnail channels announce new images of a link.

    A profile keyed by PMS id takes the links of its PMS system; a profile keyed by chart number takes
    every patient that has a current chart number (the service asks with CHART_KEYED), since such a PMS
    leaves no link behind, only the chart number it looks patients up by.
    """
    found = []
    for name, profile in enabled_profiles(settings):
        if profile.id_field == "chart_number":
            if protocol == CHART_KEYED:
                found.append(channel_name(name))
        elif protocol != CHART_KEYED and pms_system == profile.pms_system:
            found.append(channel_name(name))
    return found


def patient_folder(root: Path, name: str) -> Path:
    """`root / name` when `name` is one plain folder name on Windows and POSIX and stays inside `root`.

    Refused: empty, "." and "..", separators and other characters Windows forbids, control characters,
    a trailing dot or space (Windows drops them, which would name another folder), device names (CON,
    NUL, COM1, COM¹, LPT0, CONIN$ ...) in any case, with any extension and with the spaces and dots
    Windows strips before one, and a path that resolves elsewhere (an existing symbolic link).
    """
    if name in ("", ".", ".."):
        raise UnsafeName("the id is empty, '.' or '..', not a folder name")
    if len(name) > MAX_FOLDER_NAME:
        raise UnsafeName(f"an id of {len(name)} characters is too long for a folder name")
    if any(ch in _FORBIDDEN or ord(ch) < 32 for ch in name):
        raise UnsafeName("the id contains a character a folder name cannot hold")
    if name[-1] in ". " or name[0] == " ":
        raise UnsafeName("the id starts or ends with a space or ends with a dot")
    if name.split(".")[0].strip().upper() in _RESERVED:
        raise UnsafeName("the id is a Windows device name")
    folder = root / name
    if folder.resolve().parent != root.resolve():
        raise UnsafeName(f"the id's folder leads outside {root}")
    return folder


def write_image_files(
    folder: Path, image: ImageView, patient: PatientView, jpeg: bytes, encoding: str, watermark: str
) -> str:
    """Write the files of one image in `thumbfolder.SUFFIXES` order (the CSV last); returns the file stem."""
    folder.mkdir(exist_ok=True)
    stem = thumbfolder.file_stem(image)
    thumbnail = stem + thumbfolder.THUMBNAIL_SUFFIX
    contents = {
        thumbfolder.THUMBNAIL_SUFFIX: jpeg,
        thumbfolder.JSON_SUFFIX: thumbfolder.json_bytes(image, patient, thumbnail, watermark),
        thumbfolder.CSV_SUFFIX: thumbfolder.csv_bytes(image, patient, thumbnail, encoding),
    }
    for suffix in thumbfolder.SUFFIXES:
        write_atomic(folder / (stem + suffix), contents[suffix])
    return stem


def remove_image_files(folder: Path, belongs: Callable[[int], bool]) -> int:
    """Remove from `folder` the files of every image whose JSON names a patient `belongs` accepts; the
    number of images removed. Files that are not ours (no JSON of our format) are left alone; the folder
    goes when nothing is left in it. A missing folder holds nothing."""
    removed = 0
    try:
        documents = [
            entry for entry in folder.iterdir() if entry.suffix == thumbfolder.JSON_SUFFIX and entry.is_file()
        ]
    except FileNotFoundError:
        return 0
    for document in documents:
        try:
            owner = thumbfolder.image_owner(document.read_bytes()[:MAX_JSON_BYTES])
        except OSError:
            continue
        if owner is None or not belongs(owner):
            continue
        # the CSV first: an import watching for it sees no half set
        for suffix in reversed(thumbfolder.SUFFIXES):
            document.with_suffix(suffix).unlink(missing_ok=True)
        removed += 1
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when empty
    return removed


async def _follow_chart(profile_name: str, root: Path, folder: Path, patient_id: int, retired: Any) -> None:
    """A chart number passes from patient to patient (Dentrix lets users renumber and reuse them): the
    folder of a chart holds only its current holder's images, and a renumbered patient's files leave the
    folder of its old number (`retired`, from the service's message), so a PMS looking a patient up by
    chart never shows another patient's images."""
    removed = await asyncio.to_thread(remove_image_files, folder, lambda owner: owner != patient_id)
    if isinstance(retired, str) and retired and retired != folder.name:
        with contextlib.suppress(UnsafeName):
            old = await asyncio.to_thread(patient_folder, root, retired)
            removed += await asyncio.to_thread(remove_image_files, old, lambda owner: owner == patient_id)
    if removed:
        log.info("thumbnails removed", extra={"channel": channel_name(profile_name), "images": removed})


def make_sender(profile_name: str) -> Sender:
    """The outbox sender writing one profile's thumbnail folder."""

    async def send(rt: Runtime, item: OutboxItem) -> None:
        profile: LaunchProfile = getattr(rt.settings, profile_name)
        root = profile.thumbnail_dir
        if root is None:
            raise Undeliverable(f"[{profile_name}] thumbnail_dir is no longer configured")
        origin = Origin(protocol=profile_name, transport="folder", actor=channel_name(profile_name))
        link_id = item.payload.get("link_id")
        image_ids = [int(i) for i in item.payload.get("image_ids", [])]
        patient, images = await rt.service.images_for_push(
            origin, item.patient_id, int(link_id) if link_id is not None else None, image_ids
        )
        if patient is None or not images:
            return  # deleted since: nothing left to show
        by_chart = profile.id_field == "chart_number"
        name = patient.chart_number if by_chart else patient.pms_id
        if not by_chart and patient.pms_system != profile.pms_system:
            raise Undeliverable(f"patient {patient.id} is no longer linked to {profile.pms_system}")
        if not name:
            raise Undeliverable(f"patient {patient.id} has no {profile.id_field.replace('_', ' ')}")
        if not await asyncio.to_thread(root.is_dir):
            raise DeliveryError(f"the thumbnail folder {root} is not reachable")  # a share that is down
        try:
            folder = await asyncio.to_thread(patient_folder, root, name)
        except UnsafeName as exc:
            raise Undeliverable(
                f"no thumbnail folder for patient {patient.id} from its {profile.id_field.replace('_', ' ')}:"
                f" {exc}"
            ) from None
        if by_chart:
            await _follow_chart(profile_name, root, folder, patient.id, item.payload.get("retired_chart"))
        for image in images:
            jpeg = await asyncio.to_thread((await rt.imaging.thumbnail(image)).read_bytes)
            await asyncio.to_thread(
                write_image_files,
                folder,
                image,
                patient,
                jpeg,
                codepage(profile.encoding),
                rt.settings.thumbnails.watermark,
            )
        log.info("thumbnails written", extra={"channel": channel_name(profile_name), "images": len(images)})

    return send


def thumbnail_workers(rt: Runtime) -> Coroutine[Any, Any, None] | None:
    """The daemon worker: one outbox worker per profile whose thumbnail folder is on (None: none is)."""
    from bridge.outbox import OutboxWorker  # bridge.outbox imports this module for its target rule

    workers = [
        OutboxWorker(rt, channel_name(name), make_sender(name))
        for name, _profile in enabled_profiles(rt.settings)
    ]
    if not workers:
        return None
    return _run_all(workers)


async def _run_all(workers: list[OutboxWorker]) -> None:
    await asyncio.gather(*(worker.run() for worker in workers))
