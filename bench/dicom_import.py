"""DICOM import benchmark: the same files into pms-bridge and into Orthanc's REST API, in one run.

The files are synthetic intra-oral X-rays as a sensor writes them (Digital Intra-Oral X-Ray For
Presentation, 1000x1500 pixels, 12 bits in 16, uncompressed, with a window): about 3 MB each, the case
reference/dicom.md measured Orthanc with. Each round starts from empty stores on both sides; rounds
alternate between the two, so both share whatever else the machine is doing. Figures are images per
second over the import itself (servers already running, files already on disk):

* Orthanc: POST /instances, one file per request over keep-alive connections, sequential (how
  reference/dicom.md measured it) and with 2 and 4 clients; the best of the three is the baseline.
  Python's http.client sends no "Expect: 100-continue", which costs curl about a second per file over 1 MB.
* pms-bridge REST: one multipart POST /api/v1/import of all files to a running daemon (`pms-bridge serve`);
  and, as Orthanc is measured, each file as its own application/dicom POST over 4 keep-alive connections.
* pms-bridge REST, a server folder: a JSON POST /api/v1/import naming the folder the files are in
  (`[dicom] import_folders`), to a running daemon: the daemon reads them where they lie, no bytes over HTTP.
  The folder imports (this, the command and the engine) start with the files in the page cache, as
  Orthanc's clients hold theirs in memory (`files_in_page_cache`); one more server-folder figure reads them
  from the disk.
* pms-bridge CLI: `pms-bridge import FOLDER` as a process, start-up and schema check included (into a store
  whose schema exists: creating it is a step of the install, as Orthanc's database exists when measured).
* pms-bridge import engine: the same import in a process of its own (a Runtime, its pool's workers
  started and warmed), without HTTP or a process start: what the transports above add to it. Not in this
  process: a pool worker imports its parent's main module again, and this script's costs 0.4 s a worker.

Beside each rate the bench prints the CPU the server side spent per file (user and system time of the
server's process and every process below it, from Linux /proc, over the same interval; for the engine, its
process and its pool), as a ratio to the best Orthanc figure's: on a shared or virtual machine the rates move
with what else runs, the CPU a file costs much less. The import command's CPU is not measured (its
processes are gone when it ends).

Both servers get one unrelated file before the clock starts (a running archive is warm: pms-bridge's decoder
processes load their codecs on first use, once).

pms-bridge checks every file's pixel data (uncompressed grey data by its length, as a decode would; the
rest by a complete decode), hashes it (SHA-256) and flushes it to disk before the transaction that adds
it; neither side renders previews while importing ([dicom] render_at_import = no, the default; the figure
with renders is printed too). Nothing is asserted: the figures are printed next to their same-run baseline.
The machine may be shared: run several rounds and compare the ratios, not the absolute rates.

    python bench/dicom_import.py [--files 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.proc import pid_running, tree_cpu
from tests.support.dicomfiles import sensor_xrays
from tests.support.orthanc import running_orthanc
from tests.support.ports import free_port

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def make_files(folder: Path, count: int, patient: str = "BENCH1") -> list[Path]:
    """`count` intra-oral objects of one patient, 10 per study, each a different image."""
    return sensor_xrays(folder, count, patient, name="Bench^Patient")


def page_cache_costs(folder: Path, count: int = 100) -> tuple[float, float, float]:
    """Milliseconds to write a 3 MB file into page cache; again at once into the pages just freed; again
    5 s after freeing them (printed with the figures, not used by them).

    A virtual machine pays for the first touch of every page of its memory, and this kind hands freed pages
    back to its host within seconds (virtio-balloon free page reporting), so nearly every file either
    importer writes lands in memory touched for the first time: on the development machine 5 ms per 3 MB
    against 0.8 ms in memory just freed. A server whose memory is full of page cache reuses its pages, so
    absolute rates there are higher for both; the bench leaves both sides in the same state (no warm-up,
    which would favour whichever side ran first) and says what the machine does.
    """
    folder.mkdir()
    chunk = os.urandom(3 << 20)
    costs = []
    for pause in (0.0, 0.0, 5.0):
        time.sleep(pause)
        started = time.perf_counter()
        for index in range(count):
            (folder / str(index)).write_bytes(chunk)
        costs.append((time.perf_counter() - started) * 1000 / count)
        for index in range(count):
            (folder / str(index)).unlink()
    folder.rmdir()
    return costs[0], costs[1], costs[2]


def files_in_page_cache(paths: list[Path], cached: bool) -> None:
    """Put the files a folder import reads into the page cache (each read once), or take them out of it
    (flushed, then dropped with POSIX_FADV_DONTNEED), before a measurement that reads them.

    Orthanc's clients send bytes they hold in memory; pms-bridge's folder imports (the server folder, the
    import command, the engine) read the files from the server's disk. Whether the files were still in the
    page cache then was left to chance: this machine's kernel pages out memory nobody touched for about a
    minute (DAMON reclaim), so in a 1000-file run the server-folder import, the first to read the files
    after Orthanc's and the uploads' measurements, found them gone (260 images/s, against 348 for the engine
    that read them right after the import command had). Each such measurement now starts with the files in
    the cache, as the clients' copies are in memory; one more reads them from the disk, as an import of
    files nobody read lately does.
    """
    for path in paths:
        with open(path, "rb") as file:
            if cached:
                while file.read(1 << 20):
                    pass
            else:
                os.fsync(file.fileno())
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def direct_write_costs(folder: Path, count: int = 100) -> tuple[float, float]:
    """Milliseconds (elapsed, CPU) to write a 3 MB file past the page cache as an import stages its files
    (bridge.store.uncached); printed beside the page-cache costs, not used by the figures."""
    from bridge.store import uncached

    folder.mkdir()
    chunk = os.urandom(3 << 20)
    started, cpu = time.perf_counter(), time.process_time()
    for index in range(count):
        uncached.write_new(folder / str(index), chunk)
    elapsed = (time.perf_counter() - started) * 1000 / count
    used = (time.process_time() - cpu) * 1000 / count
    shutil.rmtree(folder)
    return elapsed, used


def wait_for(url: str, process: subprocess.Popen[bytes], headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


@dataclass(frozen=True)
class Measured:
    """One import: seconds, and the CPU seconds its server side spent (the process and all processes below
    it, from /proc; None where not measured: the import command, whose processes are gone when it ends)."""

    seconds: float
    cpu: float | None


def timed_uploads(
    port: int,
    files: list[bytes],
    clients: int,
    post: Callable[[http.client.HTTPConnection, bytes], None],
    server: int,
) -> Measured:
    """Seconds for `clients` keep-alive connections to `post` every file, each connection a share of them
    in turn (`post` raises RuntimeError for a refused file), and the CPU process `server` spent."""
    failures: list[str] = []

    def upload(share: list[bytes]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            for data in share:
                post(connection, data)
        except RuntimeError as exc:
            failures.append(str(exc))
        connection.close()

    threads = [threading.Thread(target=upload, args=(files[i::clients],)) for i in range(clients)]
    cpu = tree_cpu(server)
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    cpu = tree_cpu(server) - cpu
    if failures:
        raise RuntimeError(failures[0])
    return Measured(elapsed, cpu)


def orthanc_post(connection: http.client.HTTPConnection, data: bytes) -> None:
    connection.request("POST", "/instances", body=data, headers={"Content-Type": "application/dicom"})
    response = connection.getresponse()
    answer = response.read()
    if response.status != 200 or b'"Success"' not in answer:
        raise RuntimeError(f"Orthanc refused a file: {answer.decode(errors='replace')[:200]}")


def orthanc_upload(port: int, files: list[bytes], clients: int, warm: bytes, server: int) -> Measured:
    """POST every file to /instances with `clients` keep-alive connections (after `warm`)."""
    orthanc_post(http.client.HTTPConnection("127.0.0.1", port, timeout=120), warm)
    return timed_uploads(port, files, clients, orthanc_post, server)


def bridge_config(home: Path, *, render: bool, folders: tuple[Path, ...] = ()) -> tuple[Path, int, str]:
    """A home as `pms-bridge init` leaves it: the config and the image folder (which only init and a new
    store's first start create: a missing one is a share that is gone); `folders`: [dicom] import_folders."""
    (home / "images").mkdir(parents=True)
    port, token = free_port(), secrets.token_hex(8)
    lines = [
        "[store]",
        f"url = sqlite:///{home / 'bridge.db'}",
        f"images = {home / 'images'}",
        "[api]",
        f"port = {port}",
        f"token = {token}",
        "[opp_web]",
        f"port = {free_port()}",
        "[daemon]",
        "log_level = warning",
        "[dicom]",
        f"render_at_import = {'yes' if render else 'no'}",
        f"import_folders = {'; '.join(str(folder) for folder in folders)}",
    ]
    config = home / "pms-bridge.ini"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config, port, token


def multipart(paths: list[Path]) -> tuple[bytes, str]:
    boundary = secrets.token_hex(16)
    body = io.BytesIO()
    for path in paths:
        disposition = f'Content-Disposition: form-data; name="file"; filename="{path.name}"'
        body.write(f"--{boundary}\r\n{disposition}\r\n".encode())
        body.write(b"Content-Type: application/dicom\r\n\r\n")
        body.write(path.read_bytes())
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


@contextlib.contextmanager
def running_bridge(
    home: Path, *, render: bool, folders: tuple[Path, ...] = ()
) -> Iterator[tuple[int, dict[str, str], int]]:
    """A `pms-bridge serve` on a fresh store: its API port, the authorization header and its pid."""
    config, port, token = bridge_config(home, render=render, folders=folders)
    with open(home / "log", "wb") as log:
        daemon = subprocess.Popen(
            [str(BIN / "pms-bridge"), "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", daemon)
        yield port, {"Authorization": f"Bearer {token}"}, daemon.pid
    finally:
        daemon.terminate()
        daemon.wait(60)


def bridge_post(
    connection: http.client.HTTPConnection, body: bytes, headers: dict[str, str]
) -> dict[str, Any]:
    """POST /api/v1/import; the report (an import that added nothing is an error here)."""
    connection.request("POST", "/api/v1/import", body=body, headers=headers)
    response = connection.getresponse()
    answer = response.read()
    if response.status != 201:
        raise RuntimeError(f"pms-bridge answered {response.status}: {answer[:300]!r}")
    report: dict[str, Any] = json.loads(answer)
    return report


def bridge_rest(
    home: Path, body: bytes, content_type: str, count: int, *, render: bool, warm: Path
) -> Measured:
    """One multipart POST /api/v1/import of every file to a running daemon (warmed first)."""
    with running_bridge(home, render=render) as (port, auth, pid):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        warm_body, warm_type = multipart([warm])
        bridge_post(connection, warm_body, {**auth, "Content-Type": warm_type})
        cpu = tree_cpu(pid)
        started = time.perf_counter()
        report = bridge_post(connection, body, {**auth, "Content-Type": content_type})
        elapsed = time.perf_counter() - started
        cpu = tree_cpu(pid) - cpu
        if report["summary"]["images"] != count:
            raise RuntimeError(f"pms-bridge imported {report['summary']}")
        return Measured(elapsed, cpu)


def bridge_rest_single(home: Path, files: list[bytes], clients: int, warm: bytes) -> Measured:
    """POST every file as its own application/dicom body with `clients` keep-alive connections, as Orthanc
    is measured (each request is a whole import: its own report, transaction and flushes)."""
    with running_bridge(home, render=False) as (port, auth, pid):
        headers = {**auth, "Content-Type": "application/dicom"}

        def post(connection: http.client.HTTPConnection, data: bytes) -> None:
            bridge_post(connection, data, headers)

        post(http.client.HTTPConnection("127.0.0.1", port, timeout=120), warm)
        return timed_uploads(port, files, clients, post, pid)


def bridge_server_folder(home: Path, folder: Path, warm: Path, count: int) -> Measured:
    """POST /api/v1/import naming the files' folder (a JSON body; `[dicom] import_folders` lists it) to a
    running daemon, warmed with another folder's file: the same import, the bytes not crossing HTTP."""
    with running_bridge(home, render=False, folders=(folder, warm.parent)) as (port, auth, pid):
        headers = {**auth, "Content-Type": "application/json"}
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        bridge_post(connection, json.dumps({"paths": [str(warm)]}).encode(), headers)
        cpu = tree_cpu(pid)
        started = time.perf_counter()
        report = bridge_post(connection, json.dumps({"paths": [str(folder)]}).encode(), headers)
        elapsed = time.perf_counter() - started
        cpu = tree_cpu(pid) - cpu
        if report["summary"]["images"] != count:
            raise RuntimeError(f"pms-bridge imported {report['summary']}")
        return Measured(elapsed, cpu)


def bridge_cli(home: Path, folder: Path, count: int) -> Measured:
    """`pms-bridge import FOLDER`, the process start included, into a store whose schema
    exists (created at install, as Orthanc's database and the daemon's exist before they are measured)."""
    from bridge.store.db import make_engine, upgrade_schema

    config, _port, _token = bridge_config(home, render=False)
    engine = make_engine(f"sqlite:///{home / 'bridge.db'}")
    upgrade_schema(engine)
    engine.dispose()
    started = time.perf_counter()
    result = subprocess.run(
        [str(BIN / "pms-bridge"), "import", "--config", str(config), "--json", str(folder)],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or json.loads(result.stdout)["summary"]["images"] != count:
        raise RuntimeError(f"pms-bridge import failed: {result.stderr[-500:]}")
    return Measured(elapsed, None)


def bridge_engine(home: Path, folder: Path, warm: Path, count: int) -> Measured:
    """The import itself, in a process of its own (and its pool), with a warmed runtime.

    Its own process, started with `-c`: a pool worker imports its parent's main module again when it starts
    (multiprocessing), and this bench's main module imports NumPy, the test support and the rest, about
    0.4 s of CPU for each worker, which `pms-bridge`'s own short main module does not cost. Measured in this
    process, the second worker, forked once the files came, charged that to the engine's figure."""
    arguments = f"{str(home)!r}, {str(folder)!r}, {str(warm)!r}, {count}"
    code = f"from bench.dicom_import import engine_child; engine_child({arguments})"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0:
        raise RuntimeError(f"the engine run failed: {result.stderr[-500:]}")
    seconds, cpu = json.loads(result.stdout.splitlines()[-1])
    return Measured(seconds, cpu)


def engine_child(home: str, folder: str, warm: str, count: int) -> None:
    """`bridge_engine`'s process: its pool's workers all started and warmed by one file (a running
    archive's are), then the import timed; prints [seconds, CPU seconds] as JSON."""
    import asyncio

    from bridge.config import load_settings
    from bridge.dicom.importer import Importer
    from bridge.model import Origin
    from bridge.runtime import Runtime

    config, _port, _token = bridge_config(Path(home), render=False)
    workers = os.cpu_count() or 1
    rt = Runtime.build(load_settings(str(config)), imaging_workers=workers)

    async def run() -> Measured:
        origin = Origin("bench", "import", "BENCH")
        await rt.imaging.start_workers()
        await Importer(rt, origin, concurrency=2 * workers).run([(warm, "warm")])
        cpu = tree_cpu(os.getpid())
        started = time.perf_counter()
        report = await Importer(rt, origin, concurrency=2 * workers).run([(folder, "files")])
        elapsed = time.perf_counter() - started
        cpu = tree_cpu(os.getpid()) - cpu
        await rt.audit.flush()
        if len(report.imported) != count:
            raise RuntimeError(f"the engine imported {len(report.imported)} of {count}: {report.errors[:1]}")
        return Measured(elapsed, cpu)

    try:
        measured = asyncio.run(run())
    finally:
        rt.close()
    print(json.dumps([measured.seconds, measured.cpu]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pms-bridge-bench-dicom-"))
    try:
        folder = work / "files"
        paths = make_files(folder, args.files)
        warm = make_files(work / "warm", 1, patient="WARM")[0]
        data = [p.read_bytes() for p in paths]
        body, content_type = multipart(paths)
        size = sum(len(d) for d in data) / 1e6
        each = size / args.files
        print(f"{args.files} intra-oral objects, {size:.0f} MB ({each:.2f} MB each); {os.cpu_count()} cores")
        results: dict[str, list[Measured]] = {}

        def measure(name: str, home: Path, run: Callable[[Path], Measured]) -> None:
            # each store is removed once measured: a run of many rounds needs no more disk than one
            try:
                results.setdefault(name, []).append(run(home))
            finally:
                shutil.rmtree(home, ignore_errors=True)

        def read_from(cached: bool, run: Callable[[], Measured]) -> Measured:
            files_in_page_cache(paths, cached)
            return run()

        def server_folder(cached: bool) -> Callable[[Path], Measured]:
            def run(home: Path) -> Measured:
                return read_from(cached, lambda: bridge_server_folder(home, folder, warm, args.files))

            return run

        def orthanc(clients: int) -> Callable[[Path], Measured]:
            def run(home: Path) -> Measured:
                with running_orthanc(home) as port:
                    server = pid_running(str(home / "orthanc.json"))
                    return orthanc_upload(port, data, clients, warm.read_bytes(), server)

            return run

        for n in range(args.rounds):
            for clients in (1, 2, 4):
                measure(
                    f"Orthanc REST, {clients} client(s)", work / f"orthanc-{n}-{clients}", orthanc(clients)
                )
            measure(
                "pms-bridge REST import (daemon)",
                work / f"rest-{n}",
                lambda home: bridge_rest(home, body, content_type, args.files, render=False, warm=warm),
            )
            measure(
                "pms-bridge REST, a file per request, 4 clients",
                work / f"single-{n}",
                lambda home: bridge_rest_single(home, data, 4, warm.read_bytes()),
            )
            for cached in (True, False):
                measure(
                    "pms-bridge REST import of a server folder (JSON)"
                    if cached
                    else "pms-bridge server folder, files read from disk",
                    work / f"folder-{n}-{cached}",
                    server_folder(cached),
                )
            measure(
                "pms-bridge import command (process)",
                work / f"cli-{n}",
                lambda home: read_from(True, lambda: bridge_cli(home, folder, args.files)),
            )
            measure(
                "pms-bridge import engine (own process, warm)",
                work / f"engine-{n}",
                lambda home: read_from(True, lambda: bridge_engine(home, folder, warm, args.files)),
            )
            measure(
                "pms-bridge REST, render_at_import = yes",
                work / f"render-{n}",
                lambda home: bridge_rest(home, body, content_type, args.files, render=True, warm=warm),
            )
        rates = {
            name: args.files / statistics.median(m.seconds for m in runs) for name, runs in results.items()
        }
        cpus = {
            name: 1000 * statistics.median(m.cpu for m in runs if m.cpu is not None) / args.files
            for name, runs in results.items()
            if all(m.cpu is not None for m in runs)
        }
        best = max((name for name in rates if name.startswith("Orthanc")), key=rates.__getitem__)
        baseline, cpu_baseline = rates[best], cpus[best]
        print(
            f"median of {args.rounds} rounds: images/s (ratio to the best Orthanc figure of the same run,"
            f" {best}); CPU of the server side per file (its processes, from /proc; ratio to that run's)"
        )
        for name, rate in rates.items():
            cpu = (
                f"{cpus[name]:6.1f} ms/file {cpus[name] / cpu_baseline:5.2f}x"
                if name in cpus
                else "   (not measured)"
            )
            print(f"  {name:48} {rate:7.1f} /s   {rate / baseline:5.2f}x   CPU {cpu}")
        fresh, reused, later = page_cache_costs(work / "memory")
        print(
            f"writing 3 MB into page cache: {fresh:.2f} ms; again at once {reused:.2f} ms;"
            f" again 5 s after freeing {later:.2f} ms"
        )
        direct, direct_cpu = direct_write_costs(work / "direct")
        print(f"writing 3 MB past the page cache (import staging): {direct:.2f} ms, CPU {direct_cpu:.2f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
