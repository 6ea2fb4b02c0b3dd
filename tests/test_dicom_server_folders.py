"""`POST /api/v1/import` with a JSON body: files and folders the server already has, inside
`[dicom] import_folders`, read where they lie by the running daemon (real daemon, real files, real HTTP)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.runtime import Runtime
from bridge.web.app import build_api_app
from bridge.web.dicom_import import MAX_PATHS
from bridge.web.problems import CONTENT_TYPE as PROBLEM
from tests.conftest import DaemonProcess
from tests.support.dicomfiles import dental_dataset, sample, write

REFERENCE_SET = sample("CT_small.dcm").parent / "dicomdirtests"
AS_JSON = {"Content-Type": "application/json"}


def post_paths(daemon: DaemonProcess, paths: list[str]) -> tuple[int, dict[str, Any]]:
    status, body = daemon.request(
        "POST", "/api/v1/import", json.dumps({"paths": paths}).encode(), headers=AS_JSON
    )
    return status, json.loads(body)


def test_a_folder_of_the_server_is_imported_where_it_lies(daemon_factory: Any, tmp_path: Path) -> None:
    media = tmp_path / "media"
    cd = media / "cd1"
    first = write(dental_dataset(patient_id="0042", name="Müller^Anna"), cd / "IMG1.dcm")
    write(dental_dataset(patient_id="0042", name="Müller^Anna"), cd / "sub" / "IMG2.dcm")
    shutil.copytree(REFERENCE_SET, media / "set")
    before = first.read_bytes()
    daemon = daemon_factory(dicom={"import_folders": f"{media}; {tmp_path / 'elsewhere'}"})
    status, body = post_paths(daemon, [str(cd), str(media / "set" / "DICOMDIR")])
    assert status == 201, body
    paths = sorted(item["path"] for item in body["imported"])
    assert paths[:2] == [f"{cd}/IMG1.dcm", f"{cd}/sub/IMG2.dcm"]  # named as the request named them
    assert body["summary"]["images"] == len(paths) > 2  # the cd's two and the file set's CT and CR images
    # the reference set also lists MR images, which the bridge does not read: reported, the rest imported
    assert all(e["reason"].startswith("unsupported SOP class") for e in body["errors"]), body["errors"]
    assert all(e["path"].startswith(f"{media}/set/") for e in body["errors"])
    assert first.read_bytes() == before  # read, not moved or changed
    [patient] = [item["patient_id"] for item in body["imported"] if item["pms_id"] == "0042"][:1]
    status, listed = daemon.request("GET", f"/api/v1/patients/{patient}/images")
    assert status == 200 and len(json.loads(listed)["items"]) == 2
    # the same again: nothing new (200), every file "already imported"
    status, again = post_paths(daemon, [str(cd)])
    assert status == 200 and again["summary"]["images"] == 0 and len(again["skipped"]) == 2


@pytest.fixture
async def client_for(make_settings: Any) -> AsyncIterator[Any]:
    """Factory: a loopback client of an API whose `[dicom] import_folders` is the given text."""
    started: list[tuple[TestClient[Any, Any], Runtime]] = []

    async def start(folders: str) -> TestClient[Any, Any]:
        rt = Runtime.build(make_settings(dicom={"import_folders": folders}))
        client: TestClient[Any, Any] = TestClient(TestServer(build_api_app(rt)))
        await client.start_server()
        client.session.headers["Authorization"] = f"Bearer {rt.settings.api.token}"
        started.append((client, rt))
        return client

    yield start
    for client, rt in started:
        await client.close()
        await rt.audit.flush()
        rt.close()


async def problem(client: TestClient[Any, Any], body: object) -> tuple[int, dict[str, Any]]:
    response = await client.post("/api/v1/import", data=json.dumps(body), headers=AS_JSON)
    assert response.content_type == PROBLEM, await response.text()
    answer: dict[str, Any] = await response.json(content_type=PROBLEM)
    return response.status, answer


async def test_json_imports_are_refused_while_no_folder_is_listed(client_for: Any, tmp_path: Path) -> None:
    file = write(dental_dataset(), tmp_path / "a.dcm")
    status, body = await problem(await client_for(""), {"paths": [str(file)]})
    assert status == 403 and body["type"].endswith("import-folders-off")
    assert "[dicom] import_folders" in body["detail"]


async def test_a_path_outside_the_folders_is_refused_before_anything_is_read(
    client_for: Any, tmp_path: Path
) -> None:
    media, outside = tmp_path / "media", tmp_path / "outside"
    write(dental_dataset(), media / "in.dcm")
    secret = write(dental_dataset(patient_id="0099"), outside / "secret.dcm")
    (media / "door").symlink_to(outside, target_is_directory=True)
    client = await client_for(str(media))
    for path in (secret, media / ".." / "outside", media / "door", outside / "missing.dcm", tmp_path):
        status, body = await problem(client, {"paths": [str(media / "in.dcm"), str(path)]})
        assert status == 403 and body["type"].endswith("outside-import-folders"), (path, body)
    # a folder whose name only starts like the allowed one is another folder
    twin = write(dental_dataset(), tmp_path / "media-twin" / "x.dcm")
    status, body = await problem(client, {"paths": [str(twin)]})
    assert status == 403
    listed = await client.get("/api/v1/patients", params={"pms_id": "0099"})
    assert (await listed.json())["items"] == []  # nothing of the refused request was read


async def test_a_link_inside_a_folder_that_leads_out_of_it_is_refused_per_file(
    client_for: Any, tmp_path: Path
) -> None:
    media, outside = tmp_path / "media", tmp_path / "outside"
    write(dental_dataset(patient_id="0042"), media / "cd" / "in.dcm")
    secret = write(dental_dataset(patient_id="0099"), outside / "secret.dcm")
    (media / "cd" / "link.dcm").symlink_to(secret)
    client = await client_for(str(media))
    response = await client.post(
        "/api/v1/import", data=json.dumps({"paths": [str(media / "cd")]}), headers=AS_JSON
    )
    assert response.status == 201
    body = await response.json()
    assert [item["path"] for item in body["imported"]] == [f"{media / 'cd'}/in.dcm"]
    assert body["errors"] == [
        {
            "path": f"{media / 'cd'}/link.dcm",
            "reason": "a link to a file outside [dicom] import_folders: refused",
        }
    ]


async def test_json_bodies_that_name_no_usable_paths_are_refused(client_for: Any, tmp_path: Path) -> None:
    media = tmp_path / "media"
    file = write(dental_dataset(), media / "a.dcm")
    client = await client_for(str(media))
    bodies: tuple[dict[str, object], ...] = (
        {},
        {"paths": []},
        {"paths": str(file)},
        {"paths": [str(file)], "move": True},
        {"paths": ["media/a.dcm"]},
        {"paths": [7]},
        {"paths": [str(file) + "\0.dcm"]},
    )
    for body in bodies:
        status, answer = await problem(client, body)
        assert status == 422, (body, answer)
    status, answer = await problem(client, ["not", "an", "object"])
    assert status == 400 and answer["detail"] == "the body must be a JSON object"
    status, answer = await problem(client, {"paths": [str(file)] * (MAX_PATHS + 1)})
    assert status == 413
    missing = await client.post(
        "/api/v1/import", data=json.dumps({"paths": [str(media / "gone.dcm")]}), headers=AS_JSON
    )
    assert missing.status == 422  # inside the folder, but not there: reported like a missing file
    report = (await missing.json(content_type=PROBLEM))["report"]
    assert report["errors"] == [{"path": str(media / "gone.dcm"), "reason": "no such file or folder"}]
    assert os.path.exists(file)


def test_a_file_swapped_for_a_link_after_it_was_found_is_refused_when_read(tmp_path: Path) -> None:
    # Found inside the folder, then replaced by a link to a file outside before a worker reads it: the
    # check at discovery alone let the outside file become an image (an auditor's race, 300 files).
    from bridge.dicom.fileset import OUTSIDE, discover
    from bridge.dicom.prepare import Stored, Unreadable, prepare_many, store_file
    from bridge.store.files import FileStore

    media, outside, store = tmp_path / "media", tmp_path / "outside", tmp_path / "store"
    FileStore(store).create_root()
    inside = write(dental_dataset(patient_id="0042"), media / "x.dcm")
    secret = write(dental_dataset(patient_id="0099"), outside / "secret.dcm")
    roots = (str(media.resolve()),)
    [candidate] = discover([(str(media), str(media))], roots).candidates
    [stored] = prepare_many([candidate], 0x00100020, 1 << 30, str(store))
    assert isinstance(stored, Stored) and stored.facts.pms_id == "0042"
    inside.unlink()
    inside.symlink_to(secret)
    [refused] = prepare_many([candidate], 0x00100020, 1 << 30, str(store))
    assert isinstance(refused, Unreadable) and refused.problem.reason == OUTSIDE
    again = store_file(stored.facts, str(store), False, roots)  # as a CT slice imported on its own
    assert isinstance(again, Unreadable) and again.problem.reason == OUTSIDE


async def test_a_dicomdir_link_leading_out_of_the_folder_is_not_read(client_for: Any, tmp_path: Path) -> None:
    media, outside = tmp_path / "media", tmp_path / "outside"
    shutil.copytree(REFERENCE_SET, outside / "set")
    (media / "cd").mkdir(parents=True)
    (media / "cd" / "DICOMDIR").symlink_to(outside / "set" / "DICOMDIR")
    client = await client_for(str(media))
    status, body = await problem(client, {"paths": [str(media / "cd")]})
    assert status == 422
    assert body["report"]["errors"] == [
        {
            "path": f"{media / 'cd'}/DICOMDIR",
            "reason": "a link to a file outside [dicom] import_folders: refused",
        }
    ]  # nothing the outside DICOMDIR lists is named


async def test_odd_entries_in_a_folder_are_reported_per_file_and_the_rest_imported(
    client_for: Any, tmp_path: Path
) -> None:
    media = tmp_path / "media"
    write(dental_dataset(patient_id="0042"), media / "cd" / "ok.dcm")
    write(dental_dataset(patient_id="LAT1", name="Müller^Hans"), media / "cd" / "x.dcm").rename(
        os.fsdecode(os.fsencode(str(media / "cd")) + b"/M\xfcller.dcm")  # a Latin-1 name, as on old CDs
    )
    (media / "cd" / "loopA").symlink_to(media / "cd" / "loopB")
    (media / "cd" / "loopB").symlink_to(media / "cd" / "loopA")
    client = await client_for(str(media))
    response = await client.post(
        "/api/v1/import", data=json.dumps({"paths": [str(media / "cd")]}), headers=AS_JSON
    )
    assert response.status == 201, await response.text()
    body = await response.json()
    assert sorted(item["path"] for item in body["imported"]) == [
        f"{media / 'cd'}/M\\xfcller.dcm",
        f"{media / 'cd'}/ok.dcm",
    ]
    assert sorted(e["path"].rsplit("/", 1)[1] for e in body["errors"]) == ["loopA", "loopB"]
    assert all(e["reason"] == "cannot be read: Too many levels of symbolic links" for e in body["errors"])
    # a name longer than the system takes, and a lone surrogate, are a 422 each, not a 5xx
    status, answer = await problem(client, {"paths": [str(media / ("a" * 300))]})
    assert status == 422
    assert answer["report"]["errors"] == [
        {"path": str(media / ("a" * 300)), "reason": "cannot be read: File name too long"}
    ]
    response = await client.post(
        "/api/v1/import", data='{"paths": ["' + str(media) + '/\\ud800.dcm"]}', headers=AS_JSON
    )
    assert response.status == 422 and (await response.json(content_type=PROBLEM))["field"] == "paths"


def test_a_text_with_a_lone_surrogate_is_still_sent_as_json() -> None:
    # A name that is not UTF-8 reached the answer as lone surrogates: UTF-8 cannot carry them, and the
    # import that stored its images answered 500 (the report lost). Names are escaped where files are
    # found (above); any text that still holds one is sent with JSON escapes.
    from bridge.web.problems import json_text

    assert json.loads(json_text({"path": "M\udcfcller.dcm"})) == {"path": "M\udcfcller.dcm"}
    assert json_text({"path": "Müller.dcm"}) == '{"path": "Müller.dcm"}'


def test_a_fifo_put_where_a_file_was_is_refused_without_waiting(tmp_path: Path) -> None:
    # A link to a FIFO swapped in during an import held a pool worker in open() for good, and the daemon,
    # waiting for it, never stopped on SIGTERM. Files are opened without blocking; only regular files read.
    import threading

    from bridge.dicom.fileset import OUTSIDE, discover
    from bridge.dicom.prepare import Unreadable, prepare_many
    from bridge.store.files import FileStore

    media, outside, store = tmp_path / "media", tmp_path / "outside", tmp_path / "store"
    FileStore(store).create_root()
    outside.mkdir()
    os.mkfifo(outside / "fifo")
    first = write(dental_dataset(), media / "a.dcm")
    second = write(dental_dataset(), media / "b.dcm")
    roots = (str(media.resolve()),)
    candidates = discover([(str(media), str(media))], roots).candidates
    first.unlink()
    first.symlink_to(outside / "fifo")  # leads out: refused
    second.unlink()
    os.mkfifo(second)  # inside, but not a file
    results: list[object] = []
    worker = threading.Thread(
        target=lambda: results.extend(prepare_many(candidates, 0x00100020, 1 << 30, str(store))),
        daemon=True,
    )
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "a worker waits in open() on a FIFO"
    reasons = [r.problem.reason for r in results if isinstance(r, Unreadable)]
    assert reasons == [OUTSIDE, "cannot be read: not a regular file"]


async def test_what_lies_outside_the_folders_is_not_told_by_the_report(
    client_for: Any, tmp_path: Path
) -> None:
    # A link to a file outside that exists was "a link ... outside", one to a file that does not was left
    # out without a word, and through a DICOMDIR the two read "outside its file set" and "missing": the
    # report told whether a path outside existed. Links that lead out are refused before they are followed.
    media, outside = tmp_path / "media", tmp_path / "outside"
    write(dental_dataset(patient_id="0099"), outside / "secret.dcm")
    links = media / "links"
    links.mkdir(parents=True)
    (links / "exists.dcm").symlink_to(outside / "secret.dcm")
    (links / "dangling.dcm").symlink_to(outside / "nothere.dcm")
    write(dental_dataset(patient_id="0042"), links / "ok.dcm")
    client = await client_for(str(media))
    response = await client.post("/api/v1/import", data=json.dumps({"paths": [str(links)]}), headers=AS_JSON)
    assert response.status == 201
    body = await response.json()
    assert {e["path"].rsplit("/", 1)[1]: e["reason"] for e in body["errors"]} == {
        "dangling.dcm": "a link to a file outside [dicom] import_folders: refused",
        "exists.dcm": "a link to a file outside [dicom] import_folders: refused",
    }
    # the same through a DICOMDIR whose folder holds a link leading out
    fileset = media / "cd"
    shutil.copytree(REFERENCE_SET / "77654033", fileset / "77654033")
    (fileset / "OUT").symlink_to(outside, target_is_directory=True)
    directory = pydicom.dcmread(REFERENCE_SET / "DICOMDIR")
    images = [r for r in directory.DirectoryRecordSequence if "ReferencedFileID" in r]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the File IDs this test writes on purpose
        images[0].ReferencedFileID = ["OUT", "SECRET.DCM"]
        images[1].ReferencedFileID = ["OUT", "NOTHERE"]
        directory.save_as(fileset / "DICOMDIR")
    response = await client.post(
        "/api/v1/import", data=json.dumps({"paths": [str(fileset)]}), headers=AS_JSON
    )
    body = await response.json()
    reasons = {e["path"].rsplit("/", 1)[1]: e["reason"] for e in body["errors"] if "/OUT/" in e["path"]}
    assert reasons == {
        "SECRET.DCM": "the DICOMDIR refers to a file outside its file set: refused",
        "NOTHERE": "the DICOMDIR refers to a file outside its file set: refused",
    }


async def test_a_dicomdir_name_beyond_ascii_finds_its_latin_1_file(runtime: Runtime, tmp_path: Path) -> None:
    # A CD written with ISO_IR 100 names lists CAFÉ; on a system that is not UTF-8 the file is CAF\xc9.
    from bridge.dicom.importer import Importer
    from bridge.model import Origin

    fileset = tmp_path / "cd"
    shutil.copytree(REFERENCE_SET / "77654033", fileset / "77654033")
    directory = pydicom.dcmread(REFERENCE_SET / "DICOMDIR")
    directory.SpecificCharacterSet = "ISO_IR 100"
    images = [r for r in directory.DirectoryRecordSequence if "ReferencedFileID" in r]
    listed = [str(part) for part in images[0].ReferencedFileID]
    source = fileset.joinpath(*listed)
    os.rename(os.fsencode(source), os.fsencode(source.parent) + b"/CAF\xc9")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a File ID beyond A-Z 0-9 _ is what such a CD holds
        images[0].ReferencedFileID = [*listed[:-1], "CAFÉ"]
        directory.save_as(fileset / "DICOMDIR")
    report = await Importer(runtime, Origin("dicom", "cli", "TEST")).run([(str(fileset), str(fileset))])
    assert "/".join([str(fileset), *listed[:-1], "CAFÉ"]) in {item.path for item in report.imported}
