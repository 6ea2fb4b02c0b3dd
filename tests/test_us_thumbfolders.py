"""Thumbnails back to the PMS through a folder, driven by the persistent outbox.

End to end with a real daemon: a Dentrix launch, an image upload over the REST API, then every file the
bridge wrote is opened and checked (the watermarked JPEG, the JSON, the cp1252 CSV). On a Runtime: which
links and chart numbers are announced to which channel, ids that are no safe folder name, a share that is
down, and a restart in the middle of a push.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bridge.config import Settings
from bridge.logs import JsonFormatter
from bridge.model import Action, Demographics, IdKind, Origin, PatientRequest, Sex
from bridge.outbox import OutboxWorker
from bridge.runtime import Runtime
from bridge.service import CHART_KEYED
from bridge.store.models import OutboxMessage
from bridge.thumbfolders import channel_name, folder_targets, make_sender, patient_folder
from protocols.thumbfolder import CSV_COLUMNS
from tests.test_us_launch import run

ORIGIN = Origin(protocol="dentrix", transport="cli", workstation="OP1", actor="pytest")


def grey_png(width: int = 640, height: int = 480, value: int = 128) -> bytes:
    """A flat grey X-ray stand-in: anything on its thumbnail that is not flat grey is the watermark."""
    out = io.BytesIO()
    Image.fromarray(np.full((height, width), value, dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    for filename, data in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def wait_for(path: Path, deadline_s: float = 60) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.1)
    return False


def test_new_images_land_in_the_patients_folder_watermarked_with_metadata(
    daemon_factory: Any, tmp_path: Path
) -> None:
    root = tmp_path / "SmartImage"
    root.mkdir()
    daemon = daemon_factory(dentrix={"thumbnails": "yes", "thumbnail_dir": str(root)})
    code, _ = run(daemon, "dentrix", 'SET 01001 CN="SMIJO0" LN="Côté" FN="Zoë" BD=19600506')
    assert code == 0
    status, body = daemon.request("GET", "/api/v1/patients?pms_system=dentrix&pms_id=01001")
    [patient] = json.loads(body)["items"]
    form, content_type = multipart(
        {"tooth_numbers": "11,21", "captured_at": "2026-03-04T10:20:30", "category": "intraoral-xray"},
        {"bw.png": grey_png()},
    )
    status, body = daemon.request(
        "POST", f"/api/v1/patients/{patient['id']}/images", form, headers={"Content-Type": content_type}
    )
    assert status == 201, body
    [image] = json.loads(body)["items"]
    stem = f"20260304-102030_{image['id']}"
    folder = root / "01001"  # named by the PMS id, leading zero kept
    assert wait_for(folder / f"{stem}.csv"), daemon.log()[-2000:]
    assert sorted(p.name for p in folder.iterdir()) == [f"{stem}.csv", f"{stem}.jpg", f"{stem}.json"]
    assert sorted(p.name for p in root.iterdir()) == ["01001"]

    # The thumbnail: the API's watermarked JPEG, 24-bit, 256 on the long edge, text on flat grey.
    jpeg = (folder / f"{stem}.jpg").read_bytes()
    status, api_thumbnail = daemon.request("GET", f"/api/v1/images/{image['id']}/thumbnail")
    assert status == 200 and jpeg == api_thumbnail
    with Image.open(io.BytesIO(jpeg)) as thumb:
        assert (thumb.format, thumb.mode, thumb.size) == ("JPEG", "RGB", (256, 192))
        pixels = np.asarray(thumb.convert("L"), dtype=np.int16)
    assert np.abs(pixels[:64, 128:] - 128).max() < 8  # untouched grey away from the stamp
    assert np.abs(pixels - 128).max() > 60  # the watermark is there

    meta = json.loads((folder / f"{stem}.json").read_text(encoding="utf-8"))
    assert meta["format"] == "pms-bridge-thumbnail/1"
    assert meta["patient"] == {
        "pms_system": "dentrix",
        "pms_id": "01001",
        "chart_number": "SMIJO0",
        "last_name": "Côté",
        "first_name": "Zoë",
        "middle_name": "",
        "birth_date": "1960-05-06",
        "sex": "U",
    }
    assert meta["image"]["id"] == image["id"] and meta["image"]["sha256"] == image["sha256"]
    assert (
        meta["image"]["tooth_numbers"] == [11, 21] and meta["image"]["captured_at"] == "2026-03-04T10:20:30"
    )
    assert meta["thumbnail"] == {"file": f"{stem}.jpg", "watermark": daemon.settings.thumbnails.watermark}
    assert meta["links"]["thumbnail"] == f"/api/v1/images/{image['id']}/thumbnail"

    raw = (folder / f"{stem}.csv").read_bytes()
    assert raw.count(b"\r\n") == 2 and "Côté".encode("cp1252") in raw  # the PMS's code page, CRLF
    [row] = list(csv.DictReader(io.StringIO(raw.decode("cp1252"))))
    assert tuple(row) == CSV_COLUMNS
    assert (row["image_id"], row["pms_id"], row["chart_number"], row["last_name"]) == (
        str(image["id"]),
        "01001",
        "SMIJO0",
        "Côté",
    )
    assert (row["tooth_numbers"], row["thumbnail"], row["sha256"]) == (
        "11 21",
        f"{stem}.jpg",
        image["sha256"],
    )


# --------------------------------------------------------------------------------------------------
# On a Runtime


@asynccontextmanager
async def runtime_with(settings: Settings) -> AsyncIterator[Runtime]:
    rt = Runtime.build(settings)
    try:
        yield rt
    finally:
        await rt.audit.flush()
        rt.close()


async def open_patient(rt: Runtime, pms_id: str, *, system: str = "dentrix", chart: str = "") -> int:
    outcome = await rt.service.handle(
        PatientRequest(
            action=Action.OPEN,
            origin=ORIGIN,
            pms_system=system,
            pms_id=pms_id,
            chart_number=chart,
            id_kind=IdKind.PMS_ID if pms_id else IdKind.CHART_NUMBER,
            demographics=Demographics(
                last_name="Smith", first_name="John", birth_date=date(1960, 5, 6), sex=Sex.MALE
            ),
        )
    )
    assert outcome.patient is not None, outcome.message
    return outcome.patient.id


async def add_image(rt: Runtime, patient_id: int) -> int:
    data = grey_png(400, 300, value=secrets.randbelow(200))  # larger than a thumbnail, as X-rays are
    new = await rt.imaging.ingest(data, captured_at=datetime(2026, 1, 2))
    [view] = await rt.service.add_images(ORIGIN, patient_id, [new])
    return view.id


async def outbox(rt: Runtime) -> list[tuple[str, str, str]]:
    def work(session: Any) -> list[tuple[str, str, str]]:
        return [
            (m.channel, m.state, m.last_error)
            for m in session.query(OutboxMessage).order_by(OutboxMessage.id)
        ]

    return await rt.db.read(work)


def profile_settings(root: Path, **extra: str) -> dict[str, str]:
    return {"thumbnails": "yes", "thumbnail_dir": str(root), **extra}


def test_target_rule_by_pms_system_or_by_chart_number(make_settings: Any, tmp_path: Path) -> None:
    settings = make_settings(
        dentrix=profile_settings(tmp_path, id_field="chart_number"),
        eaglesoft=profile_settings(tmp_path, pms_system="ES-Main"),
        dexis={"thumbnail_dir": str(tmp_path)},  # folder set but switched off
    )
    assert folder_targets(settings, "eaglesoft", "ES-Main") == ["eaglesoft-thumbnails"]
    assert folder_targets(settings, "dexis", "ES-Main") == ["eaglesoft-thumbnails"]  # by system, any protocol
    assert folder_targets(settings, "dexis", "dexis") == []
    assert folder_targets(settings, CHART_KEYED, "") == ["dentrix-thumbnails"]


async def test_one_message_per_channel_even_when_link_and_chart_both_match(
    make_settings: Any, tmp_path: Path
) -> None:
    settings = make_settings(
        dentrix=profile_settings(tmp_path / "d", id_field="chart_number"),
        cliniview=profile_settings(tmp_path / "c"),
    )
    async with runtime_with(settings) as rt:
        both = await open_patient(rt, "7", system="cliniview", chart="CH7")
        await add_image(rt, both)
        no_chart = await open_patient(rt, "8", system="cliniview")
        await add_image(rt, no_chart)
        assert sorted(c for c, _s, _e in await outbox(rt)) == [
            "cliniview-thumbnails",
            "cliniview-thumbnails",
            "dentrix-thumbnails",
        ]


@pytest.mark.parametrize(
    "pms_id",
    [
        *("..", "../evil", "a/b", "a\\b", "CON", "nul.txt", "x.", "C:evil", "x|y"),
        *(
            "COM\u00b9",
            "lpt\u00b3.txt",
            "COM0",
            "LPT0",
            "CONIN$",
            "conout$.jpg",
            "CONIN$ .txt",
            "Com\u00b2 ..x",
        ),
    ],
)
async def test_an_id_that_is_no_safe_folder_name_fails_the_push_and_writes_nothing(
    make_settings: Any, tmp_path: Path, pms_id: str
) -> None:
    share = tmp_path / "share"
    root = share / "thumbs"
    root.mkdir(parents=True)
    async with runtime_with(make_settings(dentrix=profile_settings(root))) as rt:
        await add_image(rt, await open_patient(rt, pms_id))
        worker = OutboxWorker(rt, "dentrix-thumbnails", make_sender("dentrix"))
        assert await worker.run_once() == 1
        [(channel, state, error)] = await outbox(rt)
        assert (channel, state) == ("dentrix-thumbnails", "failed")
        assert "no thumbnail folder for patient" in error
        assert list(root.iterdir()) == []
        assert list(share.iterdir()) == [root]


def test_windows_device_names_are_refused_in_every_spelling_and_near_misses_are_not(tmp_path: Path) -> None:
    refused = ["COM\u00b9", "com\u00b2", "LPT\u00b3", "lpt\u00b9.csv", "COM0", "lpt0", "CONIN$", "conout$"]
    refused += ["CONIN$.txt", "CONOUT$ .jpg", "Conin$..txt", "COM0 . x", "NUL", "aux.tar.gz"]
    for name in refused:
        with pytest.raises(ValueError, match="is a Windows device name"):
            patient_folder(tmp_path, name)
    for name in ["COM10", "COM\u2074", "LPT", "CONIN", "CONOUT", "XCON$", "1042", "COM1X"]:
        assert patient_folder(tmp_path, name) == tmp_path / name


def test_a_symbolic_link_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "thumbs"
    root.mkdir()
    (root / "1001").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="leads outside"):
        patient_folder(root, "1001")
    assert patient_folder(root, "SMIJO0") == root / "SMIJO0"
    with pytest.raises(ValueError, match="starts or ends with a space"):  # the service strips ids; still
        patient_folder(root, " x")


async def test_pushes_survive_a_share_that_is_down_and_a_restart(make_settings: Any, tmp_path: Path) -> None:
    root = tmp_path / "share"
    settings = make_settings(dentrix=profile_settings(root, id_field="chart_number"))
    async with runtime_with(settings) as rt:
        patient = await open_patient(rt, "", chart="SMIJO0")
        image_id = await add_image(rt, patient)
        worker = OutboxWorker(rt, channel_name("dentrix"), make_sender("dentrix"), backoff=(0.0,))
        assert await worker.run_once() == 1  # the share is down: kept for a retry
        [(_c, state, error)] = await outbox(rt)
        assert state == "pending" and "is not reachable" in error
        root.mkdir()

        def cut_off(session: Any) -> None:  # the daemon died while writing
            session.query(OutboxMessage).update({"state": "sending"})

        await rt.db.write(cut_off)

    async with runtime_with(settings) as restarted:
        worker = OutboxWorker(restarted, channel_name("dentrix"), make_sender("dentrix"), backoff=(0.0,))
        await worker.recover()  # not known to be written: due again
        assert await worker.run_once() == 1
        assert [s for _c, s, _e in await outbox(restarted)] == ["done"], await outbox(restarted)
    names = sorted(p.name for p in (root / "SMIJO0").iterdir())
    assert names == [f"20260102-000000_{image_id}.{ext}" for ext in ("csv", "jpg", "json")]


async def test_a_chart_folder_holds_only_its_current_holders_images(
    make_settings: Any, tmp_path: Path
) -> None:
    """Dentrix lets users renumber charts and reuse numbers; a PMS looking patients up by chart number
    must never find another patient's X-ray in the folder of the number it asks for."""
    root = tmp_path / "SmartImage"
    root.mkdir()
    settings = make_settings(dentrix=profile_settings(root, id_field="chart_number"))
    async with runtime_with(settings) as rt:
        worker = OutboxWorker(rt, channel_name("dentrix"), make_sender("dentrix"))

        def owners(chart: str) -> list[int]:
            return sorted(
                json.loads(p.read_bytes())["image"]["patient_id"] for p in (root / chart).glob("*.json")
            )

        ann = await open_patient(rt, "801", chart="100")
        await add_image(rt, ann)
        assert await worker.run_once() == 1
        assert owners("100") == [ann]
        (root / "100" / "notes.txt").write_text("the practice's own file")

        await open_patient(rt, "801", chart="300")  # renumbered: her images move with her
        assert await worker.run_once() == 1
        assert owners("300") == [ann]
        assert sorted(p.name for p in (root / "100").iterdir()) == ["notes.txt"]  # not ours: kept

        bob = await open_patient(rt, "802", chart="100")  # the number is reused
        await add_image(rt, bob)
        assert await worker.run_once() == 1
        assert owners("100") == [bob]
        assert owners("300") == [ann]
        assert all(state == "done" for _c, state, _e in await outbox(rt))


