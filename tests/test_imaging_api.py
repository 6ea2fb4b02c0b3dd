"""Imaging through the REST API and the store (SQLite and PostgreSQL): lossless round trips, cached
watermarked thumbnails and previews, orientation changes, and refusals that leave nothing behind."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from aiohttp import FormData
from PIL import Image

from bridge.config import Settings
from bridge.imaging.analyze import ImagingError
from bridge.imaging.pipeline import Imaging
from bridge.model import Origin
from bridge.runtime import Runtime
from bridge.service import Refused
from bridge.web.openapi import document
from tests.support import synthetic
from tests.support.processes import alive

ORIGIN = Origin(protocol="test", transport="api", workstation="WS1", actor="pytest")
_patients = 0


async def new_patient(client: Any) -> int:
    """A new patient (a fresh PMS id each time)."""
    global _patients
    _patients += 1
    body = {"pms_system": "PVS1", "pms_id": f"{_patients:04d}", "last_name": "Muster", "first_name": "Eva"}
    response = await client.post("/api/v1/patients", json=body)
    assert response.status == 201, await response.text()
    return int((await response.json())["id"])


async def upload(client: Any, patient_id: int, *files: tuple[str, bytes], **fields: str) -> Any:
    form = FormData()
    for name, data in files:
        form.add_field("file", io.BytesIO(data), filename=name, content_type="application/octet-stream")
    for key, value in fields.items():
        form.add_field(key, value)
    return await client.post(f"/api/v1/patients/{patient_id}/images", data=form)


async def upload_one(client: Any, data: bytes, name: str = "image", **fields: str) -> dict[str, Any]:
    patient_id = await new_patient(client)
    response = await upload(client, patient_id, (name, data), **fields)
    assert response.status == 201, await response.text()
    items: list[dict[str, Any]] = (await response.json())["items"]
    return items[0]


def stored_files(settings: Settings) -> list[Path]:
    """Every file under the images folder (originals and cached renderings alike)."""
    root = settings.store.images
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def jpeg_pixels(data: bytes) -> np.ndarray[Any, Any]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG"
        return np.asarray(img.convert("RGB")).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# Lossless originals


async def test_16_bit_png_round_trips_bit_exact(api_client: Any) -> None:
    values = np.random.default_rng(3).integers(0, 65536, (300, 400), dtype=np.uint16)
    values[0, :4] = (0, 1, 65534, 65535)
    data = synthetic.png_bytes(values)
    image = await upload_one(api_client, data, "xray.png")
    assert (image["width"], image["height"], image["bits_stored"], image["color"]) == (400, 300, 16, False)

    response = await api_client.get(f"/api/v1/images/{image['id']}/file")
    assert response.status == 200 and response.headers["Content-Type"] == "image/png"
    returned = await response.read()
    assert returned == data
    with Image.open(io.BytesIO(returned)) as img:
        assert np.array_equal(np.asarray(img).astype(np.uint16), values)


@pytest.mark.parametrize("kind", ["dicom", "tiff"])
async def test_12_bit_dicom_and_16_bit_tiff_round_trip_bit_exact(api_client: Any, kind: str) -> None:
    values = synthetic.intraoral(260, 200, bits=12)
    if kind == "dicom":
        data = synthetic.dicom_bytes(values, bits_stored=12, window=(2000, 3000))
    else:
        data = synthetic.tiff_bytes(values)
    image = await upload_one(api_client, data)
    assert image["bits_stored"] == (12 if kind == "dicom" else 16)
    returned = await (await api_client.get(f"/api/v1/images/{image['id']}/file")).read()
    assert returned == data
    if kind == "dicom":
        assert np.array_equal(pydicom.dcmread(io.BytesIO(returned)).pixel_array, values)
    else:
        with Image.open(io.BytesIO(returned)) as img:
            assert np.array_equal(np.asarray(img).astype(np.uint16), values)


async def test_colour_photo_stays_colour_and_grey_in_rgb_is_grey(api_client: Any) -> None:
    photo = await upload_one(api_client, synthetic.png_bytes(synthetic.photo(400, 300)), "photo.png")
    assert (photo["color"], photo["category"], photo["bits_stored"]) == (True, "photo", 8)
    thumb = jpeg_pixels(await (await api_client.get(f"/api/v1/images/{photo['id']}/thumbnail")).read())
    spread = thumb.max(axis=2) - thumb.min(axis=2)
    assert spread.mean() > 50  # still colour after rendering

    grey = np.repeat(synthetic.intraoral(200, 150, bits=8).astype(np.uint8)[..., None], 3, axis=2)
    xray = await upload_one(api_client, synthetic.png_bytes(grey), "xray-rgb.png")
    assert (xray["color"], xray["category"]) == (False, "intraoral-xray")


def png_with(img: Image.Image, **save: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG", **save)
    return out.getvalue()


@pytest.mark.parametrize(
    ("data", "color", "grey"),
    [
        (png_with(Image.new("P", (64, 64)), transparency=0), False, 0),  # palette index 0 transparent
        (png_with(Image.new("RGB", (64, 64), (50, 50, 50)), transparency=(50, 50, 50)), False, 50),
        (png_with(Image.new("L", (64, 64), 90), transparency=90), False, 90),
        (png_with(Image.new("RGB", (64, 64), (30, 120, 200)), transparency=(30, 120, 200)), True, None),
    ],
    ids=["palette", "grey-rgb", "grey", "colour-rgb"],
)
async def test_png_with_transparency_is_stored_and_rendered(
    api_client: Any, data: bytes, color: bool, grey: int | None
) -> None:
    """A PNG's tRNS chunk is alpha, ignored like any alpha; it used to survive as an RGB triple on the
    grey channel of a grey image, and rendering the thumbnail failed (500 on upload)."""
    image = await upload_one(api_client, data, "transparent.png")
    assert (image["width"], image["height"], image["color"]) == (64, 64, color)
    original = await api_client.get(f"/api/v1/images/{image['id']}/file")
    assert await original.read() == data
    for size in (64, 32):  # rendered at ingest, and from the stored file on request
        thumb = await api_client.get(f"/api/v1/images/{image['id']}/thumbnail?size={size}")
        assert thumb.status == 200, await thumb.text()
        pixels = jpeg_pixels(await thumb.read())
        assert pixels.shape[:2] == (size, size)
        if grey is not None:
            assert abs(int(pixels[2, size // 2, 0]) - grey) <= 3  # top row: clear of the watermark


async def test_a_camera_jpeg_with_exif_orientation_6_is_shown_upright(api_client: Any) -> None:
    """A phone stores a portrait photo as landscape sensor rows with Orientation 6 ("turn 90 degrees
    clockwise"); its thumbnail was landscape, the photo lying on its side."""
    from PIL import ExifTags

    stored = np.full((200, 400, 3), 40, np.uint8)
    stored[:60, :60] = (250, 250, 250)  # a bright block at the sensor's top-left ...
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    out = io.BytesIO()
    Image.fromarray(stored).save(out, "JPEG", quality=95, exif=exif.tobytes())
    data = out.getvalue()
    image = await upload_one(api_client, data, "IMG_0001.jpg")
    assert (image["width"], image["height"], image["rotation"]) == (200, 400, 0)  # upright size
    assert await (await api_client.get(f"/api/v1/images/{image['id']}/file")).read() == data  # EXIF kept

    thumb = jpeg_pixels(await (await api_client.get(f"/api/v1/images/{image['id']}/thumbnail")).read())
    assert thumb.shape[:2] == (256, 128)  # portrait
    assert thumb[10, 118].min() > 200 and thumb[10, 10].max() < 80  # ... is the upright top-right
    preview = jpeg_pixels(await (await api_client.get(f"/api/v1/images/{image['id']}/preview")).read())
    assert preview.shape[:2] == (400, 200)

    # the clinician's rotation turns the upright photo: 270 clockwise brings the block back to top-left
    await api_client.patch(f"/api/v1/images/{image['id']}", json={"rotation": 270})
    turned = jpeg_pixels(await (await api_client.get(f"/api/v1/images/{image['id']}/thumbnail")).read())
    assert turned.shape[:2] == (128, 256)
    assert turned[10, 10].min() > 200 and turned[10, 245].max() < 80


async def test_upload_category_and_orientation_fields_win_over_the_guess(api_client: Any) -> None:
    data = synthetic.png_bytes(synthetic.intraoral(200, 150))
    image = await upload_one(api_client, data, category="cephalometric", rotation="90", mirrored="yes")
    assert (image["category"], image["rotation"], image["mirrored"]) == ("cephalometric", 90, True)


# ------------------------------------------------------------------------------------------------
# Bad input: nothing stored, nothing left behind


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("cut.png", synthetic.png_bytes(synthetic.intraoral(120, 100))[:-300], "truncated PNG"),
        ("scan.gif", b"GIF89a" + b"\x00" * 64, "unsupported image format GIF"),
        ("cut.dcm", synthetic.dicom_bytes(synthetic.intraoral(120, 100), bits_stored=12)[:-999], "DICOM"),
        ("notes.txt", b"just some text", "not an image"),
    ],
)
async def test_bad_upload_is_refused_with_a_reason_and_leaves_nothing(
    api_client: Any, runtime: Runtime, name: str, data: bytes, reason: str
) -> None:
    patient_id = await new_patient(api_client)
    good = synthetic.png_bytes(synthetic.intraoral(100, 80))
    response = await upload(api_client, patient_id, ("good.png", good), (name, data))
    assert response.status == 422
    problem = await response.json()
    assert problem["type"].endswith(":bad-image")
    assert name in problem["detail"] and reason in problem["detail"]
    assert stored_files(runtime.settings) == []  # the good file of the same request went again
    listing = await (await api_client.get(f"/api/v1/patients/{patient_id}/images")).json()
    assert listing["items"] == []


