"""`POST /api/v1/import` over real loopback HTTP: files, zipped file sets, hostile zips, limits, statuses."""

from __future__ import annotations

import io
import json
import socket
import time
import warnings
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer

from bridge.model import Origin
from bridge.runtime import Runtime
from bridge.web.app import build_api_app
from bridge.web.problems import CONTENT_TYPE as PROBLEM
from tests.conftest import DaemonProcess, start_daemon, write_config
from tests.support.dicomfiles import dental_dataset, sample, to_bytes

REFERENCE_SET = sample("CT_small.dcm").parent / "dicomdirtests"
ORIGIN = Origin("dicom", "http", "TEST")
AS_DICOM = {"Content-Type": "application/dicom"}


def form(*files: tuple[str, bytes]) -> FormData:
    data = FormData()
    for name, content in files:
        # a file object: aiohttp refuses large bytes values in a form
        data.add_field("file", io.BytesIO(content), filename=name, content_type="application/octet-stream")
    return data


def zipped(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return out.getvalue()


def reference_zip() -> bytes:
    """The reference file set's DICOMDIR and one patient's folder (the others' files are absent)."""
    members = {"media/DICOMDIR": (REFERENCE_SET / "DICOMDIR").read_bytes()}
    for path in sorted((REFERENCE_SET / "77654033").rglob("*")):
        if path.is_file():
            members[f"media/{path.relative_to(REFERENCE_SET).as_posix()}"] = path.read_bytes()
    return zipped(members)


@pytest.fixture
async def small_client(make_settings: Any) -> AsyncIterator[TestClient[Any, Any]]:
    """A client of an API whose import budget is 1 MB."""
    rt = Runtime.build(make_settings(dicom={"max_upload_mb": 1}))
    client: TestClient[Any, Any] = TestClient(TestServer(build_api_app(rt)))
    await client.start_server()
    client.session.headers["Authorization"] = f"Bearer {rt.settings.api.token}"
    yield client
    await client.close()
    await rt.audit.flush()
    rt.close()


async def test_files_and_a_zipped_file_set_import_with_a_report(api_client: Any) -> None:
    single = to_bytes(dental_dataset(patient_id="0042", name="Müller^Anna"))
    hostile = zipped({"../evil.dcm": single, "ok/x.dcm": to_bytes(dental_dataset(patient_id="0043"))})
    response = await api_client.post(
        "/api/v1/import", data=form(("a.dcm", single), ("set.zip", reference_zip()), ("hostile.zip", hostile))
    )
    assert response.status == 201, await response.text()
    body = await response.json()
    imported = sorted((item["path"], item["category"], item["files"]) for item in body["imported"])
    assert imported == [
        ("a.dcm", "intraoral-xray", 1),
        ("hostile.zip/ok/x.dcm", "intraoral-xray", 1),
        ("set.zip/media/77654033/CR1/6154", "extraoral-xray", 1),
        ("set.zip/media/77654033/CR2/6247", "extraoral-xray", 1),
        ("set.zip/media/77654033/CR3/6278", "extraoral-xray", 1),
        ("set.zip/media/77654033/CT2/17106", "cbct", 4),
    ]
    errors = {item["path"]: item["reason"] for item in body["errors"]}
    assert errors["hostile.zip/../evil.dcm"] == "unsafe path in the zip: refused"
    missing = [
        path for path, reason in errors.items() if reason.startswith("listed in the DICOMDIR but missing")
    ]
    assert len(missing) == 24 and all(path.startswith("set.zip/media/9889") for path in missing)
    assert body["summary"] == {"images": 6, "files": 9, "skipped": 0, "errors": 25}
    patients = await (await api_client.get("/api/v1/patients", params={"pms_id": "0042"})).json()
    assert [(p["last_name"], p["pms_system"]) for p in patients["items"]] == [("Müller", "dicom")]
    again = await api_client.post("/api/v1/import", data=form(("a.dcm", single)))
    assert again.status == 200
    assert (await again.json())["skipped"] == [{"path": "a.dcm", "reason": "already imported"}]


async def test_a_second_zip_entry_of_the_same_name_is_refused_not_written_over_the_first(
    api_client: Any,
) -> None:
    first = to_bytes(dental_dataset(patient_id="0044"))
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name, and writes it
        zf.writestr("a.dcm", first)
        zf.writestr("a.dcm", to_bytes(dental_dataset(patient_id="0045")))
    response = await api_client.post("/api/v1/import", data=form(("twice.zip", out.getvalue())))
    assert response.status == 201, await response.text()
    body = await response.json()
    assert [(i["path"], i["pms_id"]) for i in body["imported"]] == [("twice.zip/a.dcm", "0044")]
    assert body["errors"] == [
        {"path": "twice.zip/a.dcm", "reason": "a second entry of this name in the zip: refused"}
    ]


def stored_zip(members: dict[str, bytes]) -> bytes:
    """A zip of uncompressed entries, so a test can alter an entry's bytes or flags where they lie."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return out.getvalue()


def broken_zip(how: str) -> bytes:
    """a.dcm, b.dcm and c.dcm, b marked encrypted in the central directory or one byte of its data changed."""
    data = bytearray(
        stored_zip(
            {f"{n}.dcm": to_bytes(dental_dataset(patient_id=f"00{i}")) for i, n in enumerate("abc", 60)}
        )
    )
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("b.dcm")
    if how == "encrypted":
        central = next(
            i
            for i in range(len(data))
            if data[i : i + 4] == b"PK\x01\x02" and data[i + 46 : i + 51] == b"b.dcm"
        )
        data[central + 8] |= 0x01
    else:
        start = info.header_offset + 30 + len(b"b.dcm") + len(info.extra)
        data[start + 200] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        (
            "encrypted",
            "encrypted in the zip: refused (an import has no password)",
        ),
        ("corrupt", "cannot be unpacked (BadZipFile: Bad CRC-32 for file 'b.dcm')"),
    ],
)
async def test_a_zip_entry_that_cannot_be_unpacked_is_reported_once_and_the_later_ones_imported(
    api_client: Any, how: str, reason: str
) -> None:
    response = await api_client.post("/api/v1/import", data=form(("set.zip", broken_zip(how))))
    assert response.status == 201, await response.text()
    body = await response.json()
    assert sorted(item["path"] for item in body["imported"]) == ["set.zip/a.dcm", "set.zip/c.dcm"]
    assert body["errors"] == [{"path": "set.zip/b.dcm", "reason": reason}]


def test_zip_entries_the_file_system_refuses_are_reported_by_their_zip_names_and_leave_nothing(
    tmp_path: Path,
) -> None:
    from bridge.dicom.fileset import unpack_zip

    deep = "d/" * 2100 + "x.dcm"
    archive = tmp_path / "up.zip"
    archive.write_bytes(stored_zip({"a": b"1", "a/b.dcm": b"2", "X" * 300: b"3", deep: b"4", "c.dcm": b"5"}))
    dest = tmp_path / "out"
    dest.mkdir()
    problems = unpack_zip(archive, dest, "up.zip", 1 << 20)
    assert [(p.path, p.reason) for p in problems] == [
        ("up.zip/a/b.dcm", "its folder is a file of the zip: refused"),
        (f"up.zip/{'X' * 300}", "a file or folder name longer than 255 bytes: refused"),
        (f"up.zip/{deep}", "a path longer than 1024 bytes: refused"),
    ]
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["a", "c.dcm"]
    assert (dest / "c.dcm").read_bytes() == b"5"
    broken = tmp_path / "broken.zip"
    broken.write_bytes(broken_zip("encrypted"))
    (dest2 := tmp_path / "out2").mkdir()
    assert [(p.path, p.reason) for p in unpack_zip(broken, dest2, "b.zip", 1 << 20)] == [
        (
            "b.zip/b.dcm",
            "encrypted in the zip: refused (an import has no password)",
        )
    ]
    assert sorted(p.name for p in dest2.iterdir()) == ["a.dcm", "c.dcm"], "no empty b.dcm is left behind"
    unreadable = tmp_path / "cut.zip"
    unreadable.write_bytes(stored_zip({"a.dcm": b"1"})[:-10])  # the end of the central directory cut off
    (dest3 := tmp_path / "out3").mkdir()
    assert [(p.path, p.reason) for p in unpack_zip(unreadable, dest3, "cut.zip", 1 << 20)] == [
        ("cut.zip", "unreadable zip (BadZipFile: File is not a zip file)")
    ]


async def test_a_multipart_body_cut_before_its_closing_boundary_is_a_400_with_the_report(
    api_client: Any,
) -> None:
    """The body is complete as HTTP goes (its Content-Length arrived) but its last part never ends: the
    files before it are imported and reported, the cut one is not stored shortened."""
    first = to_bytes(dental_dataset(patient_id="0050"))
    cut = to_bytes(dental_dataset(patient_id="0051"))
    head = 'Content-Disposition: form-data; name="file"; filename="{}"\r\n\r\n'
    raw = (
        ("--cut\r\n" + head.format("first.dcm")).encode()
        + first
        + ("\r\n--cut\r\n" + head.format("cut.dcm")).encode()
        + cut
    )
    response = await api_client.post(
        "/api/v1/import", data=raw, headers={"Content-Type": "multipart/form-data; boundary=cut"}
    )
    assert response.status == 400
    problem = await response.json(content_type=PROBLEM)
    assert problem["type"].endswith("import-malformed")
    assert problem["detail"].startswith(
        "the upload is not well-formed multipart/form-data: the body ends inside a part, before its"
        " closing boundary"
    )
    assert [(i["path"], i["pms_id"]) for i in problem["report"]["imported"]] == [("first.dcm", "0050")]
    patients = await (await api_client.get("/api/v1/patients", params={"pms_id": "0051"})).json()
    assert patients["items"] == []


async def test_bodies_sent_in_chunked_transfer_encoding_import_intact(
    api_client: Any, runtime: Runtime
) -> None:
    """No Content-Length: HTTP chunks of odd sizes, for a single file and for a multipart body."""
    single = to_bytes(dental_dataset(patient_id="0052"))
    part = to_bytes(dental_dataset(patient_id="0053"))
    multipart = (
        b'--chunked\r\nContent-Disposition: form-data; name="file"; filename="p.dcm"\r\n\r\n'
        + part
        + b"\r\n--chunked--\r\n"
    )

    def chunked(data: bytes) -> Any:
        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, len(data), 777):
                yield data[start : start + 777]

        return pieces()

    one = await api_client.post("/api/v1/import", data=chunked(single), headers=AS_DICOM)
    assert one.status == 201, await one.text()
    form = await api_client.post(
        "/api/v1/import",
        data=chunked(multipart),
        headers={"Content-Type": "multipart/form-data; boundary=chunked"},
    )
    assert form.status == 201, await form.text()
    for response, data in ((one, single), (form, part)):
        (item,) = (await response.json())["imported"]
        image = await runtime.service.get_image(ORIGIN, item["image_id"])
        assert image is not None and runtime.files.path_for(image.sha256, "dcm").read_bytes() == data


async def test_received_files_are_moved_into_the_store_intact(api_client: Any, runtime: Runtime) -> None:
    single = to_bytes(dental_dataset(patient_id="0042"))
    response = await api_client.post("/api/v1/import", data=form(("a.dcm", single)))
    assert response.status == 201
    (item,) = (await response.json())["imported"]
    image = await runtime.service.get_image(ORIGIN, item["image_id"])
    assert image is not None
    assert runtime.files.path_for(image.sha256, "dcm").read_bytes() == single
    assert runtime.files.verify(image.sha256, "dcm") is None
    leftovers = [p.name for p in runtime.settings.store.images.iterdir() if p.name.startswith(".import-")]
    assert leftovers == [], "the upload's temporary folder was left behind"


async def test_nothing_imported_is_a_problem_with_the_report(api_client: Any) -> None:
    response = await api_client.post("/api/v1/import", data=form(("notes.txt", b"hello")))
    assert response.status == 422 and response.content_type == PROBLEM
    body = await response.json(content_type=PROBLEM)
    assert body["type"].endswith("import-failed")
    assert body["report"]["errors"] == [
        {"path": "notes.txt", "reason": "not a DICOM file (no DICM marker after the 128-byte preamble)"}
    ]


async def test_a_file_refused_for_another_patients_uid_leaves_its_new_patient_uncreated(
    api_client: Any,
) -> None:
    """The issue's reproduction: file A imported for P1, then a copy of A whose PatientID is NEW9 (same SOP
    Instance UID). The copy is refused, and NEW9 does not exist afterwards (it would be created only in
    the transaction adding its first image)."""
    first = dental_dataset(patient_id="P1")
    assert (await api_client.post("/api/v1/import", data=form(("a.dcm", to_bytes(first))))).status == 201
    copy = dental_dataset(patient_id="NEW9", name="Other^Person")
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    response = await api_client.post("/api/v1/import", data=form(("copy.dcm", to_bytes(copy))))
    assert response.status == 422
    body = await response.json(content_type=PROBLEM)
    assert body["report"]["errors"] == [
        {
            "path": "copy.dcm",
            "reason": f"SOP Instance UID {first.SOPInstanceUID} is already stored for another patient",
        }
    ]
    listed = await api_client.get("/api/v1/patients", params={"pms_id": "NEW9"})
    assert listed.status == 200 and (await listed.json())["items"] == []
    everyone = await (await api_client.get("/api/v1/patients")).json()
    assert [patient["pms_id"] for patient in everyone["items"]] == ["P1"]


async def test_wrong_requests_are_refused(api_client: Any) -> None:
    plain = await api_client.post("/api/v1/import", data="x", headers={"Content-Type": "text/plain"})
    assert plain.status == 415
    # JSON names the server's own folders, off by default (tests/test_dicom_server_folders.py)
    assert (await api_client.post("/api/v1/import", json={"file": "x"})).status == 403
    empty = FormData(default_to_multipart=True)
    empty.add_field("comment", "no file")
    response = await api_client.post("/api/v1/import", data=empty)
    assert response.status == 400
    assert (await response.json(content_type=PROBLEM))["detail"] == "no part named 'file' in the upload"
    anonymous = await api_client.post(
        "/api/v1/import", data=form(("a.dcm", b"x")), headers={"Authorization": ""}
    )
    assert anonymous.status == 401


async def test_uploads_and_zips_beyond_the_budget_are_refused(
    small_client: TestClient[Any, Any], tmp_path: Path
) -> None:
    too_big = await small_client.post("/api/v1/import", data=form(("big.dcm", bytes(2 * 1024 * 1024))))
    assert too_big.status == 413
    assert "larger than 1 MB" in (await too_big.json(content_type=PROBLEM))["detail"]
    bomb = zipped({"zeros.dcm": bytes(8 * 1024 * 1024)})  # a few KB that unpack to 8 MB
    assert len(bomb) < 100_000
    first = to_bytes(dental_dataset(patient_id="0042"))
    response = await small_client.post("/api/v1/import", data=form(("first.dcm", first), ("bomb.zip", bomb)))
    assert response.status == 413
    body = await response.json(content_type=PROBLEM)
    assert "unpacks to more than 1 MB" in body["detail"]
    assert "the files received before the limit are in the report" in body["detail"]
    assert [item["path"] for item in body["report"]["imported"]] == ["first.dcm"]


async def test_one_file_as_the_whole_body_imports_as_orthanc_takes_it(
    api_client: Any, runtime: Runtime
) -> None:
    single = to_bytes(dental_dataset(patient_id="0044", name="O'Brien^Seán"))
    response = await api_client.post(
        "/api/v1/import",
        data=single,
        headers={**AS_DICOM, "Content-Disposition": 'attachment; filename="IO1.dcm"'},
    )
    assert response.status == 201, await response.text()
    (item,) = (await response.json())["imported"]
    assert (item["path"], item["category"]) == ("IO1.dcm", "intraoral-xray")
    image = await runtime.service.get_image(ORIGIN, item["image_id"])
    assert image is not None and runtime.files.path_for(image.sha256, "dcm").read_bytes() == single
    unnamed = await api_client.post(
        "/api/v1/import", data=to_bytes(dental_dataset(patient_id="0045")), headers=AS_DICOM
    )
    assert unnamed.status == 201 and (await unnamed.json())["imported"][0]["path"] == "part1"
    for disposition, reported in [
        ("attachment; filename*=UTF-8''R%C3%B6ntgen%20Z%C3%A4hne.dcm", "Röntgen Zähne.dcm"),
        ('attachment; filename="../../etc/IO2.dcm"', "IO2.dcm"),  # a name, never a path
    ]:
        named = await api_client.post(
            "/api/v1/import",
            data=to_bytes(dental_dataset(patient_id="0045")),
            headers={**AS_DICOM, "Content-Disposition": disposition},
        )
        assert named.status == 201 and (await named.json())["imported"][0]["path"] == reported
    again = await api_client.post("/api/v1/import", data=single, headers=AS_DICOM)
    assert again.status == 200 and (await again.json())["skipped"][0]["reason"] == "already imported"


async def test_upload_file_names_longer_than_the_file_system_takes_are_cut_by_bytes(api_client: Any) -> None:
    """'€' is 3 bytes of UTF-8: 120 of them are 360 bytes, beyond the 255 a file name may have."""
    from urllib.parse import quote

    parts = b""
    for i, name in enumerate(("€" * 120, "€" * 120 + ".dcm")):
        head = f'--b\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'
        parts += head.encode() + to_bytes(dental_dataset(patient_id=f"007{i}")) + b"\r\n"
    response = await api_client.post(
        "/api/v1/import",
        data=parts + b"--b--\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert response.status == 201, await response.text()
    body = await response.json()
    assert sorted(item["path"] for item in body["imported"]) == ["€" * 32 + ".dcm", "€" * 33]
    assert body["errors"] == []
    single = await api_client.post(
        "/api/v1/import",
        data=to_bytes(dental_dataset(patient_id="0072")),
        headers={**AS_DICOM, "Content-Disposition": "attachment; filename*=UTF-8''" + quote("€" * 120)},
    )
    assert single.status == 201, await single.text()
    assert [item["path"] for item in (await single.json())["imported"]] == ["€" * 33]


async def test_a_zipped_file_set_as_the_whole_body(api_client: Any) -> None:
    response = await api_client.post(
        "/api/v1/import",
        data=io.BytesIO(reference_zip()),
        headers={"Content-Type": "application/zip", "Content-Disposition": 'attachment; filename="set.zip"'},
    )
    assert response.status == 201, await response.text()
    body = await response.json()
    assert sorted(item["path"] for item in body["imported"]) == [
        "set.zip/media/77654033/CR1/6154",
        "set.zip/media/77654033/CR2/6247",
        "set.zip/media/77654033/CR3/6278",
        "set.zip/media/77654033/CT2/17106",
    ]
    assert body["summary"]["errors"] == 24  # the DICOMDIR lists the other patient's files, not zipped


async def test_a_zipped_file_set_whose_dicomdir_names_a_too_long_file_reports_it_and_imports_the_rest(
    api_client: Any,
) -> None:
    import pydicom

    directory = pydicom.dcmread(REFERENCE_SET / "DICOMDIR")
    images = [r for r in directory.DirectoryRecordSequence if "ReferencedFileID" in r]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid File ID this test writes on purpose
        images[0].ReferencedFileID = ["X" * 300]
        written = io.BytesIO()
        directory.save_as(written)
    members = {"media/DICOMDIR": written.getvalue()}
    for path in sorted((REFERENCE_SET / "77654033").rglob("*")):
        if path.is_file():
            members[f"media/{path.relative_to(REFERENCE_SET).as_posix()}"] = path.read_bytes()
    response = await api_client.post(
        "/api/v1/import",
        data=io.BytesIO(zipped(members)),
        headers={"Content-Type": "application/zip", "Content-Disposition": 'attachment; filename="set.zip"'},
    )
    assert response.status == 201, await response.text()
    body = await response.json()
    errors = {item["path"]: item["reason"] for item in body["errors"]}
    assert (
        errors[f"set.zip/media/{'X' * 300}"]
        == "the DICOMDIR names a file or folder longer than 255 bytes: refused"
    )
    assert sorted(item["path"] for item in body["imported"]) == [
        "set.zip/media/77654033/CR2/6247",
        "set.zip/media/77654033/CR3/6278",
        "set.zip/media/77654033/CT2/17106",
    ]


async def test_single_file_bodies_that_are_empty_bad_or_too_large(
    api_client: Any, small_client: TestClient[Any, Any]
) -> None:
    empty = await api_client.post("/api/v1/import", data=b"", headers=AS_DICOM)
    assert empty.status == 400 and empty.content_type == PROBLEM
    assert "the body is empty" in (await empty.json(content_type=PROBLEM))["detail"]
    truncated = to_bytes(dental_dataset(patient_id="0046"))[:2000]
    bad = await api_client.post("/api/v1/import", data=truncated, headers=AS_DICOM)
    assert bad.status == 422
    (error,) = (await bad.json(content_type=PROBLEM))["report"]["errors"]
    assert error["path"] == "part1" and error["reason"]
    big = await small_client.post("/api/v1/import", data=io.BytesIO(bytes(2 * 1024 * 1024)), headers=AS_DICOM)
    assert big.status == 413
    other = await api_client.post(
        "/api/v1/import", data=b"x", headers={"Content-Type": "application/octet-stream"}
    )
    assert other.status == 415
    assert "application/dicom" in (await other.json(content_type=PROBLEM))["detail"]


@pytest.mark.parametrize("content_type", ["application/dicom", "multipart/form-data; boundary=cut"])
def test_an_upload_cut_off_mid_body_leaves_nothing_and_the_daemon_serves_on(
    daemon: DaemonProcess, content_type: str
) -> None:
    head = (
        "POST /api/v1/import HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {daemon.token}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: 8000000\r\n\r\n"
    )
    part = b'--cut\r\nContent-Disposition: form-data; name="file"; filename="a.dcm"\r\n\r\n'
    with socket.create_connection(("127.0.0.1", daemon.settings.api.port)) as cut:
        cut.sendall(
            head.encode() + (part if content_type.startswith("multipart") else b"") + bytes(3_000_000)
        )
        time.sleep(0.3)
    cut_off = daemon.wait_for_records("client closed the connection mid-request", 10)
    records = daemon.records()
    assert [(r["level"], r["path"]) for r in cut_off] == [("warning", "/api/v1/import")]
    assert not [r for r in records if r.get("msg") == "unhandled error"]
    images = daemon.settings.store.images
    assert [p.name for p in images.iterdir() if p.name.startswith(".import-")] == []
    status, body = daemon.request(
        "POST", "/api/v1/import", to_bytes(dental_dataset()), headers={"Content-Type": "application/dicom"}
    )
    assert status == 201, body


def test_a_full_store_answers_507_with_the_report_and_the_daemon_serves_on(
    tmp_path: Path, store_url: str
) -> None:
    daemon = start_daemon(write_config(tmp_path / "full", store_url), file_size_limit=2 << 20)
    try:
        small = to_bytes(dental_dataset(patient_id="0047"))
        big = to_bytes(dental_dataset(patient_id="0048", pixels=np.ones((1500, 1000), dtype=np.uint16)))
        assert len(big) > 2 << 20
        boundary = "full-store"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'.encode()
            + data
            + b"\r\n"
            for name, data in (("small.dcm", small), ("big.dcm", big))
        ]
        status, body = daemon.request(
            "POST",
            "/api/v1/import",
            b"".join(parts) + f"--{boundary}--\r\n".encode(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert status == 507, body
        problem = json.loads(body)
        assert problem["type"].endswith("import-not-stored") and "File too large" in problem["detail"]
        assert [item["path"] for item in problem["report"]["imported"]] == ["small.dcm"]
        images = daemon.settings.store.images
        assert [p.name for p in images.iterdir() if p.name.startswith(".import-")] == []
        status, _ = daemon.request("GET", "/healthz", token=None)
        assert status == 200
        status, body = daemon.request(
            "POST", "/api/v1/import", to_bytes(dental_dataset(patient_id="0049")), headers=AS_DICOM
        )
        assert status == 201, body
        # an acquisition uploaded to a patient meets the same full disk: 507 from the shared middleware
        patient_id = json.loads(body)["imported"][0]["patient_id"]
        status, body = daemon.request(
            "POST",
            f"/api/v1/patients/{patient_id}/images",
            parts[1] + f"--{boundary}--\r\n".encode(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert status == 507, body
        assert "cannot be written or read (File too large)" in json.loads(body)["detail"]
        status, body = daemon.request("GET", "/api/v1/openapi.json", token=None)
        assert "507" in json.loads(body)["paths"]["/api/v1/patients/{id}/images"]["post"]["responses"]
        status, body = daemon.request("GET", f"/api/v1/patients/{patient_id}/images")
        assert status == 200 and len(json.loads(body)["items"]) == 1
    finally:
        daemon.stop()
