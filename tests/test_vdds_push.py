"""Stage 6: new images pushed into the PVS through its MMOINFIMPORT program, exactly once across a crash.

The PVS is a fake program registered in a VDDS_MMI.INI: it records each start and each push it takes,
then sets READY=1 in the push file, as a PVS's import module does.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from PIL import Image

from bridge.events import ImagesAdded
from bridge.exits import ExitCode
from bridge.handlers import vdds_push
from bridge.handlers.vdds import handle
from bridge.model import Action, Demographics, Origin, PatientRequest
from bridge.outbox import OutboxItem
from bridge.runtime import Runtime
from bridge.store import queries as q
from bridge.store.types import utcnow
from protocols.common import parse_ini
from tests.conftest import DaemonProcess, start_daemon
from tests.support.processes import alive
from tests.test_vdds import launch, run_module, stage1

FAKE_PVS = """
import os, sys, time
from pathlib import Path
push = Path(sys.argv[-1])
folder = Path({folder!r})
starts = folder / "starts"
first = not starts.exists()
with open(starts, "a") as fh:
    fh.write(f"{{os.getpid()}}\\n")
if first:
    time.sleep({first_delay})
time.sleep({delay})
text = push.read_bytes().decode("cp1252")
if {answer!r} == "exit3":
    sys.exit(3)
if {answer!r} != "silent":
    with open(folder / "arrivals", "a") as fh:
        fh.write(push.name + " " + str(text.count("[MMO") - 1) + "\\n")
    level = "1" if {answer!r} == "refuse" else "0"
    answered = text.replace("ERRORLEVEL=0", "ERRORLEVEL=" + level).replace("READY=0", "READY=1")
    if level == "1":  # a PVS may name the patient in its ERRORTEXT
        answered = answered.replace("ERRORTEXT=\\r\\n", "ERRORTEXT=Patient Kunigunde unbekannt\\r\\n")
    push.write_bytes(answered.encode("cp1252"))
"""


def fake_pvs(
    folder: Path,
    *,
    first_delay: float = 0.0,
    delay: float = 0.0,
    answer: str = "accept",
    archive: bool = True,
    direct_import: bool = False,
) -> Path:
    """A VDDS_MMI.INI whose PVS TESTPVS registers the fake import program (in its archive section); the
    program takes `first_delay` + `delay` seconds over its first push, `delay` over each other."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "mmoinfim.py"
    script.write_text(
        FAKE_PVS.format(folder=str(folder), first_delay=first_delay, delay=delay, answer=answer)
    )
    program = f"{sys.executable} {script}"
    if archive:
        text = "[PVS]\r\nNAME1=TESTPVS\r\nARCHIV=TEST_ARCHIV\r\n\r\n[TESTPVS]\r\nNAME=Test\r\n\r\n"
        text += f"[TEST_ARCHIV]\r\nNAME=Archiv\r\nMMOINFIMPORT={program}\r\nSTAGES=123456\r\n"
        if direct_import:
            text += "DIRECTIMAGEIMPORT=1\r\n"
    else:
        text = "[PVS]\r\nNAME1=TESTPVS\r\n\r\n[TESTPVS]\r\nNAME=Test ohne Stufe 6\r\nSTAGES=1234\r\n"
    ini = folder / "VDDS_MMI.INI"
    ini.write_bytes(text.encode("cp1252"))
    return ini


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def png(value: int = 120) -> bytes:
    out = io.BytesIO()
    Image.new("L", (400, 300), value).save(out, "PNG")
    return out.getvalue()


SHORT_LEASE = {"outbox_lease": 2}  # a killed daemon's claims run out soon: these tests are not about that


def upload(daemon: DaemonProcess, patient_id: int, data: bytes) -> None:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, reply = daemon.request(
        "POST",
        f"/api/v1/patients/{patient_id}/images",
        body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert status == 201, reply


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.05)