async def test_a_failed_store_insert_removes_the_files_it_wrote(runtime: Runtime, api_client: Any) -> None:
    data = synthetic.png_bytes(synthetic.intraoral(100, 80))
    with pytest.raises(Refused):  # no such patient: the store refuses after the file was ingested
        await runtime.imaging.ingest_all(runtime.service, ORIGIN, 999_999, [("a.png", data)])
    assert stored_files(runtime.settings) == []


async def test_ingested_files_are_flushed_before_their_rows_and_removed_when_that_fails(
    runtime: Runtime, api_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ingest_all` adds no row for a file whose name a power cut could still lose: the folders holding the
    names are flushed first; when that fails, nothing is added and the files go again."""
    import errno

    patient_id = await new_patient(api_client)
    data = synthetic.png_bytes(synthetic.intraoral(100, 80))
    synced: list[Path] = []
    real_add = runtime.service.add_images

    def sync_folder(folder: Path) -> None:
        synced.append(folder)

    async def add_images(origin: Origin, patient: int, new: list[Any]) -> list[Any]:
        path = runtime.files.path_for(new[0].sha256, new[0].file_ext)
        assert {path.parent, path.parent.parent, runtime.files.root} <= set(synced)
        return await real_add(origin, patient, new)

    monkeypatch.setattr(runtime.files, "sync_folder", sync_folder)
    monkeypatch.setattr(runtime.service, "add_images", add_images)
    [view] = await runtime.imaging.ingest_all(runtime.service, ORIGIN, patient_id, [("a.png", data)])
    assert view.patient_id == patient_id

    def failing(folder: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(folder))

    monkeypatch.setattr(runtime.files, "sync_folder", failing)
    before = stored_files(runtime.settings)
    other = synthetic.png_bytes(synthetic.intraoral(90, 80))
    with pytest.raises(OSError):
        await runtime.imaging.ingest_all(runtime.service, ORIGIN, patient_id, [("b.png", other)])
    assert stored_files(runtime.settings) == before


async def test_a_failed_insert_keeps_files_that_stored_images_use(runtime: Runtime, api_client: Any) -> None:
    data = synthetic.png_bytes(synthetic.intraoral(100, 80))
    kept = await upload_one(api_client, data)
    before = stored_files(runtime.settings)
    with pytest.raises(Refused):
        await runtime.imaging.ingest_all(runtime.service, ORIGIN, 999_999, [("a.png", data)])
    assert stored_files(runtime.settings) == before
    assert (await api_client.get(f"/api/v1/images/{kept['id']}/file")).status == 200


async def test_a_failed_request_keeps_a_file_another_request_is_about_to_reference(
    runtime: Runtime, api_client: Any
) -> None:
    """Two uploads of the same bytes at once, one failing: the failing one must not remove the file the
    other has written but not committed yet (the other would answer 201 for an image with no file)."""
    data = synthetic.png_bytes(synthetic.intraoral(100, 80))
    patient_id = await new_patient(api_client)
    in_flight = await runtime.imaging.ingest(data)  # request A: file written and claimed, rows not yet
    with pytest.raises(ImagingError):  # request B: the same bytes and a bad file
        await runtime.imaging.ingest_all(
            runtime.service, ORIGIN, patient_id, [("same.png", data), ("bad.png", b"\x89PNG\r\n\x1a\nbad")]
        )
    assert runtime.files.path_for(in_flight.sha256, in_flight.file_ext).read_bytes() == data
    [view] = await runtime.service.add_images(ORIGIN, patient_id, [in_flight])  # request A commits
    runtime.imaging.release([in_flight.sha256])
    response = await api_client.get(f"/api/v1/images/{view.id}/file")
    assert response.status == 200 and await response.read() == data


async def test_an_import_given_up_keeps_a_file_another_request_has_claimed(
    make_settings: Any, tmp_path: Path
) -> None:
    """The same rule for DICOM imports: a batch given up (here: its patient may not be created) removes
    its files unless another request of the daemon holds a claim on the same bytes."""
    from bridge.dicom.importer import Importer
    from tests.support.dicomfiles import intraoral_object, write

    rt = Runtime.build(make_settings(pms={"allow_patient_creation": "no"}))
    try:
        path = write(intraoral_object(patient_id="NOBODY"), tmp_path / "a.dcm")
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        await rt.imaging.claim([sha256])  # another request placed these bytes and is about to add them
        report = await Importer(rt, ORIGIN).run([(str(path), "a.dcm")])
        assert report.imported == [] and "patient creation is disabled" in report.errors[0].reason
        assert [p.name.split(".")[0] for p in stored_files(rt.settings)] == [sha256]
        rt.imaging.release([sha256])
        report = await Importer(rt, ORIGIN).run([(str(path), "a.dcm")])  # nobody holds it now
        assert report.imported == [] and stored_files(rt.settings) == []
    finally:
        rt.close()


# ------------------------------------------------------------------------------------------------
# Thumbnails and previews


async def test_thumbnail_is_rendered_at_ingest_watermarked_and_cached(
    api_client: Any, runtime: Runtime
) -> None:
    image = await upload_one(api_client, synthetic.dicom_bytes(synthetic.panoramic(900, 450), bits_stored=12))
    view = await runtime.service.get_image(ORIGIN, image["id"])
    assert view is not None
    cached = runtime.imaging.thumbnail_path(view, 256)
    assert cached.exists()  # before anybody asked for it

    response = await api_client.get(f"/api/v1/images/{image['id']}/thumbnail")
    assert response.status == 200 and response.content_type == "image/jpeg"
    body = await response.read()
    assert body == cached.read_bytes()
    assert jpeg_pixels(body).shape[:2] == (128, 256)
    assert response.headers["Cache-Control"] == "private, no-cache"

    small = await api_client.get(f"/api/v1/images/{image['id']}/thumbnail?size=64")
    assert jpeg_pixels(await small.read()).shape[:2] == (32, 64)
    assert (await api_client.get(f"/api/v1/images/{image['id']}/thumbnail?size=9999")).status == 400


async def test_etag_answers_304_until_the_orientation_changes(api_client: Any) -> None:
    image = await upload_one(api_client, synthetic.png_bytes(synthetic.intraoral(300, 200)))
    url = f"/api/v1/images/{image['id']}/thumbnail"
    first = await api_client.get(url)
    etag = first.headers["ETag"]
    again = await api_client.get(url, headers={"If-None-Match": etag})
    assert again.status == 304 and again.headers["ETag"] == etag and await again.read() == b""
    assert (await api_client.get(url, headers={"If-None-Match": f'"other", W/{etag}'})).status == 304

    await api_client.patch(f"/api/v1/images/{image['id']}", json={"rotation": 180})
    changed = await api_client.get(url, headers={"If-None-Match": etag})
    assert changed.status == 200 and changed.headers["ETag"] != etag


async def test_change_of_orientation_renders_anew_and_is_audited(api_client: Any, runtime: Runtime) -> None:
    pattern = synthetic.quadrants(300, 200)
    image = await upload_one(api_client, synthetic.png_bytes(pattern))
    url = f"/api/v1/images/{image['id']}/thumbnail"
    before = await (await api_client.get(url)).read()

    response = await api_client.patch(
        f"/api/v1/images/{image['id']}", json={"rotation": 90, "mirrored": True}
    )
    assert response.status == 200
    changed = await response.json()
    assert (changed["rotation"], changed["mirrored"]) == (90, True)

    after = await (await api_client.get(url)).read()
    assert after != before
    assert jpeg_pixels(before).shape[:2] == (171, 256) and jpeg_pixels(after).shape[:2] == (256, 171)
    audit = await (await api_client.get(f"/api/v1/audit?patient_id={image['patient_id']}")).json()
    updates = [e for e in audit["items"] if e["action"] == "image.update"]
    assert len(updates) == 1 and updates[0]["image_id"] == image["id"]
    assert "rotation 0 -> 90" in updates[0]["detail"] and "mirrored False -> True" in updates[0]["detail"]


QUADRANT_COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
# Which colour ends up in each corner (top-left, top-right, bottom-right, bottom-left): mirror, then
# rotate clockwise. The pattern is red, green, blue, white clockwise from the top left.
CORNERS = {
    (0, False): ("red", "green", "blue", "white"),
    (90, False): ("white", "red", "green", "blue"),
    (180, False): ("blue", "white", "red", "green"),
    (270, False): ("green", "blue", "white", "red"),
    (0, True): ("green", "red", "white", "blue"),
    (90, True): ("blue", "green", "red", "white"),
    (180, True): ("white", "blue", "green", "red"),
    (270, True): ("red", "white", "blue", "green"),
}


async def test_all_eight_orientations_through_the_api(api_client: Any) -> None:
    image = await upload_one(api_client, synthetic.png_bytes(synthetic.quadrants(300, 200)))
    seen = set()
    for (rotation, mirrored), corners in CORNERS.items():
        response = await api_client.patch(
            f"/api/v1/images/{image['id']}", json={"rotation": rotation, "mirrored": mirrored}
        )
        assert response.status == 200
        thumb = jpeg_pixels(await (await api_client.get(f"/api/v1/images/{image['id']}/thumbnail")).read())
        height, width = thumb.shape[:2]
        assert (width > height) == (rotation in (0, 180))
        points = [(height // 4, width // 4), (height // 4, 3 * width // 4)]
        points += [(3 * height // 4, 3 * width // 4), (3 * height // 4, width // 4)]
        for (y, x), name in zip(points, corners, strict=True):
            assert np.abs(thumb[y, x] - QUADRANT_COLOURS[name]).max() < 40, (rotation, mirrored, name)
        seen.add(corners)
    assert len(seen) == 8


async def test_preview_is_larger_watermarked_and_cached(api_client: Any, runtime: Runtime) -> None:
    image = await upload_one(api_client, synthetic.png_bytes(synthetic.photo(2000, 1500)))
    response = await api_client.get(f"/api/v1/images/{image['id']}/preview")
    assert response.status == 200 and "ETag" in response.headers
    preview = jpeg_pixels(await response.read())
    assert preview.shape[:2] == (768, 1024)
    view = await runtime.service.get_image(ORIGIN, image["id"])
    assert view is not None
    assert (await runtime.imaging.preview(view)).exists()


async def test_watermark_on_the_thumbnail_against_an_unwatermarked_render(
    api_client: Any, runtime: Runtime
) -> None:
    from bridge.imaging.analyze import decode
    from bridge.imaging.render import RenderRequest, render_decoded, watermark_box

    data = synthetic.png_bytes(synthetic.intraoral(512, 384, bits=12))
    image = await upload_one(api_client, data)
    thumb = jpeg_pixels(await (await api_client.get(f"/api/v1/images/{image['id']}/thumbnail")).read())
    (unmarked,) = render_decoded(
        decode(data), [RenderRequest(256, quality=runtime.settings.thumbnails.quality)]
    )
    plain = jpeg_pixels(unmarked)
    assert plain.shape == thumb.shape == (192, 256, 3)
    left, top, right, bottom = watermark_box(runtime.imaging.watermark, 256, 192)
    inside = np.abs(thumb[top:bottom, left:right] - plain[top:bottom, left:right]).mean()
    outside = np.abs(thumb[: top - 8] - plain[: top - 8]).max()  # JPEG blocks next to the stamp may differ
    assert inside > 20 and outside <= 2


async def test_a_new_watermark_renders_anew(runtime: Runtime, make_settings: Any, api_client: Any) -> None:
    image = await upload_one(api_client, synthetic.png_bytes(synthetic.intraoral(300, 200)))
    view = await runtime.service.get_image(ORIGIN, image["id"])
    assert view is not None
    other_settings = make_settings(thumbnails={"watermark": "COPY ONLY", "watermark_position": "top-right"})
    other = Imaging(runtime.files, other_settings.thumbnails, runtime.imaging.cache_dir, workers=1)
    try:
        assert other.watermark_version != runtime.imaging.watermark_version
        assert not other.thumbnail_path(view, 256).exists()
        path = await other.thumbnail(view)
        assert path.exists() and path != await runtime.imaging.thumbnail(view)
        assert path.read_bytes() != runtime.imaging.thumbnail_path(view, 256).read_bytes()
    finally:
        other.close()


async def test_export_bytes_for_pms_exports(api_client: Any, runtime: Runtime) -> None:
    image = await upload_one(api_client, synthetic.png_bytes(synthetic.quadrants(300, 200)), rotation="270")
    view = await runtime.service.get_image(ORIGIN, image["id"])
    assert view is not None
    for fmt, pil in (("JPG", "JPEG"), ("PNG", "PNG"), ("TIF", "TIFF")):
        data = await runtime.imaging.export_bytes(view, fmt, watermark=True)
        with Image.open(io.BytesIO(data)) as img:
            assert (img.format, img.size) == (pil, (200, 300))
    with pytest.raises(ValueError, match="export format"):
        await runtime.imaging.export_bytes(view, "GIF", watermark=False)


# ------------------------------------------------------------------------------------------------
# PATCH validation and the OpenAPI document


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"rotation": 45}, 422, "rotation must be"),
        ({"rotation": "90"}, 422, "rotation must be"),
        ({"mirrored": "yes"}, 422, "mirrored must be"),
        ({"tooth_numbers": [11, 99]}, 422, "99 is not an FDI tooth number"),
        (
            {"tooth_numbers": [11] * 200_000},
            422,
            "at most 52 tooth numbers (each FDI tooth once), got 200000",
        ),
        ({"tooth_numbers": [11, 21, 11]}, 422, "tooth 11 is listed twice"),
        ({"tooth_numbers": ["١١"]}, 422, "is not a number"),
        ({"tooth_numbers": [True]}, 422, "is not a number"),
        ({"tooth_numbers": [11.0]}, 422, "is not a number"),
        ({"category": "selfie"}, 422, "category must be one of"),
        ({"width": 10}, 422, "cannot change width"),
        ({}, 422, "nothing to change"),
        ([], 400, "JSON object"),
    ],
)
async def test_patch_refuses_bad_changes(api_client: Any, body: Any, status: int, detail: str) -> None:
    image = await upload_one(api_client, synthetic.png_bytes(synthetic.intraoral(60, 40)))
    response = await api_client.patch(f"/api/v1/images/{image['id']}", json=body)
    assert response.status == status
    assert detail in (await response.json())["detail"]


async def test_patch_teeth_and_category_and_unknown_image(api_client: Any) -> None:
    image = await upload_one(api_client, synthetic.png_bytes(synthetic.intraoral(60, 40)))
    response = await api_client.patch(
        f"/api/v1/images/{image['id']}", json={"tooth_numbers": [11, 21], "category": "intraoral-xray"}
    )
    assert (await response.json())["tooth_numbers"] == [11, 21]
    assert (await api_client.get(f"/api/v1/images/{image['id']}")).status == 200
    assert (await api_client.patch("/api/v1/images/987654", json={"rotation": 90})).status == 404
    assert (await api_client.get("/api/v1/images/987654/thumbnail")).status == 404


def test_openapi_documents_the_imaging_routes() -> None:
    paths = document()["paths"]
    assert "patch" in paths["/api/v1/images/{id}"]
    assert {"200", "304"} <= set(paths["/api/v1/images/{id}/thumbnail"]["get"]["responses"])
    assert {"200", "304"} <= set(paths["/api/v1/images/{id}/preview"]["get"]["responses"])


def test_a_bad_watermark_logo_stops_start_up_with_the_reason(make_settings: Any, tmp_path: Path) -> None:
    from bridge.config import ConfigError
    from bridge.store.files import FileStore

    (tmp_path / "logo.txt").write_text("not a picture", encoding="utf-8")
    for logo, reason in ((tmp_path / "missing.png", "cannot be read"), (tmp_path / "logo.txt", "not a PNG")):
        settings = make_settings(thumbnails={"watermark_logo": str(logo)})
        with pytest.raises(ConfigError, match=reason):
            Imaging(FileStore(settings.store.images), settings.thumbnails, tmp_path / "cache")


async def test_closing_with_a_timeout_ends_a_worker_that_is_still_busy(
    settings: Settings, tmp_path: Path
) -> None:
    # A worker stuck in a task (a decoder on a hostile file, a FIFO before files were opened without
    # blocking) kept a daemon that was told to stop from ever stopping: the pool waited for it for good.
    import asyncio
    import time

    from bridge.store.files import FileStore

    imaging = Imaging(FileStore(settings.store.images), settings.thumbnails, tmp_path / "cache", workers=1)
    [pid] = {await imaging.run_in_pool(os.getpid)}
    stuck = asyncio.ensure_future(imaging.run_in_pool(time.sleep, 3600))
    await asyncio.sleep(0.5)  # the worker has taken the task
    started = time.monotonic()
    await asyncio.to_thread(imaging.close, 1.0)
    assert time.monotonic() - started < 20
    assert not alive(pid)
    stuck.cancel()


async def test_a_worker_that_ends_abruptly_leaves_a_pool_that_still_works(
    settings: Settings, tmp_path: Path
) -> None:
    # A worker that ended abruptly (the out-of-memory killer, a decoder crashing on a hostile file) broke
    # Python's process pool for good: every later thumbnail and import failed until the daemon restarted.
    from concurrent.futures.process import BrokenProcessPool

    from bridge.store.files import FileStore

    imaging = Imaging(FileStore(settings.store.images), settings.thumbnails, tmp_path / "cache", workers=1)
    try:
        first = await imaging.run_in_pool(os.getpid)
        with pytest.raises(BrokenProcessPool):
            await imaging.run_in_pool(os._exit, 1)  # the worker ends, as a killed one does
        again = await imaging.run_in_pool(os.getpid)
        assert again != first and alive(again) and not alive(first)
        assert await imaging.run_in_pool(os.getpid) == again  # one new pool, kept
    finally:
        imaging.close()
