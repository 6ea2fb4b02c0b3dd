"""Thumbnail benchmark: cold renders, throughput on the pool, cached HTTP latency, Orthanc for comparison.

Run from the project root: `.venv/bin/python bench/thumbnails.py` (a minute or two on 2 cores). Every
figure is printed beside its baseline measured in the same run, on the same machine:

1. cold render per image (256 px, watermark, rotation 90 + mirror) against plain Pillow on the same
   decoded pixels (`Image.thumbnail` + JPEG, no watermark, no orientation; 16-bit pixels go through
   Pillow's own I mode, the least it needs to make a JPEG), in CPU time;
2. cold thumbnails per second through `Imaging` (process pool of 2), decode of the stored uncompressed
   file included: the rate measured now, and the rate two idle cores give, from the CPU time used;
3. cached `GET /api/v1/images/{id}/thumbnail` p50/p99 over loopback HTTP against a real `pms-bridge
   serve`, and a bare aiohttp handler returning the same bytes (each server its own process; requests
   alternate between the two so both see the same load), plus server CPU per request;
4. when Orthanc is installed, its `/instances/{id}/rendered?width=256` on the same DICOM file.

Targets (issue 3): cold <= 1.3x plain Pillow; >= 40 cold thumbnails/s; cached p99 <= 3 ms and <= 2x the
bare handler; faster than Orthanc. Nothing here is asserted: a benchmark informs, tests decide. Wall-clock
figures move with whatever else runs on the machine; the load average is printed with them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.imaging import render  # noqa: E402 - after the path to the project
from bridge.imaging.analyze import Decoded, decode  # noqa: E402
from tests.support import synthetic  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

RUNS = 15
HTTP_REQUESTS = 2000
ORTHANC_REQUESTS = 30
TOKEN = "bench-token"
PHOTO = "photo 4000x3000 colour (JPEG; TIFF for throughput)"

BARE_SERVER = """
import sys
from aiohttp import web
body = open(sys.argv[1], "rb").read()
async def handler(request):
    return web.Response(body=body, content_type="image/jpeg")
app = web.Application()
app.router.add_get("/thumb", handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None)
"""


def best_and_median(fn: Callable[[], object], runs: int = RUNS) -> tuple[float, float]:
    """(min, median) CPU milliseconds of `runs` calls, after one warm-up call.

    CPU time (time.process_time) rather than wall time: every step here is single-threaded, and CPU time
    does not count the moments another process had the core, so the figures hold on a busy machine.
    """
    fn()
    times = []
    for _ in range(runs):
        started = time.process_time()
        fn()
        times.append((time.process_time() - started) * 1000)
    return min(times), statistics.median(times)


def sources() -> dict[str, tuple[bytes, bytes]]:
    """name -> (source file as a PMS would send it, the same pixels as an uncompressed file)."""
    pano = synthetic.panoramic(3000, 1500, bits=12)
    intra = synthetic.intraoral(1300, 1000, bits=12)
    photo = synthetic.photo(4000, 3000)
    jpeg = io.BytesIO()
    Image.fromarray(photo).save(jpeg, "JPEG", quality=92)
    return {
        "panoramic 3000x1500 12-bit (DICOM)": (
            synthetic.dicom_bytes(pano, bits_stored=12, modality="PX", window=(2048, 3500)),
            synthetic.dicom_bytes(pano, bits_stored=12, modality="PX", window=(2048, 3500)),
        ),
        "intraoral 1300x1000 12-bit (DICOM, no window)": (
            synthetic.dicom_bytes(intra, bits_stored=12),
            synthetic.dicom_bytes(intra, bits_stored=12),
        ),
        PHOTO: (jpeg.getvalue(), synthetic.tiff_bytes(photo)),
    }


# --------------------------------------------------------------------------------------------------
# 1. Cold render against plain Pillow


def plain_pillow(decoded: Decoded) -> bytes:
    """The baseline: Pillow's thumbnail and JPEG on the decoded pixels, nothing else.

    Deep pixels become Pillow's I mode first (it cannot resample I;16). An 8-bit image gets the resize
    `Image.thumbnail` performs (BICUBIC, reducing_gap 2.0) without the copy its in-place API would need.
    """
    if decoded.pixels is not None:
        img = Image.fromarray(decoded.pixels).convert("I")
        img.thumbnail((256, 256))
        img = img.convert("L")
    else:
        assert decoded.image is not None
        img = decoded.image.resize(
            render.fit(decoded.width, decoded.height, 256), Image.Resampling.BICUBIC, reducing_gap=2.0
        )
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


def ours(decoded: Decoded, mark: render.Watermark) -> bytes:
    """Our cold render: lookup-table window, orientation, watermark.

    The lookup table is built anew each time (a new image has a new window); the watermark patch stays
    cached, as it does in a pool worker that renders many thumbnails of one size.
    """
    render.window_lut.cache_clear()
    request = render.RenderRequest(256, 90, True, mark, "JPEG", 85)
    return render.render_decoded(decoded, [request])[0]


def decode_and_render(source: bytes, mark: render.Watermark) -> bytes:
    """`ours` from the file's bytes: the decoding included."""
    return ours(decode(source), mark)