def outbox_states(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [row[0] for row in conn.execute(sa.text("SELECT state FROM outbox ORDER BY id"))]
    finally:
        engine.dispose()


def new_patient(daemon: DaemonProcess, tmp_path: Path, patid: str) -> int:
    request = tmp_path / f"{patid}.tmp"
    request.write_bytes(stage1(patid))
    assert run_module(daemon.config, str(request)).returncode == ExitCode.OK
    status, body = daemon.request("GET", f"/api/v1/patients?pms_system=TESTPVS&pms_id={patid}")
    assert status == 200
    return int(json.loads(body)["items"][0]["id"])


@pytest.mark.slow
def test_a_push_cut_off_by_a_crash_is_not_sent_again(daemon_factory: Any, tmp_path: Path) -> None:
    """SIGKILL while the PVS's program runs: it finishes on its own; after the restart the outbox sees
    READY=1 in the push file and settles the message without a second push."""
    pvs = tmp_path / "pvs"
    daemon = daemon_factory(
        vdds={"mmi_ini": str(fake_pvs(pvs, first_delay=3)), "push_timeout": 60}, daemon=SHORT_LEASE
    )
    upload(daemon, new_patient(daemon, tmp_path, "0815"), png())
    wait_for(lambda: len(lines(pvs / "starts")) == 1, "the PVS's program to start")
    daemon.stop(signal.SIGKILL)
    wait_for(lambda: len(lines(pvs / "arrivals")) == 1, "the orphaned program to take the push")
    restarted = start_daemon(daemon.config)
    try:
        wait_for(lambda: outbox_states(daemon.settings.store.url) == ["done"], "the outbox to settle")
    finally:
        restarted.stop()
    assert lines(pvs / "arrivals") == ["MMOINF1.INI 1"]
    assert len(lines(pvs / "starts")) == 1


@pytest.mark.slow
def test_a_push_lost_in_a_crash_arrives_once_after_the_restart(daemon_factory: Any, tmp_path: Path) -> None:
    """SIGKILL of the daemon and of the PVS's program before it took the push: after the restart the push
    file stays READY=0 for push_timeout, so the push is sent again - once."""
    pvs = tmp_path / "pvs"
    daemon = daemon_factory(
        vdds={"mmi_ini": str(fake_pvs(pvs, first_delay=120)), "push_timeout": 3}, daemon=SHORT_LEASE
    )
    upload(daemon, new_patient(daemon, tmp_path, "0816"), png())
    wait_for(lambda: len(lines(pvs / "starts")) == 1, "the PVS's program to start")
    daemon.stop(signal.SIGKILL)
    os.kill(int(lines(pvs / "starts")[0]), signal.SIGKILL)
    restarted = start_daemon(daemon.config)
    try:
        wait_for(lambda: outbox_states(daemon.settings.store.url) == ["done"], "the outbox to settle")
    finally:
        restarted.stop()
    assert lines(pvs / "arrivals") == ["MMOINF1.INI 1"]
    assert len(lines(pvs / "starts")) == 2


@pytest.mark.slow
def test_a_push_a_dead_daemon_held_is_taken_over_by_a_running_one(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Scale-out: daemon A dies (SIGKILL) while the PVS's program takes its push; daemon B, running all
    along on the same store and push folder, takes the message over once A's lease has run out, finds
    the orphaned program's READY=1 and settles it: delivered once, not left in "sending" for good."""
    pvs = tmp_path / "pvs"
    shared = {
        "vdds": {
            "mmi_ini": str(fake_pvs(pvs, first_delay=3)),
            "push_timeout": 60,
            "push_dir": str(tmp_path / "push"),
        },
        "daemon": SHORT_LEASE,
    }
    a = daemon_factory(**shared)
    b = daemon_factory(**shared)
    patient = new_patient(a, tmp_path, "0815")
    b.proc.send_signal(signal.SIGSTOP)  # so that A, not B, claims the push
    try:
        upload(a, patient, png())
        wait_for(lambda: len(lines(pvs / "starts")) == 1, "the PVS's program to start")
        a.stop(signal.SIGKILL)
    finally:
        b.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: outbox_states(a.settings.store.url) == ["done"], "B to settle A's push")
    assert lines(pvs / "arrivals") == ["MMOINF1.INI 1"]
    assert len(lines(pvs / "starts")) == 1
    assert "outbox recovered" in b.log()


@pytest.mark.slow
def test_pushes_claimed_together_are_sent_once_while_another_daemon_runs(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Scale-out, as an auditor found it: daemon A claims several pushes together and the PVS's program
    takes longer than the lease over each. Before, only the push being sent had its claim renewed:
    daemon B took over the next one, found no push file and sent it, and A then sent it again (wrote its
    MMOINF file anew and started the PVS's program a second time). Now every push arrives once, from A."""
    pvs = tmp_path / "pvs"
    shared = {
        "vdds": {
            "mmi_ini": str(fake_pvs(pvs, delay=4)),
            "push_timeout": 60,
            "push_dir": str(tmp_path / "push"),
        },
        "daemon": SHORT_LEASE,
        "store": {"images": str(tmp_path / "images")},  # one image share: B can send A's pushes
    }
    a = daemon_factory(**shared)
    b = daemon_factory(**shared)
    patients = [new_patient(a, tmp_path, patid) for patid in ("0815", "0816", "0817")]
    url = a.settings.store.url
    b.proc.send_signal(signal.SIGSTOP)  # so that A, not B, claims the pushes
    try:
        for patient in patients:
            upload(a, patient, png())
        wait_for(lambda: "pending" not in outbox_states(url), "A to claim every push")
    finally:
        b.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: outbox_states(url) == ["done"] * 3, "the pushes to be settled", timeout=120)
    assert sorted(lines(pvs / "arrivals")) == ["MMOINF1.INI 1", "MMOINF2.INI 1", "MMOINF3.INI 1"]
    assert len(lines(pvs / "starts")) == 3
    assert "outbox recovered" not in b.log() and '"pushed"' not in b.log()


@pytest.mark.slow
def test_a_graceful_stop_leaves_the_pvs_import_running_and_the_restart_settles_it(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """SIGTERM while the PVS's program imports: the program is not killed (it takes the push), the stop
    hands the claim back, and the restarted daemon finds READY=1 at once: one push, no second start."""
    pvs = tmp_path / "pvs"
    daemon = daemon_factory(vdds={"mmi_ini": str(fake_pvs(pvs, first_delay=3)), "push_timeout": 60})
    upload(daemon, new_patient(daemon, tmp_path, "0815"), png())
    wait_for(lambda: len(lines(pvs / "starts")) == 1, "the PVS's program to start")
    assert daemon.stop(signal.SIGTERM) == 0
    program = int(lines(pvs / "starts")[0])
    assert alive(program) or lines(pvs / "arrivals"), "the stop killed the PVS's import program"
    wait_for(lambda: len(lines(pvs / "arrivals")) == 1, "the PVS's program to take the push")
    restarted = start_daemon(daemon.config)
    try:
        wait_for(lambda: outbox_states(daemon.settings.store.url) == ["done"], "the outbox to settle")
    finally:
        restarted.stop()
    assert lines(pvs / "arrivals") == ["MMOINF1.INI 1"]
    assert len(lines(pvs / "starts")) == 1


# --------------------------------------------------------------------------------------------------
# The sender's decisions, one push at a time


async def queued_push(
    make_settings: Any, pvs: Path, *, images: int = 1, **vdds: Any
) -> tuple[Runtime, OutboxItem]:
    """A runtime whose store holds one queued push for `images` new images of VDDS patient 0815."""
    rt = Runtime.build(make_settings(vdds={"push_timeout": 5, **vdds, "mmi_ini": str(pvs)}))
    reply = await handle(rt, launch(stage1("0815")))
    assert reply.exit_code == ExitCode.OK
    [patient] = await rt.service.search_patients(Origin("test"), pms_id="0815")
    new = [await rt.imaging.ingest(png(100 + n)) for n in range(images)]
    await rt.service.add_images(Origin("test"), patient.id, new)
    messages = await rt.db.read(lambda s: list(s.scalars(q.due_outbox(vdds_push.CHANNEL, utcnow()))))
    assert len(messages) == 1
    msg = messages[0]
    return rt, OutboxItem(msg.id, msg.channel, msg.patient_id, dict(msg.payload), msg.attempts)


async def test_an_accepted_push_carries_the_object_and_its_thumbnail(
    make_settings: Any, tmp_path: Path
) -> None:
    rt, item = await queued_push(make_settings, fake_pvs(tmp_path / "pvs"))
    try:
        await vdds_push.send(rt, item)
        push = vdds_push.push_file(rt.settings, item)
        text = push.read_bytes().decode("cp1252")
        assert "\r\n" in text
        sections = parse_ini(text)
        head = sections["PATID"]
        assert [head.get(k) for k in ("PVS", "FROMPVS", "BVS", "PRXNR", "PATID", "READY")] == [
            "TEST_ARCHIV",
            "TESTPVS",
            "PMSBRIDGE",
            "1",
            "0815",
            "1",
        ]
        assert sections["MMOS"].get("COUNT") == "1"
        assert Path(sections["MMO1"].get("THUMBNAIL")).is_file()
        assert await vdds_push.recover(rt, item)  # after a crash this push counts as delivered
    finally:
        rt.close()


async def test_the_push_names_the_patients_own_pvs_when_configured(
    make_settings: Any, tmp_path: Path
) -> None:
    """`push_pvs = own`: PVS= is the patient's PVS as registered (what praxishub writes), not the archive
    section whose program runs; which one a PVS expects is not confirmed [I]."""
    rt, item = await queued_push(make_settings, fake_pvs(tmp_path / "pvs"), push_pvs="own")
    try:
        await vdds_push.send(rt, item)
        head = parse_ini(vdds_push.push_file(rt.settings, item).read_bytes().decode("cp1252"))["PATID"]
        assert [head.get(k) for k in ("PVS", "FROMPVS", "READY")] == ["TESTPVS", "TESTPVS", "1"]
    finally:
        rt.close()


@pytest.mark.parametrize(
    ("answer", "reason"),
    [("refuse", "refused the push: ERRORLEVEL=1"), ("exit3", "exited with 3"), ("silent", "no READY=1")],
)
async def test_a_push_the_pvs_does_not_take_is_retried(
    make_settings: Any, tmp_path: Path, answer: str, reason: str
) -> None:
    rt, item = await queued_push(
        make_settings, fake_pvs(tmp_path / "pvs", answer=answer), push_timeout=3, push_trust_exit_code="no"
    )
    try:
        with pytest.raises(vdds_push.PushFailed, match=reason) as failed:
            await vdds_push.send(rt, item)
        assert not await vdds_push.recover(rt, item)
        # The reason is logged and kept in the outbox row; the PVS's own text stays in the push file.
        assert "Kunigunde" not in str(failed.value)
        if answer == "refuse":
            assert "Kunigunde" in vdds_push.push_file(rt.settings, item).read_text(encoding="cp1252")
    finally:
        rt.close()


async def test_a_push_missing_a_thumbnail_is_not_sent_but_retried(make_settings: Any, tmp_path: Path) -> None:
    """Two images, and the second one's thumbnail cannot be written into the export folder (a full disk;
    here a folder in its way): a stage-6 push is sent once, so it waits for a retry rather than go out
    with COUNT=2 and one THUMBNAIL=, never to be completed."""
    pvs = tmp_path / "pvs"
    rt, item = await queued_push(make_settings, fake_pvs(pvs), images=2)
    try:
        second = max(int(i) for i in item.payload["image_ids"])
        (rt.settings.vdds.export_dir / "thumbnails" / f"{second}.jpg").mkdir(parents=True)
        with pytest.raises(vdds_push.PushFailed, match="1 of 2 thumbnails"):
            await vdds_push.send(rt, item)
        assert lines(pvs / "starts") == []
        assert not await vdds_push.recover(rt, item)  # nothing went out: sent again after a crash too
    finally:
        rt.close()


async def test_a_direct_import_push_missing_a_copy_is_retried(make_settings: Any, tmp_path: Path) -> None:
    """A PVS declaring DIRECTIMAGEIMPORT takes the images from the push's IMAGEDATA copies: a copy that
    cannot be made (here its original is gone) keeps the push for a retry instead of announcing an
    image without its file."""
    pvs = tmp_path / "pvs"
    rt, item = await queued_push(make_settings, fake_pvs(pvs, direct_import=True), images=2)
    try:
        image = await rt.service.get_image(Origin("test"), int(item.payload["image_ids"][0]))
        assert image is not None
        rt.files.path_for(image.sha256, image.file_ext).unlink()
        with pytest.raises(vdds_push.PushFailed, match="1 of 2 copies for DIRECTIMAGEIMPORT"):
            await vdds_push.send(rt, item)
        assert lines(pvs / "starts") == []
    finally:
        rt.close()


async def test_an_exit_code_0_without_ready_counts_when_trusted(make_settings: Any, tmp_path: Path) -> None:
    rt, item = await queued_push(make_settings, fake_pvs(tmp_path / "pvs", answer="silent"))
    try:
        await vdds_push.send(rt, item)
        assert await vdds_push.recover(rt, item)  # the recorded exit code settles it after a crash
    finally:
        rt.close()


async def test_a_pvs_without_stage_6_gets_no_push(make_settings: Any, tmp_path: Path) -> None:
    pvs = tmp_path / "pvs"
    rt, item = await queued_push(make_settings, fake_pvs(pvs, archive=False))
    try:
        await vdds_push.send(rt, item)  # settled, nothing started
        assert not vdds_push.push_file(rt.settings, item).exists()
        assert lines(pvs / "starts") == []
    finally:
        rt.close()


def test_an_unreadable_registry_is_retried_naming_the_file_and_the_setting(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A host without VDDS_MMI.INI: the push waits for a retry, and its outbox error (what `pms-bridge
    outbox list` shows) names the file and the setting, not only "No such file or directory"."""
    missing = tmp_path / "missing" / "VDDS_MMI.INI"
    daemon = daemon_factory(vdds={"mmi_ini": str(missing)})
    upload(daemon, new_patient(daemon, tmp_path, "0815"), png())
    url = daemon.settings.store.url

    def errors() -> list[tuple[str, str]]:
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                return [(r[0], r[1]) for r in conn.execute(sa.text("SELECT state, last_error FROM outbox"))]
        finally:
            engine.dispose()

    wait_for(lambda: any(error for _state, error in errors()), "the push's first attempt")
    [(state, error)] = errors()
    assert state == "pending"
    assert error == (
        f"VDDS_MMI.INI {missing} cannot be read (No such file or directory): is a VDDS PVS installed on"
        " this computer? [vdds] mmi_ini names the file"
    )


async def test_pushes_only_for_vdds_links(make_settings: Any) -> None:
    rt = Runtime.build(make_settings(vdds={"push": "no"}))
    try:
        assert vdds_push.push_channels(rt.settings, "vdds", "Z1") == []
        assert vdds_push.push_worker(rt) is None
    finally:
        rt.close()
    rt = Runtime.build(make_settings())
    try:
        assert vdds_push.push_channels(rt.settings, "vdds", "Z1") == [vdds_push.CHANNEL]
        assert vdds_push.push_channels(rt.settings, "opp", "Z1") == []
    finally:
        rt.close()


async def test_only_images_of_vdds_patients_wake_the_push_worker(make_settings: Any, tmp_path: Path) -> None:
    """The worker's look at the outbox is a write transaction: images that queued no push for its channel
    (here an OPP patient's) must not wake it, images of a VDDS patient must; the SSE event is unchanged."""
    rt = Runtime.build(make_settings(vdds={"mmi_ini": str(fake_pvs(tmp_path / "pvs"))}))
    published: list[ImagesAdded] = []
    rt.bus.subscribe(lambda event: published.append(event) if isinstance(event, ImagesAdded) else None)
    try:
        assert (await handle(rt, launch(stage1("0815")))).exit_code == ExitCode.OK
        [vdds_patient] = await rt.service.search_patients(Origin("test"), pms_id="0815")
        opened = await rt.service.handle(
            PatientRequest(Action.OPEN, Origin("opp"), "OTHERPMS", "77", demographics=Demographics("Muster"))
        )
        assert opened.patient is not None
        for patient_id in (vdds_patient.id, opened.patient.id):
            await rt.service.add_images(Origin("test"), patient_id, [await rt.imaging.ingest(png())])
        vdds_images, opp_images = published
        assert vdds_images.may_concern(vdds_push.CHANNEL)
        assert vdds_images.push_channels == frozenset({vdds_push.CHANNEL})
        assert not opp_images.may_concern(vdds_push.CHANNEL)
        assert "push_channels" not in vdds_images.to_json()
        # images another process stored: what it queued is not known here, so every worker looks
        assert ImagesAdded(patient_id=1, image_ids=(5,)).may_concern(vdds_push.CHANNEL)
    finally:
        rt.close()


def test_the_registered_command_line_takes_the_file() -> None:
    assert vdds_push.command_line("/opt/pvs/import -q", Path("/x/MMOINF1.INI")) == [
        "/opt/pvs/import",
        "-q",
        "/x/MMOINF1.INI",
    ]


async def test_the_front_desk_editing_a_vdds_patient_keeps_its_pushes(
    make_settings: Any, tmp_path: Path
) -> None:
    """A REST "create or update" (the front desk's "+", a phone number) is not the PMS speaking: the
    link keeps the PMS's protocol, and the PMS keeps getting its stage-6 pushes."""
    rt = Runtime.build(make_settings(vdds={"mmi_ini": str(fake_pvs(tmp_path / "pvs"))}))
    published: list[ImagesAdded] = []
    rt.bus.subscribe(lambda event: published.append(event) if isinstance(event, ImagesAdded) else None)
    try:
        assert (await handle(rt, launch(stage1("0815")))).exit_code == ExitCode.OK
        [patient] = await rt.service.search_patients(Origin("test"), pms_id="0815")
        edited = await rt.service.handle(
            PatientRequest(
                Action.CREATE_OR_UPDATE,
                Origin("rest"),
                patient.pms_system or "",
                "0815",
                demographics=Demographics(patient.last_name, phone="0123 4567"),
            )
        )
        assert edited.status.ok, edited.message
        await rt.service.add_images(Origin("test"), patient.id, [await rt.imaging.ingest(png())])
        [added] = published
        assert added.push_channels == frozenset({vdds_push.CHANNEL})
    finally:
        rt.close()