async def test_a_clinicians_change_reaches_the_thumbnail_folder(make_settings: Any, tmp_path: Path) -> None:
    """Rotated (or renumbered teeth, another category) in the viewer: the PMS's folder shows it too."""
    root = tmp_path / "SmartImage"
    root.mkdir()
    async with runtime_with(make_settings(dentrix=profile_settings(root))) as rt:
        worker = OutboxWorker(rt, channel_name("dentrix"), make_sender("dentrix"))
        image_id = await add_image(rt, await open_patient(rt, "01001"))
        assert await worker.run_once() == 1
        [document] = (root / "01001").glob("*.json")
        assert json.loads(document.read_bytes())["image"]["rotation"] == 0
        await rt.service.update_image(ORIGIN, image_id, rotation=90, tooth_numbers=[11])
        assert await worker.run_once() == 1
        written = json.loads(document.read_bytes())["image"]
        assert (written["rotation"], written["tooth_numbers"]) == (90, [11])
        await rt.service.update_image(ORIGIN, image_id, rotation=90)  # no change: nothing to send
        assert await worker.run_once() == 0


async def test_a_failed_push_logs_and_records_no_pms_id(
    make_settings: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An id that is no folder name, and a folder that cannot be written (whose OSError names the path
    `<thumbnail_dir>/<PMS id>`): the log and last_error say why, without the id."""
    caplog.set_level(logging.DEBUG)
    root = tmp_path / "thumbs"
    root.mkdir()
    (root / "KX4243").write_bytes(b"")  # a file where the patient's folder would go
    async with runtime_with(make_settings(dentrix=profile_settings(root))) as rt:
        await add_image(rt, await open_patient(rt, "Meier/4242"))
        await add_image(rt, await open_patient(rt, "KX4243"))
        worker = OutboxWorker(rt, "dentrix-thumbnails", make_sender("dentrix"))
        assert await worker.run_once() == 2
        [(_c, failed, reason), (_c2, pending, retry)] = await outbox(rt)
    assert (failed, pending) == ("failed", "pending")
    assert reason.endswith("from its pms id: the id contains a character a folder name cannot hold")
    assert retry == "FileExistsError: File exists"
    logged = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    assert "push undeliverable" in logged and "push failed; will retry" in logged
    for pms_id in ("Meier", "4242", "KX4243"):
        assert pms_id not in logged and pms_id not in reason + retry, logged