def bench_cold(files: dict[str, tuple[bytes, bytes]]) -> None:
    mark = render.Watermark("NOT FOR DIAGNOSIS")
    print("1. Cold render, 256 px (best / median of 15, CPU ms; ratio of the bests / of the medians):")
    print(f"   {'image':<52} {'plain Pillow':>14} {'ours':>14} {'ratio':>12} {'decode+ours':>12}")
    for name, (source, _uncompressed) in files.items():
        decoded = decode(source)
        base = best_and_median(functools.partial(plain_pillow, decoded))
        mine = best_and_median(functools.partial(ours, decoded, mark))
        whole = best_and_median(functools.partial(decode_and_render, source, mark), runs=5)
        print(
            f"   {name:<52} {base[0]:6.1f} / {base[1]:5.1f} {mine[0]:6.1f} / {mine[1]:5.1f}"
            f" {mine[0] / base[0]:5.2f}/{mine[1] / base[1]:5.2f}x {whole[1]:9.1f}"
        )


# --------------------------------------------------------------------------------------------------
# 2. Cold thumbnails per second through the pool


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, threads included (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _pool_cpu(imaging: Any) -> float:
    """CPU seconds the pool's worker processes have used so far."""
    return sum(process_cpu(pid) for pid in list(getattr(imaging._pool, "_processes", {}) or {}))


async def _pool_run(imaging: Any, views: list[Any], count: int, sizes: Any) -> tuple[float, float]:
    """(wall seconds, CPU seconds of pool and event loop) of `count` cold renders per view."""
    cpu_before, main_before = _pool_cpu(imaging), time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(imaging.rendered(view, next(sizes)) for _ in range(count) for view in views))
    wall = time.perf_counter() - started
    return wall, _pool_cpu(imaging) - cpu_before + time.process_time() - main_before


