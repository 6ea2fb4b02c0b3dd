"""VDDS-media end to end: the real `pms-bridge vdds` module against real daemons, the samples, the watched
folder, events and files, a locked store, registration, and the launch client's imports."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import tracemalloc
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bridge import launch as launch_client
from bridge.config import load_settings
from bridge.doctor import CheckFailed
from bridge.events import AcquisitionRequested, Event, ImageViewRequested, PatientOpened
from bridge.exits import ExitCode
from bridge.handlers import vdds_register
from bridge.handlers.base import Launch
from bridge.handlers.vdds import classifier, folder_handler, handle, oversized, remove_old_files
from bridge.model import Origin
from bridge.runtime import Runtime
from bridge.watch import FolderWatcher
from protocols import vdds_exchange
from protocols.common import decode, parse_ini
from tests.conftest import DaemonProcess, pms_bridge_command, write_config
from tests.support.dicomfiles import dental_dataset, write

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


def stage1(patid: str = "0815", *, pvs: str = "TESTPVS", extra: str = "", last: str = "Müller") -> bytes:
    text = (
        f"[PATIENT]\r\nPVS={pvs}\r\nPATID={patid}\r\nLASTNAME={last}\r\nFIRSTNAME=Heinz, von\r\n"
        f"BIRTHDAY=19710101\r\nSEX=M\r\n{extra}READY=0\r\nERRORLEVEL=0\r\nERRORTEXT=\r\n"
    )
    return text.encode("cp1252")


def request_file(kind: str, body: str) -> bytes:
    return f"[{kind}]\r\n{body}READY=0\r\nERRORLEVEL=0\r\nERRORTEXT=\r\n".encode("cp1252")


def keys(data: bytes, section: str) -> dict[str, str]:
    return dict(parse_ini(decode(data, "cp1252").text)[section.upper()].items())


def png(width: int = 64, height: int = 48) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height), 90).save(out, "PNG")
    return out.getvalue()


def run_module(config: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`pms-bridge vdds ARGS` as a PVS starts it."""
    env = {**os.environ, "PMS_BRIDGE_CONFIG": str(config)}
    return subprocess.run(
        [*pms_bridge_command(), "vdds", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def launch(content: bytes, *args: str, transport: str = "cli") -> Launch:
    return Launch("vdds", args=args, filename="C:\\TEMP\\MME505F.tmp", content=content, transport=transport)


def collect(rt: Runtime) -> list[Event]:
    seen: list[Event] = []
    rt.bus.subscribe(seen.append)
    return seen


async def patient_with_images(rt: Runtime, patid: str, *images: tuple[bytes, dict[str, Any]]) -> list[int]:
    """A VDDS patient (created through the handler) with images added as an upload adds them."""
    reply = await handle(rt, launch(stage1(patid)))
    assert reply.exit_code == ExitCode.OK, reply.message
    found = await rt.service.search_patients(Origin("test"), pms_id=patid)
    new = [await rt.imaging.ingest(data, **meta) for data, meta in images]
    added = await rt.service.add_images(Origin("test"), found[0].id, new)
    return [image.id for image in added]


# --------------------------------------------------------------------------------------------------
# The samples, through the real module against real daemons


@pytest.mark.slow
def test_every_sample_replays_on_fresh_stores() -> None:
    result = subprocess.run(
        [*pms_bridge_command(), "replay", str(SAMPLES), "--case", "vdds/*"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    cases = len([p for p in (SAMPLES / "vdds").iterdir() if (p / "case.json").exists()])
    assert cases >= 20
    assert result.stdout.strip().endswith(f"{cases} pass"), result.stdout


def test_samples_replay_against_a_running_daemon(daemon: DaemonProcess) -> None:
    """The cases that need no settings of their own, on SQLite and PostgreSQL."""
    result = subprocess.run(
        [*pms_bridge_command(), "replay", str(SAMPLES), "--case", "vdds/*", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.search(r"(\d+) pass", result.stdout)
    assert passed is not None and int(passed.group(1)) >= 20, result.stdout


# --------------------------------------------------------------------------------------------------
# Arbitrary bytes: always READY=1, the daemon keeps serving

VDDS_LINES = st.sampled_from(
    [
        "[PATIENT]",
        "[PATID]",
        "[MMOIDS]",
        "[MMOS]",
        "PVS=FUZZ",
        "PATID=0042",
        "LASTNAME=Müller",
        "BIRTHDAY=31.02.1970",
        "BIRTHDAY=19710101",
        "SEX=W",
        "COUNT=3",
        "MMOID1=1",
        "MMOID2=abc",
        "EXT=TIF",
        "READY=0",
        "READY=1",
        "ERRORLEVEL=0",
        "ERRORTEXT=",
        "ERROR-TEXT=",
        "=",
        "[",
        "",
    ]
)
EXCHANGE_BYTES = st.one_of(
    st.binary(max_size=3000),
    st.builds(
        lambda lines, encoding, newline: "".join(line + newline for line in lines).encode(
            encoding, "replace"
        ),
        st.lists(VDDS_LINES, max_size=20),
        st.sampled_from(["cp1252", "utf-16", "utf-8-sig", "utf-16-be"]),
        st.sampled_from(["\r\n", "\n", "\r"]),
    ),
)
_names = count()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=EXCHANGE_BYTES)
def test_arbitrary_exchange_files_end_with_ready_1(
    daemon: DaemonProcess, tmp_path: Path, data: bytes
) -> None:
    path = tmp_path / f"NNT{next(_names):04d}.tmp"
    path.write_bytes(data)
    result = run_module(daemon.config, str(path))
    assert result.returncode in (ExitCode.OK, ExitCode.ERROR), result.stderr
    answer = path.read_bytes()
    assert vdds_exchange.read_exchange(answer).answered, answer[:300]
    status, _body = daemon.request("GET", "/healthz", token=None)
    assert status == 200


# --------------------------------------------------------------------------------------------------
# The module in the daemon: events, files, every failure answered


async def test_each_stage_publishes_its_event(make_settings: Any) -> None:
    rt = Runtime.build(make_settings(vdds={"stage5": "flagged"}))
    try:
        seen = collect(rt)
        [image_id] = await patient_with_images(rt, "0815", (png(), {}))
        assert [type(e) for e in seen if not e.name.startswith("images")] == [PatientOpened]
        reply = await handle(rt, launch(stage1("0815", extra="ACQUIRE=1\r\n")))
        assert reply.exit_code == ExitCode.OK
        assert isinstance(seen[-1], AcquisitionRequested) and seen[-1].pms_id == "0815"
        view = await handle(rt, Launch("vdds", args=(str(image_id),)))
        assert view.exit_code == ExitCode.OK and view.content is None
        assert isinstance(seen[-1], ImageViewRequested) and seen[-1].image_id == image_id
    finally:
        rt.close()


async def test_thumbnails_and_copies_for_the_pvs(make_settings: Any, tmp_path: Path) -> None:
    export = tmp_path / "export"
    rt = Runtime.build(make_settings(vdds={"export_dir": str(export)}))
    try:
        xray, photo = await patient_with_images(
            rt, "0815", (png(320, 240), {"rotation": 90}), (png(300, 200), {"comment": "Foto"})
        )
        listed = await handle(rt, launch(request_file("PATID", "PVS=TESTPVS\r\nPATID=0815\r\n")))
        assert listed.exit_code == ExitCode.OK and listed.content is not None
        objects = parse_ini(decode(listed.content).text)
        assert objects["MMOS"].get("COUNT") == "2"
        for k in ("MMO1", "MMO2"):
            thumbnail = Path(objects[k].get("THUMBNAIL"))
            assert thumbnail.parent == export / "thumbnails"
            with Image.open(thumbnail) as img:
                assert img.format == "JPEG"
        body = "PVS=TESTPVS\r\nCOUNT=2\r\nMMOID1={}\r\nMMOID2={}\r\nEXT={}\r\n"
        for fmt, pil_format in (("JPG", "JPEG"), ("PNG", "PNG"), ("TIF", "TIFF"), ("DCM", None)):
            reply = await handle(rt, launch(request_file("MMOIDS", body.format(xray, photo, fmt))))
            assert reply.exit_code == ExitCode.OK and reply.content is not None, reply.message
            paths = keys(reply.content, "MMOPATH")
            first, second = Path(paths["MMOID1"]), Path(paths["MMOID2"])
            assert first.parent.parent == export and first.suffix == f".{fmt.lower()}"
            if pil_format is None:
                checked = subprocess.run(
                    ["dciodvfy", str(first)], capture_output=True, text=True, check=False
                )
                assert "Error" not in checked.stdout + checked.stderr
                continue
            with Image.open(first) as img:
                assert (img.format, img.size) == (pil_format, (240, 320))  # the clinician's rotation applied
            with Image.open(second) as img:
                assert img.size == (300, 200)
    finally:
        rt.close()


async def test_small_8_bit_and_colour_images_get_their_thumbnails(make_settings: Any, tmp_path: Path) -> None:
    """Images no larger than the thumbnail size, 8-bit grey and colour (docs/vdds.md once listed them as
    a known gap: listed without a thumbnail): each is listed with its JPEG thumbnail, in its colours."""
    rt = Runtime.build(make_settings(vdds={"export_dir": str(tmp_path / "export")}))
    try:
        colour = io.BytesIO()
        Image.new("RGB", (60, 40), (200, 40, 30)).save(colour, "PNG")
        await patient_with_images(rt, "0815", (png(64, 48), {}), (colour.getvalue(), {"comment": "Foto"}))
        listed = await handle(rt, launch(request_file("PATID", "PVS=TESTPVS\r\nPATID=0815\r\n")))
        assert listed.exit_code == 0 and listed.content is not None
        objects = parse_ini(decode(listed.content).text)
        reds = []
        for k in ("MMO1", "MMO2"):
            with Image.open(objects[k].get("THUMBNAIL")) as img:
                assert img.format == "JPEG" and max(img.size) <= rt.settings.thumbnails.size
                pixel = img.convert("RGB").getpixel((2, 2))
                assert isinstance(pixel, tuple)  # an RGB image's pixel is (red, green, blue)
                red, green, _blue = pixel
                reds.append(red - green > 100)
        assert sorted(reds) == [False, True]  # the photo's red, the X-ray's grey
    finally:
        rt.close()


async def test_a_locked_store_is_answered_with_a_timeout(tmp_path: Path) -> None:
    """A store that does not answer in time: ERRORLEVEL=1 and READY=1, never a hanging PVS."""
    database = tmp_path / "bridge.db"
    config = write_config(tmp_path / "home", f"sqlite:///{database}", {"vdds": {"answer_timeout": 1}})
    rt = Runtime.build(load_settings(str(config)))
    lock = sqlite3.connect(database, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        reply = await handle(rt, launch(stage1()))
        assert reply.exit_code == ExitCode.ERROR and reply.content is not None
        answer = keys(reply.content, "PATIENT")
        assert answer["READY"] == "1"
        assert answer["ERRORTEXT"] == vdds_exchange.message("de", "timeout")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        await asyncio.to_thread(rt.close)


async def test_a_switched_off_module_still_answers(make_settings: Any) -> None:
    rt = Runtime.build(make_settings(vdds={"enabled": "no"}))
    try:
        reply = await handle(rt, launch(stage1()))
        assert reply.content is not None and keys(reply.content, "PATIENT")["READY"] == "1"
        assert reply.exit_code == ExitCode.ERROR and "ausgeschaltet" in reply.message
        view = await handle(rt, Launch("vdds", args=("1",)))
        assert view.exit_code == ExitCode.ERROR
    finally:
        rt.close()


# --------------------------------------------------------------------------------------------------
# The watched exchange folder


@asynccontextmanager
async def watched_folder(
    make_settings: Any, tmp_path: Path
) -> AsyncIterator[tuple[Runtime, FolderWatcher, Path]]:
    """A runtime and the watcher of its VDDS exchange folder (`tmp_path/share`), as the daemon builds them."""
    folder = tmp_path / "share"
    folder.mkdir()
    settings_ = make_settings(vdds={"exchange_dir": str(folder)})
    rt = Runtime.build(settings_)
    try:
        classify = classifier(settings_.vdds)
        yield (
            rt,
            FolderWatcher(
                rt,
                "vdds",
                folder,
                folder_handler(rt),
                setting="[vdds] exchange_dir",
                classify=classify,
                oversized=oversized(rt),
            ),
            folder,
        )
    finally:
        rt.close()


async def test_a_file_still_being_written_is_answered_once_it_is_complete(
    make_settings: Any, tmp_path: Path
) -> None:
    async with watched_folder(make_settings, tmp_path) as (rt, watcher, folder):
        request = folder / "MME505F.tmp"
        complete = stage1("4711")
        request.write_bytes(complete[:60])  # the PVS is half way through
        assert await watcher.scan()
        assert request.read_bytes() == complete[:60]
        request.write_bytes(complete)
        assert await watcher.scan()
        answer = request.read_bytes()
        assert keys(answer, "PATIENT")["READY"] == "1" and keys(answer, "PATIENT")["ERRORLEVEL"] == "0"
        [patient] = await rt.service.search_patients(Origin("test"), pms_id="4711")
        assert patient.last_name == "Müller"
        await watcher.scan()
        assert request.read_bytes() == answer  # handled once

        truncated = folder / "NNT0002.tmp"
        truncated.write_bytes(b"[PATIENT]\r\nPVS=TESTPVS\r\nPATID=4712\r\nLASTNAME=M")
        await watcher.scan()
        assert truncated.read_bytes().endswith(b"LASTNAME=M")  # may still grow
        await watcher.scan()  # stable: answered, not served from half the data
        assert keys(truncated.read_bytes(), "PATIENT")["ERRORLEVEL"] == "1"
        assert await rt.service.search_patients(Origin("test"), pms_id="4712") == []
        (folder / "thumb.jpg").write_bytes(png())
        await watcher.scan()
        await watcher.scan()
        assert (folder / "thumb.jpg").read_bytes() == png()  # not a request: left alone


# A reused exchange file (WritePrivateProfileString leaves old sections): the answered one is history

REUSED_STAGE2 = (
    b"[PATIENT]\r\nPVS=Z1\r\nPATID=N1\r\nLASTNAME=x\r\nERRORLEVEL=0\r\nERRORTEXT=\r\nREADY=1\r\n\r\n"
    b"[PATID]\r\nPVS=Z1\r\nPATID=002509\r\nREADY=0\r\nERRORLEVEL=0\r\nERRORTEXT=\r\n"
)
OLD_EXPORT = b"[MMOIDS]\r\nPVS=Z1\r\nCOUNT=1\r\nMMOID1=1\r\nERRORLEVEL=0\r\nERRORTEXT=\r\nREADY=1\r\n\r\n"


def patients(daemon: DaemonProcess, pms_id: str) -> list[dict[str, Any]]:
    status, body = daemon.request("GET", f"/api/v1/patients?pms_id={pms_id}")
    assert status == 200, body
    items: list[dict[str, Any]] = json.loads(body)["items"]
    return items


def test_a_reused_file_serves_its_new_request_not_the_answered_one(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    request = tmp_path / "MME505F.tmp"
    request.write_bytes(REUSED_STAGE2)
    result = run_module(daemon.config, str(request))
    assert result.returncode == ExitCode.OK, result.stderr
    assert "MMOINFEXPORT" in result.stdout and "N1" not in result.stdout
    answer = request.read_bytes()
    assert answer.startswith(REUSED_STAGE2.split(b"[PATID]")[0])  # the answered section keeps its bytes
    assert keys(answer, "PATID") == {
        "PVS": "Z1",
        "PATID": "002509",
        "ERRORLEVEL": "0",
        "ERRORTEXT": "",
        "READY": "1",
    }
    assert keys(answer, "MMOS") == {"COUNT": "0"}  # 002509 is not known: no images
    assert patients(daemon, "N1") == []  # the previous patient was not served (and so not created)

    request.write_bytes(OLD_EXPORT + stage1("SP2", pvs="Z1"))
    result = run_module(daemon.config, str(request))
    assert result.returncode == ExitCode.OK, result.stderr
    answer = request.read_bytes()
    assert answer.startswith(OLD_EXPORT)
    assert "MMOPATH" not in parse_ini(decode(answer).text)  # the old export was not run again
    assert (keys(answer, "PATIENT")["READY"], keys(answer, "PATIENT")["ERRORLEVEL"]) == ("1", "0")
    [created] = patients(daemon, "SP2")
    assert (created["pms_system"], created["last_name"]) == ("Z1", "Müller")


def upload_png(daemon: DaemonProcess, patient_id: int) -> None:
    """One image uploaded through the daemon's REST API, as an acquisition adds it."""
    head = 'Content-Disposition: form-data; name="file"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
    body = b"--cut\r\n" + head.encode() + png() + b"\r\n--cut--\r\n"
    headers = {"Content-Type": "multipart/form-data; boundary=cut"}
    status, reply = daemon.request("POST", f"/api/v1/patients/{patient_id}/images", body, headers=headers)
    assert status == 201, reply


def test_a_stage2_request_without_prxnr_lists_the_patient_stage1_made_with_one(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """The repo's stage-2 request carries no PRXNR: it must list the images of the patient stage 1 made
    with PRXNR=1, not answer "no images" for a patient keyed to no practice."""
    request = tmp_path / "MME505F.tmp"
    request.write_bytes(stage1("PR7", extra="PRXNR=1\r\n"))
    assert run_module(daemon.config, str(request)).returncode == ExitCode.OK
    [patient] = patients(daemon, "PR7")
    assert patient["practice_id"] == "1"
    upload_png(daemon, patient["id"])
    request.write_bytes(request_file("PATID", "PVS=TESTPVS\r\nPATID=PR7\r\n"))
    result = run_module(daemon.config, str(request))
    assert result.returncode == ExitCode.OK, result.stderr
    answer = request.read_bytes()
    assert keys(answer, "PATID")["ERRORLEVEL"] == "0"
    assert keys(answer, "MMOS")["COUNT"] == "1"
    assert [p["id"] for p in patients(daemon, "PR7")] == [patient["id"]]


def test_a_stage1_launch_with_prxnr_takes_the_patient_an_import_without_practice_made(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """`pms-bridge import` under an empty `[dicom] practice_id` (as init writes it), with `[dicom]
    pms_system` naming the PVS, makes patient 4711 without a practice; the PVS then launches 4711 with
    PRXNR=1. One patient, its link now of practice 1, with the imported image listed to the practice."""
    daemon = daemon_factory(dicom={"pms_system": "TESTPVS"})
    dicom = write(
        dental_dataset(patient_id="4711", name="Müller^Heinz", birth_date="19710101", sex="M"),
        tmp_path / "IO1.dcm",
    )
    env = {**os.environ, "PMS_BRIDGE_CONFIG": str(daemon.config)}
    imported = subprocess.run(
        [*pms_bridge_command(), "import", str(dicom)], capture_output=True, text=True, env=env, check=False
    )
    assert imported.returncode == 0, imported.stdout + imported.stderr
    [made] = patients(daemon, "4711")
    assert (made["pms_system"], made["practice_id"]) == ("TESTPVS", "")
    request = tmp_path / "MME505F.tmp"
    request.write_bytes(stage1("4711", extra="PRXNR=1\r\n"))
    result = run_module(daemon.config, str(request))
    assert result.returncode == 0, result.stdout + result.stderr
    assert keys(request.read_bytes(), "PATIENT")["ERRORLEVEL"] == "0"
    [patient] = patients(daemon, "4711")
    assert (patient["id"], patient["practice_id"]) == (made["id"], "1")
    request.write_bytes(request_file("PATID", "PVS=TESTPVS\r\nPATID=4711\r\nPRXNR=1\r\n"))
    result = run_module(daemon.config, str(request))
    assert result.returncode == 0, result.stdout + result.stderr
    assert keys(request.read_bytes(), "MMOS")["COUNT"] == "1"


def test_a_marriage_name_accepted_through_the_api_opens_the_patient_again(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """MAR2 sent as Meyer, then as Schmidt: a conflict, until a person accepts the PMS's data; then the
    same launch opens the patient (before, resolving only closed the conflict and the next launch opened
    a new one, for ever)."""
    request = tmp_path / "MME505F.tmp"
    request.write_bytes(stage1("MAR2", last="Meyer"))
    assert run_module(daemon.config, str(request)).returncode == ExitCode.OK
    request.write_bytes(stage1("MAR2", last="Schmidt"))
    assert run_module(daemon.config, str(request)).returncode == ExitCode.ERROR
    assert keys(request.read_bytes(), "PATIENT")["ERRORLEVEL"] != "0"
    status, body = daemon.request("GET", "/api/v1/conflicts")
    [conflict] = json.loads(body)["items"]
    resolution = json.dumps({"resolution": "married: Schmidt", "accept": True}).encode()
    status, body = daemon.request(
        "POST",
        f"/api/v1/conflicts/{conflict['id']}/resolve",
        resolution,
        headers={"Content-Type": "application/json"},
    )
    assert status == 200, body
    [patient] = patients(daemon, "MAR2")
    assert patient["last_name"] == "Schmidt"
    request.write_bytes(stage1("MAR2", last="Schmidt"))
    result = run_module(daemon.config, str(request))
    assert result.returncode == ExitCode.OK, result.stderr
    assert keys(request.read_bytes(), "PATIENT")["ERRORLEVEL"] == "0"
    status, body = daemon.request("GET", "/api/v1/conflicts")
    assert json.loads(body)["items"] == []


def test_a_file_with_two_unanswered_requests_is_refused_in_both(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    request = tmp_path / "NNTBA0E.tmp"
    two = stage1("A1") + b"\r\n" + request_file("PATID", "PVS=TESTPVS\r\nPATID=B2\r\n")
    request.write_bytes(two)
    result = run_module(daemon.config, str(request))
    assert result.returncode == ExitCode.ERROR
    answer = request.read_bytes()
    for section in ("PATIENT", "PATID"):
        found = keys(answer, section)
        assert (found["READY"], found["ERRORLEVEL"]) == ("1", "1")
        assert found["ERRORTEXT"].startswith("Die Übergabedatei enthält mehrere unbeantwortete Anfragen")
    assert keys(answer, "PATIENT")["LASTNAME"] == "Müller" and keys(answer, "PATID")["PATID"] == "B2"
    assert patients(daemon, "A1") == [] and patients(daemon, "B2") == []

    # Now every section is answered: calling the module again serves nothing and changes nothing.
    again = run_module(daemon.config, str(request))
    assert again.returncode == ExitCode.ERROR and "already answered" in again.stderr
    assert request.read_bytes() == answer


async def test_a_reused_file_in_the_watched_folder_is_answered_in_its_new_section(
    make_settings: Any, tmp_path: Path
) -> None:
    async with watched_folder(make_settings, tmp_path) as (rt, watcher, folder):
        request = folder / "MME505F.tmp"
        request.write_bytes(OLD_EXPORT + stage1("SP3", pvs="Z1"))
        assert await watcher.scan()
        answer = request.read_bytes()
        assert answer.startswith(OLD_EXPORT)
        assert (keys(answer, "PATIENT")["READY"], keys(answer, "PATIENT")["ERRORLEVEL"]) == ("1", "0")
        [patient] = await rt.service.search_patients(Origin("test"), pms_id="SP3")
        assert (patient.pms_system, patient.last_name) == ("Z1", "Müller")
        await watcher.scan()
        await watcher.scan()
        assert request.read_bytes() == answer  # answered now: left alone


def test_the_daemon_answers_files_dropped_on_the_share(daemon_factory: Any, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()  # the PMS's share: the daemon does not create it
    daemon = daemon_factory(vdds={"exchange_dir": str(share), "poll_seconds": 0.2})
    request = share / "NNTBA0E.tmp"
    part = share / ".NNTBA0E.part"  # written aside, then renamed: what a careful PVS does on a share
    part.write_bytes(stage1("3000").decode("cp1252").encode("utf-16"))
    part.replace(request)
    deadline = time.monotonic() + 30
    while not vdds_exchange.read_exchange(request.read_bytes()).answered:
        assert time.monotonic() < deadline, "no answer in the watched folder"
        time.sleep(0.05)
    answer = request.read_bytes()
    assert answer.startswith(b"\xff\xfe") and keys(answer, "PATIENT")["ERRORLEVEL"] == "0"
    status, body = daemon.request("GET", "/readyz", token=None)
    assert status == 200
    assert json.loads(body)["checks"]["watch:vdds"]["ok"] is True


def test_a_missing_exchange_folder_is_reported_not_created_and_watched_once_it_appears(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """The watched folders are on a share that is not mounted yet (only its mount point exists): the
    daemon serves everything else, says which setting names a missing folder (log, /readyz, doctor),
    creates nothing on the mount point, and answers a request once the folder is there."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    exchange, integrator = mount / "vdds", mount / "dentrix"
    daemon = daemon_factory(
        vdds={"exchange_dir": str(exchange), "poll_seconds": 0.2}, dentrix={"integrator_dir": str(integrator)}
    )
    deadline = time.monotonic() + 30
    while len([r for r in daemon.records() if r["msg"] == "watched folder missing; not created"]) < 2:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.1)
    body = json.dumps({"pms_system": "rest", "pms_id": "W1", "last_name": "Weiss", "first_name": "Ada"})
    status, _ = daemon.request(
        "POST", "/api/v1/patients", body.encode(), headers={"Content-Type": "application/json"}
    )
    assert status == 201  # the rest is served
    status, reply = daemon.request("GET", "/readyz", token=None)
    checks = json.loads(reply)["checks"]
    assert status == 503 and checks["store"]["ok"] is True
    assert checks["watch:vdds"]["error"] == (
        f"[vdds] exchange_dir {exchange} does not exist: is the share mounted? (the daemon does not create"
        " it; it watches the folder as soon as it appears)"
    )
    assert checks["watch:dentrix-integrator"]["error"].startswith(f"[dentrix] integrator_dir {integrator} ")
    doctor = subprocess.run(
        [*pms_bridge_command(), "doctor", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert doctor.returncode == 1
    lines = doctor.stdout.splitlines()
    assert (
        f"FAIL VDDS exchange folder writable: [vdds] exchange_dir {exchange} does not exist: is the share"
        " mounted? (mount it, or create the folder the PMS writes into; the daemon never creates it and"
        " watches it as soon as it appears)"
    ) in lines
    assert any(
        line.startswith(f"FAIL PMS profile folders writable: [dentrix] integrator_dir {integrator} does not")
        for line in lines
    )
    assert any(
        line.startswith("FAIL daemon answering: not ready: watch:vdds ([vdds] exchange_dir") for line in lines
    )
    assert list(mount.iterdir()) == []  # neither the daemon nor doctor made a local folder
    missing = [r for r in daemon.records() if r["msg"] == "watched folder missing; not created"]
    assert sorted((r["level"], r["setting"], r["path"]) for r in missing) == [
        ("warning", "[dentrix] integrator_dir", str(integrator)),
        ("warning", "[vdds] exchange_dir", str(exchange)),
    ]  # once each, however many scans found them missing

    exchange.mkdir()  # the share is mounted
    integrator.mkdir()
    request = exchange / "NNTBA0E.tmp"
    part = exchange / ".NNTBA0E.part"
    part.write_bytes(stage1("3001"))
    part.replace(request)
    deadline = time.monotonic() + 30
    while not vdds_exchange.read_exchange(request.read_bytes()).answered:
        assert time.monotonic() < deadline, "no answer in the folder once it appeared"
        time.sleep(0.05)
    assert keys(request.read_bytes(), "PATIENT")["ERRORLEVEL"] == "0"
    while daemon.request("GET", "/readyz", token=None)[0] != 200:
        assert time.monotonic() < deadline, daemon.request("GET", "/readyz", token=None)
        time.sleep(0.1)
    appeared = [r for r in daemon.records() if r["msg"] == "watched folder appeared; watching it"]
    assert sorted((r["level"], r["setting"]) for r in appeared) == [
        ("info", "[dentrix] integrator_dir"),
        ("info", "[vdds] exchange_dir"),
    ]


def test_a_link_in_the_share_is_not_followed_and_logged_once(daemon_factory: Any, tmp_path: Path) -> None:
    """`sym.tmp` pointing at a request outside the share is never read nor answered (the link is not
    followed), but the daemon logs it once, naming the file and why, instead of leaving the PVS waiting
    without a trace; later scans (proven by a request answered after it) do not log it again."""
    share, outside = tmp_path / "share", tmp_path / "outside.tmp"
    share.mkdir()  # the daemon watches the share, it does not create it
    daemon = daemon_factory(vdds={"exchange_dir": str(share), "poll_seconds": 0.1})
    outside.write_bytes(stage1("3001"))
    (share / "sym.tmp").symlink_to(outside)
    deadline = time.monotonic() + 30
    while "sym.tmp" not in daemon.log():
        assert time.monotonic() < deadline, "the link was not logged"
        time.sleep(0.05)
    request = share / "MME1.tmp"
    request.write_bytes(stage1("3002"))
    while not vdds_exchange.read_exchange(request.read_bytes()).answered:
        assert time.monotonic() < deadline, "no answer in the watched folder"
        time.sleep(0.05)
    [line] = [json.loads(line) for line in daemon.log().splitlines() if "sym.tmp" in line]
    assert (line["level"], line["watcher"], line["reason"]) == (
        "warning",
        "vdds",
        "a symbolic link, never followed: it may lead out of the folder",
    )
    assert outside.read_bytes() == stage1("3001")  # not answered through the link


def big_request(head: str, encoding: str, bom: bytes = b"", size: int = 6 * 1024 * 1024) -> bytes:
    """A request section followed by a [NOTES] section that makes the file larger than the 4 MB limit."""
    line = "NOTE{:06d}=" + "Befund " * 12 + "\r\n"
    notes = "".join(line.format(i) for i in range(size // len(line.format(0).encode(encoding)) + 1))
    return bom + (head + "\r\n[NOTES]\r\n" + notes + "[OTHER]\r\nA=1\r\n").encode(encoding)


async def test_an_oversized_file_in_the_folder_is_refused_without_reading_it_whole(
    make_settings: Any, tmp_path: Path
) -> None:
    async with watched_folder(make_settings, tmp_path) as (rt, watcher, folder):

        async def refuse(name: str, patid: str, size: int) -> tuple[bytes, bytes, int]:
            """Drop a request of `size` bytes; (original, answer, peak memory of the scan answering it)."""
            request = folder / name
            original = big_request(stage1(patid).decode("cp1252").rstrip("\r\n"), "cp1252", size=size)
            request.write_bytes(original)
            assert await watcher.scan()
            assert request.read_bytes() == original  # may still be growing
            tracemalloc.start()
            try:
                assert await watcher.scan()
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            return original, request.read_bytes(), peak

        original, answer, small_peak = await refuse("MME505F.tmp", "BIG1", 5 * 1024 * 1024)
        found = keys(answer, "PATIENT")
        assert (found["PATID"], found["LASTNAME"], found["ERRORLEVEL"], found["READY"]) == (
            "BIG1",
            "Müller",
            "1",
            "1",
        )
        assert found["ERRORTEXT"] == (
            f"Die Übergabedatei ist zu groß ({len(original)} Bytes, höchstens 4194304); "
            "sie wurde nicht ausgeführt."
        )
        rest = original.index(b"\r\n[NOTES]")
        assert answer.endswith(original[rest:])  # every other section byte for byte
        assert answer[: answer.index(b"ERRORLEVEL")] == original[: original.index(b"READY=0")]
        assert await rt.service.search_patients(Origin("test"), pms_id="BIG1") == []
        answered_at = (folder / "MME505F.tmp").stat().st_mtime_ns
        await watcher.scan()
        await watcher.scan()
        assert (folder / "MME505F.tmp").stat().st_mtime_ns == answered_at  # answered: left alone

        # Ten times the size costs no more memory: the file is refused from its first 4 MB.
        original, answer, large_peak = await refuse("NNT0001.tmp", "BIG2", 50 * 1024 * 1024)
        assert keys(answer, "PATIENT")["READY"] == "1" and answer.endswith(original[rest:])
        assert large_peak < small_peak + 8 * 1024 * 1024, (small_peak, large_peak)
        assert await rt.service.search_patients(Origin("test"), pms_id="BIG2") == []

        picture = folder / "scan.jpg"  # large, but not a request: never touched
        content = b"\xff\xd8\xff\xe0" + bytes(range(256)) * (5 * 4096)
        picture.write_bytes(content)
        await watcher.scan()
        await watcher.scan()
        assert picture.read_bytes() == content


def test_the_daemon_refuses_an_oversized_file_on_the_share_in_its_encoding(
    daemon_factory: Any, tmp_path: Path
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    daemon = daemon_factory(vdds={"exchange_dir": str(share), "poll_seconds": 0.2, "language": "en"})
    request = share / "NNTBA0E.tmp"
    original = big_request(
        request_file("MMOIDS", "PVS=TESTPVS\r\nCOUNT=1\r\nMMOID1=1\r\n").decode(), "utf-16-le", b"\xff\xfe"
    )
    part = share / ".NNTBA0E.part"
    part.write_bytes(original)
    part.replace(request)
    deadline = time.monotonic() + 30
    while keys(request.read_bytes()[:4096], "MMOIDS").get("READY") != "1":
        assert time.monotonic() < deadline, "no answer to the oversized file"
        time.sleep(0.1)
    answer = request.read_bytes()
    assert answer.startswith(b"\xff\xfe[\x00M\x00M\x00O\x00I\x00D\x00S\x00]\x00")
    found = keys(answer, "MMOIDS")
    assert (found["MMOID1"], found["ERRORLEVEL"], found["READY"]) == ("1", "1", "1")
    assert found["ERRORTEXT"].startswith(
        f"The exchange file is too large ({len(original)} bytes, at most 4194304)"
    )
    rest = original.index("\r\n[NOTES]".encode("utf-16-le"))
    assert answer.endswith(original[rest:])
    assert "MMOPATH" not in parse_ini(decode(answer).text)  # nothing was exported
    assert "file too large" in daemon.log()


def test_old_exports_are_removed(tmp_path: Path) -> None:
    old_dir = tmp_path / "x0123456789ab"
    old_dir.mkdir()
    (old_dir / "1.jpg").write_bytes(b"1")
    (tmp_path / "thumbnails").mkdir()
    fresh = tmp_path / "thumbnails" / "2.jpg"
    fresh.write_bytes(b"2")
    now = time.time()
    os.utime(old_dir / "1.jpg", (now - 7200, now - 7200))
    assert remove_old_files(tmp_path, 3600, now) == 1
    assert not old_dir.exists() and fresh.exists()
    assert remove_old_files(tmp_path / "missing", 3600, now) == 0


# --------------------------------------------------------------------------------------------------
# The launch client


# Never on the launch path, not even for the daemon-down answer (dataclasses alone cost 10 ms).
HEAVY = (
    "asyncio",
    "argparse",
    "aiohttp",
    "sqlalchemy",
    "PIL",
    "numpy",
    "typing",
    "dataclasses",
    "bridge.model",
)
LIGHT_CHECK = (
    "import sys; from bridge.cli import main; code = main(['vdds', sys.argv[1]]); "
    "print('LOADED=' + ' '.join(m for m in sys.argv[2:] if m in sys.modules)); sys.exit(code)"
)


def light_run(request: Path, env: dict[str, str], *modules: str) -> tuple[int, str]:
    """Run the module in a fresh interpreter: (exit code, which of `modules` it imported)."""
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_CHECK, str(request), *modules], env=env, capture_output=True, text=True
    )
    loaded = next(line for line in result.stdout.splitlines() if line.startswith("LOADED="))
    return result.returncode, loaded[len("LOADED=") :]


def test_the_module_stays_light_and_answers_when_the_daemon_is_down(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    request = tmp_path / "MME505F.tmp"
    request.write_bytes(stage1("0900"))
    env = {**os.environ, "PMS_BRIDGE_CONFIG": str(daemon.config)}
    assert light_run(request, env, *HEAVY) == (ExitCode.OK, "")
    assert keys(request.read_bytes(), "PATIENT")["ERRORLEVEL"] == "0"

    request.write_bytes(stage1("0901"))
    daemon.stop()
    assert light_run(request, env, *HEAVY) == (ExitCode.UNREACHABLE, "")
    answer = keys(request.read_bytes(), "PATIENT")
    assert (answer["ERRORLEVEL"], answer["READY"]) == ("1", "1")
    assert answer["ERRORTEXT"].startswith("Die Bildverwaltung (pms-bridge) ist nicht erreichbar")
    assert "not reachable" in answer["ERRORTEXT"]


def test_mmoview_through_the_module(daemon: DaemonProcess) -> None:
    missing = run_module(daemon.config, "424242")
    assert missing.returncode == ExitCode.ERROR and "Bild 424242 nicht gefunden" in missing.stderr
    gone = run_module(daemon.config, "C:\\TEMP\\gone.tmp")
    assert gone.returncode == ExitCode.ERROR


def test_the_module_finds_an_unquoted_path_with_spaces(daemon: DaemonProcess, tmp_path: Path) -> None:
    """PVSs start the module unquoted: a temp folder with a space arrives as two arguments."""
    folder = tmp_path / "Dokumente und Einstellungen"
    folder.mkdir()
    request = folder / "MME505F.tmp"
    request.write_bytes(stage1("0902"))
    result = run_module(daemon.config, *str(request).split(" "))
    assert result.returncode == ExitCode.OK, result.stderr
    answer = keys(request.read_bytes(), "PATIENT")
    assert (answer["ERRORLEVEL"], answer["READY"]) == ("0", "1")


def test_the_module_reads_the_file_the_pvs_appends_after_registered_arguments(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """`pms-bridge vdds ACQUIRE A2.tmp`: the PVS appends the file to the registered command line, so the
    file is answered and ACQUIRE stays the stage-5 flag (it was taken for an MMOID, the file left
    READY=0)."""
    daemon = daemon_factory(vdds={"stage5": "flagged"})
    (tmp_path / "A2.tmp").write_bytes(stage1("0904"))
    result = run_module(daemon.config, "ACQUIRE", "A2.tmp", cwd=tmp_path)
    assert result.returncode == ExitCode.OK, result.stderr
    answer = keys((tmp_path / "A2.tmp").read_bytes(), "PATIENT")
    assert (answer["ERRORLEVEL"], answer["READY"]) == ("0", "1")
    assert len(patients(daemon, "0904")) == 1
    status, body = daemon.request("GET", "/metrics", token=None)
    assert status == 200
    assert 'pms_bridge_events_total{event="acquisition-requested"} 1.0' in body.decode()
    # MMOVIEW through the same registered command line: the MMOID is the last argument
    viewed = run_module(daemon.config, "ACQUIRE", "424242", cwd=tmp_path)
    assert viewed.returncode == ExitCode.ERROR and "Bild 424242 nicht gefunden" in viewed.stderr


def test_a_folder_named_by_the_first_part_of_a_spaced_path_is_not_the_file(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """`.../sp x/MME1.tmp` unquoted beside a folder `.../sp`: the request is answered, not refused as a
    directory (the PVS would wait on READY=0 forever)."""
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp x").mkdir()
    request = tmp_path / "sp x" / "MME1.tmp"
    request.write_bytes(stage1("0905"))
    result = run_module(daemon.config, *str(request).split(" "))
    assert result.returncode == ExitCode.OK, result.stderr
    answer = keys(request.read_bytes(), "PATIENT")
    assert (answer["ERRORLEVEL"], answer["READY"]) == ("0", "1")


def test_an_mmoview_id_is_not_a_file_of_that_name(daemon: DaemonProcess, tmp_path: Path) -> None:
    (tmp_path / "424242").write_bytes(b"some unrelated data\n")
    viewed = run_module(daemon.config, "424242", cwd=tmp_path)
    assert viewed.returncode == ExitCode.ERROR and "Bild 424242 nicht gefunden" in viewed.stderr
    assert (tmp_path / "424242").read_bytes() == b"some unrelated data\n"


def test_an_oversized_exchange_file_is_answered_in_its_own_encoding_and_section(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    request = tmp_path / "MME505F.tmp"
    text = "[PATID]\r\nPVS=Z1\r\nPATID=002509\r\nREADY=0\r\nERRORLEVEL=0\r\nERRORTEXT=\r\n"
    padding = (";" + "x" * 98 + "\r\n") * 22_000  # 4.4 MB of comment lines in UTF-16
    request.write_bytes(b"\xff\xfe" + (text + padding).encode("utf-16-le"))
    result = run_module(daemon.config, str(request))
    assert result.returncode == ExitCode.INVALID and "is larger than" in result.stderr
    data = request.read_bytes()
    assert data.startswith(b"\xff\xfe")  # still UTF-16 with its BOM
    answer = dict(parse_ini(decode(data, "cp1252").text)["PATID"].items())
    assert (answer["PATID"], answer["ERRORLEVEL"], answer["READY"]) == ("002509", "1", "1")
    assert answer["ERRORTEXT"].startswith("Die Übergabedatei ist zu groß")
    assert data.endswith(padding.encode("utf-16-le")[-20_000:])  # the PVS's lines are kept


# --------------------------------------------------------------------------------------------------
# Registration


def register(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*pms_bridge_command(), "vdds", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_register_dry_run_register_unregister(tmp_path: Path) -> None:
    ini = tmp_path / "VDDS_MMI.INI"
    original = (SAMPLES / "vdds" / "VDDS_MMI.INI").read_bytes()
    ini.write_bytes(original)
    config = write_config(
        tmp_path / "home", f"sqlite:///{tmp_path / 'b.db'}", {"vdds": {"stage5": "flagged"}}
    )

    dry = register(config, "register", "--ini", str(ini), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    command = f"{pms_bridge_command()[0]} vdds --config {config}"
    assert "+NAME4=PMSBRIDGE" in dry.stdout and f"+PATDATIMPORT={command}" in dry.stdout
    assert ini.read_bytes() == original

    done = register(config, "register", "--ini", str(ini))
    assert done.returncode == 0, done.stderr
    ours = parse_ini(ini.read_bytes().decode("cp1252"))["PMSBRIDGE"]
    assert [ours.get(k) for k in ("MMOEXPORT", "MMOEXPORT_OS", "STAGES", "VERSION")] == [
        command,
        "3",
        "12345",
        "1.4",
    ]
    assert "nothing to change" in register(config, "register", "--ini", str(ini)).stdout

    removed = register(config, "unregister", "--ini", str(ini))
    assert removed.returncode == 0, removed.stderr
    assert ini.read_bytes() == original


@pytest.mark.parametrize(("bom", "codec"), [(b"\xff\xfe", "utf-16-le"), (b"\xef\xbb\xbf", "utf-8")])
def test_register_keeps_a_shared_registry_in_its_bom_and_encoding(
    tmp_path: Path, bom: bytes, codec: str
) -> None:
    ini = tmp_path / "VDDS_MMI.INI"
    others = (
        "[BVS]\r\nNAME1=SIDEXIS\r\n\r\n"
        "[SIDEXIS]\r\nNAME=Sidexis Röntgen\r\nMMOVIEW=C:\\SIDEXIS\\SIDEXIS.EXE\r\n"
    )
    original = bom + others.encode(codec)
    ini.write_bytes(original)
    config = write_config(tmp_path / "home", f"sqlite:///{tmp_path / 'b.db'}")

    done = register(config, "register", "--ini", str(ini))
    assert done.returncode == 0, done.stderr
    written = ini.read_bytes()
    assert written.startswith(bom + "[BVS]\r\nNAME1=SIDEXIS\r\nNAME2=PMSBRIDGE\r\n".encode(codec))
    sections = parse_ini(written[len(bom) :].decode(codec))  # strict: no cp1252 line in a UTF file
    assert sections["SIDEXIS"].get("NAME") == "Sidexis Röntgen"
    assert sections["SIDEXIS"].get("MMOVIEW") == "C:\\SIDEXIS\\SIDEXIS.EXE"
    assert sections["PMSBRIDGE"].get("PATDATIMPORT").endswith(f"vdds --config {config}")
    assert "+NAME2=PMSBRIDGE" in done.stdout  # the diff is shown in the file's own text

    removed = register(config, "unregister", "--ini", str(ini))
    assert removed.returncode == 0, removed.stderr
    assert ini.read_bytes() == original


def test_register_refuses_a_registry_it_cannot_read_back_and_leaves_it(tmp_path: Path) -> None:
    ini = tmp_path / "VDDS_MMI.INI"
    broken = b"\xff\xfe" + "[BVS]\r\nNAME1=SIDEXIS\r\n".encode("utf-16-le") + b"\x00"  # odd length
    ini.write_bytes(broken)
    config = write_config(tmp_path / "home", f"sqlite:///{tmp_path / 'b.db'}")
    refused = register(config, "register", "--ini", str(ini))
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "pms-bridge vdds register: the file is not valid UTF-16-LE with BOM: left untouched, edit it by hand"
    )
    assert ini.read_bytes() == broken


def test_register_refuses_a_path_with_spaces(tmp_path: Path) -> None:
    config = write_config(tmp_path / "Programme und Daten", f"sqlite:///{tmp_path / 'b.db'}")
    ini = tmp_path / "VDDS_MMI.INI"
    refused = register(config, "register", "--ini", str(ini))
    assert refused.returncode == 1
    assert "contains a space" in refused.stderr and "module_command" in refused.stderr
    assert not ini.exists()


def test_the_registered_command_is_a_working_module(daemon: DaemonProcess, tmp_path: Path) -> None:
    """What a PVS does: read our command from VDDS_MMI.INI, append the exchange file, run it."""
    ini = tmp_path / "VDDS_MMI.INI"
    assert register(daemon.config, "register", "--ini", str(ini)).returncode == 0
    command = parse_ini(ini.read_bytes().decode("cp1252"))["PMSBRIDGE"].get("PATDATIMPORT")
    request = tmp_path / "MME505F.tmp"
    request.write_bytes(stage1("0950"))
    result = subprocess.run([*command.split(" "), str(request)], capture_output=True, text=True, check=False)
    assert result.returncode == ExitCode.OK, result.stderr
    assert keys(request.read_bytes(), "PATIENT")["READY"] == "1"


def test_doctor_checks_the_registration(tmp_path: Path) -> None:
    ini = tmp_path / "VDDS_MMI.INI"
    config = write_config(
        tmp_path / "home", f"sqlite:///{tmp_path / 'b.db'}", {"vdds": {"mmi_ini": str(ini)}}
    )
    settings_ = load_settings(str(config))
    # no VDDS_MMI.INI: no VDDS PMS on this machine, which is not a failure (most US practices)
    assert "no VDDS PMS here" in vdds_register.check(settings_)
    ini.write_bytes((SAMPLES / "vdds" / "VDDS_MMI.INI").read_bytes())
    with pytest.raises(CheckFailed, match="lacks our current entry"):
        vdds_register.check(settings_)
    assert register(config, "register").returncode == 0
    assert vdds_register.check(settings_).endswith("[PMSBRIDGE]")


@settings(max_examples=300, deadline=None)
@given(st.text(), st.sampled_from(["", "/"]))
def test_the_launch_clients_percent_encoding_matches_urllib(text: str, safe: str) -> None:
    """bridge.launch replaces urllib.parse (start-up cost); the daemon decodes with urllib/yarl."""
    assert launch_client.quote(text, safe) == urllib.parse.quote(text, safe=safe)
    assert launch_client.unquote(launch_client.quote(text, safe)) == text
    assert launch_client.unquote(text) == urllib.parse.unquote(text)


async def test_a_cp1252_file_read_as_utf8_does_not_overwrite_the_stored_name(make_settings: Any) -> None:
    """A PVS writing cp1252 to a bridge set to UTF-8 (`[vdds] encoding`): "Müller" arrives as
    "M\ufffdller". Stored, it would overwrite the correct name (update_patient_info = yes); it is refused
    in the protocol's way (ERRORLEVEL, READY=1) and the patient keeps its name."""
    rt = Runtime.build(make_settings(vdds={"encoding": "utf-8"}, pms={"update_patient_info": "yes"}))
    try:
        first = await handle(rt, launch(stage1("0815").decode("cp1252").encode("utf-8")))
        assert first.exit_code == ExitCode.OK, first.message
        reply = await handle(rt, launch(stage1("0815")))  # the same patient, in cp1252 bytes
        assert reply.exit_code == ExitCode.ERROR and reply.content is not None
        answer = keys(reply.content, "PATIENT")
        assert answer["READY"] == "1" and answer["ERRORLEVEL"] != "0", answer
        assert "U+FFFD" in reply.message and "[vdds] encoding" in reply.message
        (patient,) = await rt.service.search_patients(Origin("test"), pms_id="0815")
        assert patient.last_name == "Müller"
    finally:
        rt.close()


# LASTNAME values the store cannot take, as a PVS writes them (the rest of the file is stage1's):
INVALID_LAST_NAMES = {
    # "Müller" from a PVS writing the DOS code page cp850 (M 81 l l e r) to a bridge left at
    # `encoding = auto`: 0x81 is no character in cp1252, so it is read as U+FFFD
    "cp850-under-auto": b"M\x81ller",
    "start-of-heading": b"Ab\x01c",  # U+0001, a control character inside the name
    "delete": b"Ab\x7fc",  # U+007F DEL
}


@pytest.mark.parametrize("last", INVALID_LAST_NAMES.values(), ids=INVALID_LAST_NAMES.keys())
async def test_data_the_store_cannot_take_is_answered_as_invalid(make_settings: Any, last: bytes) -> None:
    """A name the store refuses is the PVS's data, not a fault of the bridge: the answer says the data
    are invalid, naming the field for IT, with ERRORLEVEL=1 and READY=1, never "Interner Fehler"; nothing
    is stored."""
    rt = Runtime.build(make_settings())
    try:
        reply = await handle(rt, launch(stage1("0817").replace(b"LASTNAME=M\xfcller", b"LASTNAME=" + last)))
        assert reply.exit_code == 1 and reply.content is not None
        answer = keys(reply.content, "PATIENT")
        assert answer["ERRORLEVEL"] == "1" and answer["READY"] == "1", answer
        assert answer["ERRORTEXT"].startswith(
            "Die übermittelten Daten sind ungültig; nichts wurde geändert. (last name must not contain"
        ), answer
        assert await rt.service.search_patients(Origin("test"), pms_id="0817") == []
    finally:
        rt.close()


async def test_a_line_break_like_character_in_a_value_never_opens_another_patient(make_settings: Any) -> None:
    """Only CR and LF end a line. `PATID=Z2470817<VT>999` was read as PATID=Z2470817 and answered
    "patient Z2470817 opened" with ERRORLEVEL=0; `BVS=PMSBRIDGE<VT>PATID=<victim>` before the real PATID
    opened the victim; `LASTNAME=Meier<U+2028>Schulz` was stored as "Meier". Now the character stays in
    its value: the id or name is refused as invalid data, and the smuggled key is no key."""
    rt = Runtime.build(make_settings())
    try:
        for patid in ("Z2470817", "V2470818"):
            assert (await handle(rt, launch(stage1(patid)))).exit_code == 0
        reply = await handle(rt, launch(stage1("Z2470817\x0b999")))
        assert reply.exit_code == 1 and reply.content is not None
        assert b"\r\nPATID=Z2470817\x0b999\r\n" in reply.content  # the PVS's line as it was
        answer = keys(reply.content, "PATIENT")
        assert (answer["ERRORLEVEL"], answer["READY"]) == ("1", "1")
        assert answer["ERRORTEXT"] == (
            "Die übermittelten Daten sind ungültig; nichts wurde geändert."
            " (pms id must not contain a control character (U+000B))"
        )
        smuggled = stage1("O2470819", extra="").replace(
            b"PVS=TESTPVS\r\n", b"PVS=TESTPVS\r\nBVS=PMSBRIDGE\x0bPATID=V2470818\r\n"
        )
        reply = await handle(rt, launch(smuggled))
        assert reply.exit_code == 0 and reply.request is not None and reply.request.pms_id == "O2470819"
        # U+2028 in a BOM-less UTF-8 file (encoding = auto): refused, not cut to "Meier"
        separated = stage1("M2470820").decode("cp1252").replace("Müller", "Meier\u2028Schulz").encode("utf-8")
        reply = await handle(rt, launch(separated))
        assert reply.exit_code == 1 and reply.content is not None
        assert (
            "last name must not contain a line separator (U+2028)"
            in keys(reply.content, "PATIENT")["ERRORTEXT"]
        )
        assert await rt.service.search_patients(Origin("test"), pms_id="M2470820") == []
    finally:
        rt.close()


async def test_a_birth_date_in_the_future_is_refused_and_nothing_is_stored(make_settings: Any) -> None:
    """BIRTHDAY=20991231 was stored; a date after today (and its day of slack) is answered as an invalid
    date, ERRORLEVEL=1 and READY=1, and the patient is not created."""
    future = (date.today() + timedelta(days=3)).strftime("%Y%m%d")  # after the slack even across midnight
    rt = Runtime.build(make_settings())
    try:
        reply = await handle(
            rt, launch(stage1("0818").replace(b"BIRTHDAY=19710101", f"BIRTHDAY={future}".encode()))
        )
        assert reply.exit_code == 1 and reply.content is not None
        answer = keys(reply.content, "PATIENT")
        assert (answer["ERRORLEVEL"], answer["READY"]) == ("1", "1")
        assert answer["ERRORTEXT"] == f"Das Geburtsdatum '{future}' liegt in der Zukunft."
        assert await rt.service.search_patients(Origin("test"), pms_id="0818") == []
    finally:
        rt.close()


async def test_a_bomless_utf8_request_is_read_as_utf8_and_answered_in_it(make_settings: Any) -> None:
    """gdt2dicom writes its exchange files in UTF-8 without a BOM: with `[vdds] encoding = auto` (the
    default) the name is stored as sent (it was "MÃ¼ller") and the answer is UTF-8 without a BOM."""
    rt = Runtime.build(make_settings())
    try:
        reply = await handle(rt, launch(stage1("0816").decode("cp1252").encode("utf-8")))
        assert reply.exit_code == ExitCode.OK, reply.message
        assert reply.content is not None and reply.content.startswith(b"[PATIENT]")
        assert "LASTNAME=Müller\r\n" in reply.content.decode("utf-8")
        (patient,) = await rt.service.search_patients(Origin("test"), pms_id="0816")
        assert patient.last_name == "Müller"
    finally:
        rt.close()