async def bench_throughput(files: dict[str, tuple[bytes, bytes]], workdir: Path) -> None:
    from bridge.config import ThumbnailSettings
    from bridge.imaging.pipeline import Imaging
    from bridge.model import Category, ImageView
    from bridge.store.files import FileStore

    (workdir / "images").mkdir(
        parents=True
    )  # as `pms-bridge init` makes it: the store never creates its root
    store = FileStore(workdir / "images")
    defaults = {
        f.name: f.metadata["parser"](f.metadata["default"], workdir)
        for f in dataclasses.fields(ThumbnailSettings)
    }
    settings = ThumbnailSettings(**defaults)
    views = []
    photo_jpeg = files[PHOTO][0]
    stored = [uncompressed for _source, uncompressed in files.values()] + [photo_jpeg]
    for index, data in enumerate(stored):
        facts = decode(data)
        sha, _ = store.put(data, facts.file_ext)
        views.append(
            ImageView(
                id=index,
                patient_id=1,
                study_uid="",
                series_uid="",
                sop_instance_uid="",
                captured_at=None,
                category=Category.PHOTO,
                tooth_numbers=(),
                rotation=90,
                mirrored=True,
                width=facts.width,
                height=facts.height,
                bits_stored=facts.bits_stored,
                color=facts.color,
                sha256=sha,
                media_type=facts.media_type,
                file_ext=facts.file_ext,
            )
        )
    print(
        "2. Cold thumbnails, process pool of 2, decode from the stored uncompressed file included:"
        f" measured rate now (load average {os.getloadavg()[0]:.1f}), and the rate 2 idle cores give"
        " from the CPU time used (pool + event loop)"
    )
    sizes = iter(range(120, 1_000_000))
    imaging = Imaging(store, settings, workdir / "images" / "thumbnails", workers=2)
    try:
        # Start both pool processes (each imports numpy, Pillow and pydicom once) before timing.
        await asyncio.gather(*(imaging.rendered(view, next(sizes)) for view in views * 2))
        runs = [(name, [view]) for name, view in zip(files, views, strict=False)]
        runs.append(("mixed (the three above)", views[:3]))
        runs.append(("photo 4000x3000 as stored JPEG (reduced-scale decode)", views[3:]))
        for name, chosen in runs:
            count = 40 // len(chosen)
            wall, cpu = await _pool_run(imaging, chosen, count, sizes)
            done = count * len(chosen)
            print(
                f"   {name:<52} {done / wall:6.1f}/s measured   {cpu / done * 1000:6.1f} ms CPU each"
                f" -> {2 * done / cpu:6.1f}/s on 2 idle cores"
            )
    finally:
        imaging.close()


# --------------------------------------------------------------------------------------------------
# 3. Cached thumbnails over HTTP


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def request_json(method: str, url: str, body: bytes, content_type: str) -> Any:
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("Authorization", f"Bearer {TOKEN}")
    req.add_header("Content-Type", content_type)
    with urllib.request.urlopen(req, timeout=120) as response:
        return json.loads(response.read())


def upload(base: str, data: bytes) -> int:
    patient = request_json(
        "POST",
        f"{base}/api/v1/patients",
        json.dumps({"pms_system": "BENCH", "pms_id": "1", "last_name": "Bench"}).encode(),
        "application/json",
    )
    boundary = "benchboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.dcm"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    added = request_json(
        "POST",
        f"{base}/api/v1/patients/{patient['id']}/images",
        body,
        f"multipart/form-data; boundary={boundary}",
    )
    return int(added["items"][0]["id"])


async def latencies(ours_url: str, bare_url: str, count: int) -> tuple[list[float], list[float]]:
    """Per-request milliseconds for both servers, alternating request by request.

    Alternating puts both under the same load from whatever else runs on the machine, so their ratio
    stays meaningful when absolute figures wander.
    """
    import gc

    import aiohttp

    auth = {"Authorization": f"Bearer {TOKEN}"}
    times: tuple[list[float], list[float]] = ([], [])
    async with aiohttp.ClientSession() as session:
        for _ in range(200):  # warm-up: connections, caches
            for url in (ours_url, bare_url):
                async with session.get(url, headers=auth) as response:
                    await response.read()
        gc.disable()  # the client's own collections would land on either side at random
        try:
            for _ in range(count):
                for url, bucket in ((ours_url, times[0]), (bare_url, times[1])):
                    started = time.perf_counter()
                    async with session.get(url, headers=auth) as response:
                        await response.read()
                        assert response.status == 200
                    bucket.append((time.perf_counter() - started) * 1000)
        finally:
            gc.enable()
    return times


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_http(dicom: bytes, workdir: Path) -> None:
    home = workdir / "daemon"
    home.mkdir()
    port = free_port()
    config = home / "pms-bridge.ini"
    config.write_text(
        f"[store]\nurl = sqlite:///{home}/bridge.db\nimages = {home}/images\n"
        f"[api]\nport = {port}\ntoken = {TOKEN}\n[opp_web]\nenabled = no\nport = {free_port()}\n"
        "[vdds]\nenabled = no\n",
        encoding="utf-8",
    )
    script = Path(sys.executable).with_name("pms-bridge")
    daemon = subprocess.Popen(
        [str(script), "serve", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    bare_port = free_port()
    bare = None
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz")
        image_id = upload(base, dicom)
        thumb_url = f"{base}/api/v1/images/{image_id}/thumbnail"
        req = urllib.request.Request(thumb_url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req) as response:
            body = response.read()
        (workdir / "thumb.jpg").write_bytes(body)
        bare = subprocess.Popen(
            [sys.executable, "-c", BARE_SERVER, str(workdir / "thumb.jpg"), str(bare_port)]
        )
        wait_http(f"http://127.0.0.1:{bare_port}/thumb")
        cpu_before = process_cpu(daemon.pid), process_cpu(bare.pid)
        ours_ms, bare_ms = asyncio.run(
            latencies(thumb_url, f"http://127.0.0.1:{bare_port}/thumb", HTTP_REQUESTS)
        )
        # Warm-up requests included: 200 + HTTP_REQUESTS to each server.
        per_request = [
            (process_cpu(pid) - before) / (HTTP_REQUESTS + 200) * 1e6
            for pid, before in zip((daemon.pid, bare.pid), cpu_before, strict=True)
        ]
    finally:
        for proc in (daemon, bare):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    print(
        f"3. Cached thumbnail over loopback HTTP ({HTTP_REQUESTS} sequential requests to each, alternating,"
        f" keep-alive, ms; load average {os.getloadavg()[0]:.1f}):"
    )
    for name, values in (
        ("pms-bridge GET /thumbnail (auth, audit, metrics)", ours_ms),
        ("bare aiohttp handler, same bytes", bare_ms),
    ):
        print(f"   {name:<52} p50 {percentile(values, 50):5.2f}  p99 {percentile(values, 99):5.2f}")
    print(
        f"   ratio p50 {percentile(ours_ms, 50) / percentile(bare_ms, 50):.2f}x,"
        f" p99 {percentile(ours_ms, 99) / percentile(bare_ms, 99):.2f}x; thumbnail {len(body)} bytes"
    )
    print(
        f"   server CPU per request: pms-bridge {per_request[0]:.0f} us, bare handler {per_request[1]:.0f} us"
        f" ({per_request[0] / per_request[1]:.2f}x; from 10 ms clock ticks, so roughly)"
    )


# --------------------------------------------------------------------------------------------------
# 4. Orthanc


def bench_orthanc(dicom: bytes, workdir: Path) -> None:
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
    if binary is None:
        print("4. Orthanc: not installed, skipped")
        return
    http_port = free_port()
    data_dir = workdir / "orthanc"
    data_dir.mkdir()
    config = {
        "Name": "bench",
        "HttpPort": http_port,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageDirectory": str(data_dir),
        "IndexDirectory": str(data_dir),
        "Plugins": [],
    }
    (workdir / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    proc = subprocess.Popen(
        [binary, str(workdir / "orthanc.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        base = f"http://127.0.0.1:{http_port}"
        wait_http(f"{base}/system")
        req = urllib.request.Request(f"{base}/instances", data=dicom, method="POST")
        with urllib.request.urlopen(req, timeout=60) as response:
            instance = json.loads(response.read())["ID"]
        url = f"{base}/instances/{instance}/rendered?width=256"
        with urllib.request.urlopen(url) as response:
            response.read()
        times = []
        for _ in range(ORTHANC_REQUESTS):
            started = time.perf_counter()
            with urllib.request.urlopen(url) as response:
                response.read()
            times.append((time.perf_counter() - started) * 1000)
        version = json.loads(urllib.request.urlopen(f"{base}/system").read())["Version"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    print(
        f"4. Orthanc {version} /instances/{{id}}/rendered?width=256 on the panoramic DICOM"
        f" ({ORTHANC_REQUESTS} requests):"
    )
    print(
        f"   p50 {percentile(times, 50):6.1f} ms  p99 {percentile(times, 99):6.1f} ms"
        " (it renders on every request)"
    )


def main() -> None:
    files = sources()
    print(f"pms-bridge thumbnail benchmark; {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    bench_cold(files)
    with tempfile.TemporaryDirectory(prefix="pms-bridge-bench-") as tmp:
        workdir = Path(tmp)
        asyncio.run(bench_throughput(files, workdir / "pool"))
        pano = next(iter(files.values()))[0]
        bench_http(pano, workdir)
        bench_orthanc(pano, workdir)


if __name__ == "__main__":
    main()
